"""slurm/ scripts on a real one-machine SLURM cluster (slurmctld + two slurmd + munge, started here).

`make test` installs slurm-wlm and munge (scripts/services.sh). Two nodes on one machine: one slurmd per node
(`slurmd -N <name>`), each on its own port and spool directory (`%n` in the paths), both at 127.0.0.1. Each
claims 4 CPUs (SlurmdParameters=config_overrides), so jobs fit on 2 real cores. Debian's Slurm is built without
--enable-multiple-slurmd, so the nodes cannot share a NodeHostname (nor be called `localhost`, which Slurm
matches to any single node): they are node1 and node2, names that nothing resolves. On a cluster the master is
the first host of SLURM_JOB_NODELIST (tests/test_launch.py checks that expansion); here the jobs get
MASTER_ADDR=127.0.0.1, which launch.py takes before the node list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from electra_scale.infra import storage
from electra_scale.infra.launch import free_port
from tests.test_train import NO_DROPOUT, metrics

ROOT = Path(__file__).resolve().parent.parent
# How long a test waits for a job or a daemon before calling it hung: a deadline, not a speed check, generous so
# that a loaded machine (two test files at once, or stress-ng) makes a test slower, never fail.
PATIENCE = 900


def _run(*cmd: str, env: dict | None = None, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {out.stderr or out.stdout}")
    return out.stdout


NODES = ("node1", "node2")


@dataclass
class Cluster:
    env: dict
    dir: Path

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...)."""
        text = _run("scontrol", "show", "job", "--oneliner", job_id, env=self.env, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def slurmd_log(self, node: str) -> str:
        return (self.dir / f"slurmd-{node}.log").read_text()

    def jobcomp(self, job_id: str) -> list[str]:
        path = self.dir / "jobcomp.log"
        return [line for line in path.read_text().splitlines() if f"JobId={job_id} " in line] if path.exists() else []


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not shutil.which("slurmctld"):
        pytest.fail("slurm-wlm is not installed: run the tests through `make test`, which installs it")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    nodes = [f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs=4 RealMemory=4000" for name in NODES]
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=electra-test",
                "SlurmctldHost=localhost",
                f"SlurmctldPort={free_port()}",
                "AuthType=auth/munge",
                "SlurmUser=root",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "JobRequeue=1",
                "SlurmdParameters=config_overrides",
                f"StateSaveLocation={d / 'state'}",
                f"SlurmdSpoolDir={d / 'spool-%n'}",
                f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={d / 'slurmctld.log'}",
                f"SlurmdLogFile={d / 'slurmd-%n.log'}",
                # No accounting daemon (sacct); every job end, requeues included, is logged to this file.
                "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={d / 'jobcomp.log'}",
                *nodes,
                f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "munge"], check=True)
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        for name in NODES:
            subprocess.run(["slurmd", "-f", str(conf), "-N", name], check=True, env=env)
        deadline = time.monotonic() + 120
        while _run("sinfo", "-h", "-o", "%D %T", env=env, check=False).split() != [str(len(NODES)), "idle"]:
            assert time.monotonic() < deadline, (d / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.3)
        yield Cluster(env, d)
    finally:
        # A failed test may leave its job running: cancel it (its tasks end with it), then stop the daemons.
        subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True, check=False)
        deadline = time.monotonic() + 120
        while _run("squeue", "-h", env=env, check=False).strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in [*(d / f"slurmd-{name}.pid" for name in NODES), d / "slurmctld.pid"]:
            if pid.exists():
                subprocess.run(["kill", pid.read_text().strip()], check=False)


def sbatch_args(shards, out: Path, log: Path, *overrides: str) -> list[str]:
    prefix, vocab = shards
    return [
        "sbatch",
        "--parsable",
        f"--chdir={ROOT}",
        f"--output={log}",
        str(ROOT / "slurm" / "pretrain_tiny_cpu.sh"),
        f"data.shards={prefix}",
        f"run.output_dir={out}",
        f"model.vocab_size={vocab}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "data.num_workers=0",
        *overrides,
    ]


def job_env(cluster: Cluster) -> dict:
    # A free MASTER_PORT: the port SLURM jobs derive from the job id (infra/launch.py) is the same for job 1 of
    # two test clusters side by side (pytest -n 2).
    env = {**cluster.env, "ELECTRA_HOME": str(ROOT), "ELECTRA_VENV": sys.prefix, "MASTER_ADDR": "127.0.0.1"}
    return {**env, "MASTER_PORT": str(free_port())}


def steps(out: Path | str) -> list[int]:
    """The steps metrics.jsonl has logged so far (a local or S3 output dir); read while the run writes it, so a
    last line without its newline is still being written and does not count yet."""
    url = storage.join(str(out), "metrics.jsonl")
    text = storage.read_text(url) if storage.exists(url) else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


@dataclass
class S3Runs:
    """A bucket for this module's S3 runs, and what their jobs need to reach it (``env``). Their default staging
    is under one ELECTRA_SCALE_CACHE (``home``) for both nodes: one filesystem, as a cluster's shared $HOME is."""

    url: str
    env: dict
    home: Path

    def staging(self, node: str, run: str) -> Path:
        return self.home / f"staging-{node}" / f"{self.url.removeprefix('s3://')}/{run}".replace("/", "_")


