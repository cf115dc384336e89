"""slurm/ scripts on a real one-machine SLURM cluster (slurmctld + slurmd + munge, started here).

`make test` installs slurm-wlm and munge (scripts/services.sh). The cluster claims 8 CPUs on this machine
(SlurmdParameters=config_overrides) so a 2-task job fits on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from electra_scale import storage
from electra_scale.launch import free_port

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str, env: dict | None = None, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {out.stderr or out.stdout}")
    return out.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not shutil.which("slurmctld"):
        pytest.fail("slurm-wlm is not installed: run the tests through `make test`, which installs it")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=electra-test",
                "SlurmctldHost=localhost",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
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
                f"SlurmdSpoolDir={d / 'spool'}",
                f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                f"SlurmdPidFile={d / 'slurmd.pid'}",
                f"SlurmctldLogFile={d / 'slurmctld.log'}",
                f"SlurmdLogFile={d / 'slurmd.log'}",
                "NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "munge"], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=env)
    deadline = time.monotonic() + 30
    while "idle" not in _run("sinfo", "-h", "-o", "%T", env=env, check=False):
        assert time.monotonic() < deadline, (d / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.3)
    yield env
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        pid = d / pid_file
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


def job_env(slurm: dict) -> dict:
    return {**slurm, "ELECTRA_HOME": str(ROOT), "ELECTRA_VENV": sys.prefix}


def steps(out: Path) -> list[int]:
    text = storage.read_text(str(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines()]


def test_sbatch_tiny_job_trains_and_checkpoints(slurm, shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    args = sbatch_args(shards, out, log, "train.max_steps=3", "checkpoint.every_steps=100")
    proc = subprocess.run(
        [args[0], "--wait", *args[1:]], capture_output=True, text=True, env=job_env(slurm), timeout=300
    )
    assert proc.returncode == 0, log.read_text()[-3000:] if log.exists() else proc.stderr
    text = log.read_text()
    assert "launch: SLURM, world size 2 (1 node(s) x 2)" in text
    assert steps(out) == [1, 2, 3]
    assert (out / "checkpoints" / "step_0000003" / "COMPLETE").exists()


def test_usr1_checkpoints_requeues_and_resumes(slurm, shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    args = sbatch_args(shards, out, log, "train.max_steps=150", "checkpoint.every_steps=1000")
    job = _run(*args, env=job_env(slurm)).strip().split(";")[0]
    deadline = time.monotonic() + 240
    while len(steps(out)) < 3:
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "job never started"
        time.sleep(0.2)
    _run("scancel", "--signal=USR1", job, env=slurm)  # what --signal=USR1@N does before the time limit

    # The script requeues on exit 75; a requeued job waits before it may start again, so start it now.
    deadline = time.monotonic() + 120
    while "Restarts=1" not in _run("scontrol", "show", "job", job, env=slurm, check=False):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)
    _run("scontrol", "update", f"JobId={job}", "StartTime=now", env=slurm, check=False)
    deadline = time.monotonic() + 300
    while "JobState=COMPLETED" not in (info := _run("scontrol", "show", "job", job, env=slurm, check=False)):
        assert time.monotonic() < deadline and "JobState=FAILED" not in info, log.read_text()[-3000:]
        time.sleep(1)

    text = log.read_text()
    stopped = int(re.search(r"stopped at step (\d+) by a signal", text).group(1))
    assert 3 <= stopped < 150
    assert "requeueing job" in text and f"at step {stopped}" in text  # the rerun resumed from that checkpoint
    assert steps(out) == list(range(1, 151)), "no step trained twice past the checkpoint, none missing"