@pytest.fixture(scope="module")
def s3_runs(s3_server, tmp_path_factory):
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    home = tmp_path_factory.mktemp("shared-home")
    env = {**s3_server.env(), "ELECTRA_SCALE_CACHE": str(home)}
    with pytest.MonkeyPatch.context() as mp:  # this process reads the runs' output too
        for key, value in env.items():
            mp.setenv(key, value)
        storage.reset_client()
        yield S3Runs(f"s3://{name}", env, home)
    storage.reset_client()


# The runs that compare losses: dropout off, checkpoints every 4 steps, the LR schedule of 100 steps.
SCHEDULE = ("train.max_steps=100", "checkpoint.every_steps=4", *NO_DROPOUT)


@pytest.fixture(scope="module")
def reference(slurm, shards, s3_runs, tmp_path_factory) -> tuple[str, str, Path]:
    """The uninterrupted run: one task on each node (the script's 1 node x 2 tasks, overridden on the command
    line as a user would), S3 output, the default staging, 32 steps of the 100-step schedule."""
    tmp = tmp_path_factory.mktemp("reference")
    out, log = f"{s3_runs.url}/reference", tmp / "job.out"
    args = sbatch_args(shards, out, log, *SCHEDULE, "train.stop_at_step=32")
    args[2:2] = ["--wait", "--nodes=2", "--ntasks-per-node=1"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**job_env(slurm), **s3_runs.env}, timeout=PATIENCE)
    assert proc.returncode == 0, log.read_text()[-3000:] if log.exists() else proc.stderr
    return proc.stdout.strip().split(";")[0], out, log


def test_sbatch_tiny_job_on_two_nodes_trains_and_checkpoints(slurm, s3_runs, reference):
    job, out, log = reference
    text = log.read_text()
    assert "launch: SLURM, world size 2 (2 node(s) x 1), backend gloo" in text
    info = slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", info
    for node in NODES:  # each node's slurmd started one task of the training step (SLURM_NODEID 0 and 1)
        assert re.search(rf"launch task StepId={job}\.0 ", slurm.slurmd_log(node)), node
    assert steps(out) == list(range(1, 33))
    assert storage.exists(f"{out}/checkpoints/step_0000032/COMPLETE")
    # Both nodes are local rank 0 of one shared filesystem: each staged in a directory of its own, which it
    # claimed with its name (engine/checkpoint.py).
    for node in NODES:
        owner = json.loads((s3_runs.staging(node, "reference") / ".owner").read_text())
        assert owner["node"] == node


def log_tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else "(no job output yet)"


def follow(slurm: Cluster, job: str, log: Path, timeout: float, done: Callable[[dict], bool]) -> dict:
    """Poll `scontrol show job` until done(info). A requeued job may start again only ~2 minutes later (its
    BeginTime); the tests need not wait for that, so a pending requeued job is told to start now (an update
    issued right at the requeue is lost, hence the pause)."""
    deadline = time.monotonic() + timeout
    while True:
        info = slurm.job(job)
        if done(info):
            return info
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (info, log_tail(log))
        assert time.monotonic() < deadline, (info, log_tail(log))
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) > 0:
            time.sleep(2)
            _run("scontrol", "update", f"JobId={job}", "StartTime=now", env=slurm.env, check=False)
        time.sleep(0.5)


def completed(info: dict) -> bool:
    return info.get("JobState") == "COMPLETED"


def task_pid(job: str, procid: int, out: Path | str, step: int | None = None) -> int | None:
    """The pid of task ``procid`` of ``job``'s training step (``step``: that srun step of the job), writing to
    ``out`` (other clusters on this machine number their jobs from 1 too: the output dir is what is this
    test's), if it runs."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            cmd = (proc / "cmdline").read_text()
        except OSError:
            continue
        ours = env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(procid)
        step_id = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
        in_step = step_id not in (None, "batch") and (step is None or step_id == str(step))
        mine = f"run.output_dir={out}\0" in cmd and "srun" not in cmd  # the task, not the batch script's srun
        if ours and in_step and mine:
            return int(proc.name)
    return None


def freeze(slurm: Cluster, job: str, out: str, log: Path, step: int, after_tag: str) -> float:
    """Wait until ``after_tag`` is complete and srun step ``step`` runs, then SIGSTOP its task 1; the time."""
    deadline = time.monotonic() + PATIENCE
    while True:
        pid = task_pid(job, 1, out, step)
        if pid is not None and storage.exists(f"{out}/checkpoints/{after_tag}/COMPLETE"):
            break
        assert time.monotonic() < deadline, log_tail(log)
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), log_tail(log)
        time.sleep(0.2)
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


def wait_for(log: Path, pattern: str, start: int = 0) -> re.Match:
    """The first match of ``pattern`` in the job's log past offset ``start``, once it is there."""
    deadline = time.monotonic() + PATIENCE
    while not (found := re.compile(pattern).search(log.read_text() if log.exists() else "", start)):
        assert time.monotonic() < deadline, log_tail(log)
        time.sleep(0.2)
    return found


def test_a_frozen_rank_restarts_in_the_allocation_then_requeues_and_resumes_exactly(
    slurm, shards, s3_runs, reference, tmp_path
):
    """One task per node, S3 output, the default per-node staging (one shared filesystem). Task 1 is frozen
    with SIGSTOP mid-run: task 0's watchdog exits 75 after run.timeouts.step_s, srun ends the frozen task
    (--wait, slurm/common.sh) and exits 137, which the script reads as the 75 it follows, and, with
    ELECTRA_RESTARTS=1, runs the training step again in the same job (a new step, no requeue), which resumes.
    Frozen again, the restarts spent, the job is requeued; the requeued run takes the lease over, resumes and
    stops 4 steps later. Its losses are the uninterrupted reference's, and a third job on 1 rank (another world
    size) resumes from its last checkpoint and continues them (up to float reassociation)."""
    out, log, site = f"{s3_runs.url}/frozen", tmp_path / "job.out", tmp_path / "site.yaml"
    site.write_text("# stop_at_step, once the job is about to be requeued\n")
    step_s = 30  # and the checkpoint phase's: a freeze may land in a save (every 4 steps)
    timeouts = (f"run.timeouts.step_s={step_s}", f"run.timeouts.checkpoint_s={step_s}")
    args = sbatch_args(shards, out, log, *SCHEDULE, *timeouts)
    args[2:2] = ["--nodes=2", "--ntasks-per-node=1"]
    script = args.index(str(ROOT / "slurm" / "pretrain_tiny_cpu.sh"))
    args[script + 1 : script + 1] = ["--config", str(site)]
    env = {**job_env(slurm), **s3_runs.env, "ELECTRA_SRUN_WAIT": "20", "ELECTRA_RESTARTS": "1"}
    job = _run(*args, env=env).strip().split(";")[0]

    frozen = freeze(slurm, job, out, log, 0, "step_0000004")
    first_resume = storage.read_text(f"{out}/checkpoints/latest").strip()  # nothing completes after the freeze
    restarted = wait_for(log, rf"restarting in job {job}'s allocation, restart 1 of ELECTRA_RESTARTS=1")
    first = wait_for(log, r"step \d+/100", restarted.end())  # the first step of the restarted run
    in_allocation = time.monotonic() - frozen
    assert slurm.job(job)["Restarts"] == "0", "restarted inside the allocation, not requeued"

    frozen = freeze(slurm, job, out, log, 1, "step_0000008")
    latest = int(storage.read_text(f"{out}/checkpoints/latest").strip().removeprefix("step_"))
    stop = latest + 4
    assert stop + 4 <= 32, f"the reference has 32 steps; the second freeze came at step {latest}"
    site.write_text(f"train:\n  stop_at_step: {stop}\n")  # read by the requeued run
    requeued = wait_for(log, rf"restart\(s\) in this allocation are spent: requeueing job {job}", first.end())
    info = follow(slurm, job, log, PATIENCE, completed)
    requeue = time.monotonic() - frozen  # with the test's StartTime=now in place of the requeue's BeginTime

    text = log.read_text()
    stuck = [line for line in text.splitlines() if re.search(r"watchdog: rank 0 stuck in (step|checkpoint)", line)]
    assert len(stuck) == 2 and all(f"_s={step_s})" in line for line in stuck), log_tail(log)
    assert text.count("requeueing job") == 1 and requeued.start() > restarted.start()
    assert re.search(rf"launch task StepId={job}\.1 ", slurm.slurmd_log("node2")), "the restart is step 1"
    resumed = [int(m.group(1)) for m in re.finditer(r"resumed from \S+/step_(\d+) at step \d+\b", text)]
    assert resumed == [int(first_resume.removeprefix("step_")), latest], resumed
    # The lease, taken over by the restart and by the requeue: the holder's process is gone (one machine here),
    # else the requeue is a later incarnation of the same job (engine/lease.py).
    assert re.search(
        rf"lease: taking over .* job slurm {job}, .*: (its process \d+ on this machine is gone|this is a later)", text
    )
    assert steps(out) == list(range(1, stop + 1)) and int(info["Restarts"]) == 1
    ref = metrics(reference[1])
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in ref[:stop]], "losses equal to the reference"
    print(f"\njob {job}: frozen rank to first step: in the allocation {in_allocation:.0f}s, by requeue {requeue:.0f}s")

    # Another world size: one task on one node resumes the 2-rank checkpoint (converted), 4 steps more.
    log1 = tmp_path / "one.out"
    args = sbatch_args(shards, out, log1, *SCHEDULE, f"train.stop_at_step={stop + 4}")
    args[2:2] = ["--wait", "--nodes=1", "--ntasks-per-node=1"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**job_env(slurm), **s3_runs.env}, timeout=PATIENCE)
    assert proc.returncode == 0, log_tail(log1)
    assert f"at step {stop} (converted from 2 rank(s), ZeRO-2)" in log1.read_text()
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, stop + 5))
    for a, b in zip(ref[stop : stop + 4], got[stop:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), f"step {a['step']}"
