"""slurm/ scripts on the suite's real SLURM cluster (tests/test_slurm.py's `slurm` fixture, started again for this
module): the time limit's USR1 -> checkpoint -> requeue -> resume, and a second job on a running one's output dir
refused. A file of its own so that `pytest -n 2 --dist loadfile` can run it beside tests/test_slurm.py, whose
frozen-rank test is the suite's longest (tests/conftest.py orders the files longest first).
"""

from __future__ import annotations

import re
import subprocess
import time

from tests import test_slurm
from tests.test_slurm import PATIENCE, ROOT, _run, completed, follow, job_env, log_tail, sbatch_args, steps

slurm = test_slurm.slurm  # the cluster fixture, here started for this module


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, shards, tmp_path):
    """The path a real job takes: Slurm itself sends USR1 before the time limit, the tasks checkpoint and exit
    75, the script requeues the job, and the rerun resumes from that checkpoint and finishes. (A USR1 sent by
    hand, `scancel --signal=USR1`, takes the same path from the signal on; it had its own test, which cost the
    suite a 2-rank job and its requeue and checked nothing this one does not.)

    The timeline, from what the job needs rather than from an idle machine's speed. `--time=10
    --signal=USR1@540`: slurmctld looks at time limits every 30 s and sends the signal at the first look that
    finds the job within 540 + 30 s of its end, so 30-60 s after each start (a requeue clears "sent": the rerun
    gets one too), to the training step's tasks (no `B:`: not to the batch shell). On a quiet machine the run
    is training by then; under load (start-ups of 100-160 s were seen) it may still be importing torch or
    building the engine: the CLI holds the signal back from its first line until the engine is built, children
    such as DeepSpeed's `ninja` included (engine/early_stop.py), and the run stops after its first steps all
    the same. Either way 540 s remain from the signal to the time limit for
    the rest of the start-up, a step or two and the save. (With `--time=2 --signal=USR1@60` they were 60 s: a
    start-up under load ran into the limit; and before the signals were held a USR1 during the imports killed
    the tasks, in every requeued run alike, until the test's PATIENCE ran out, or one during `ninja` failed the
    job.) A quiet machine waits no longer
    than it did then: the signal still comes 30-60 s after the start.

    max_steps is out of reach, so the first run surely ends by the signal. Once requeued, the run is told
    through a layered site config (read at every start) to stop 1 step past its checkpoint (stop_at_step
    keeps the LR): a run with one step to go cannot be stopped by its own signal (the stop vote lags a step,
    engine/train.py), so the rerun finishes whenever that signal comes. (A USR1 in the instant before the
    interpreter runs the CLI's first line still kills a task: slurm/common.sh requeues on that, and the test
    waits for a run that did stop by the signal.)"""
    out, log, site = tmp_path / "run", tmp_path / "job.out", tmp_path / "site.yaml"
    site.write_text("# filled in once the job has been requeued\n")
    args = sbatch_args(shards, out, log, "train.max_steps=100000", "checkpoint.every_steps=100000")
    args[2:2] = ["--time=10", "--signal=USR1@540"]
    script = args.index(str(ROOT / "slurm" / "pretrain_tiny_cpu.sh"))
    args[script + 1 : script + 1] = ["--config", str(site)]
    job = _run(*args, env=job_env(slurm)).strip().split(";")[0]

    follow(slurm, job, log, PATIENCE, lambda _: log.exists() and "by a signal" in log.read_text())
    text = log.read_text()
    assert "SIGUSR1 received" in text, log_tail(log)
    stopped = int(re.search(r"stopped at step (\d+) by a signal", text).group(1))
    site.write_text(f"train:\n  stop_at_step: {stopped + 1}\n")  # before the requeued job may start again
    info = follow(slurm, job, log, PATIENCE, completed)

    text = log.read_text()
    assert "checkpoint saved after a signal; requeueing" in text
    assert re.search(rf"resumed from \S+/step_{stopped:07d} at step {stopped}\b", text)  # the signal's checkpoint
    assert steps(out) == list(range(1, stopped + 2)), "no step trained twice past the checkpoint, none missing"
    assert info["TimeLimit"] == "00:10:00" and int(info["Restarts"]) >= 1
    print(
        f"\njob {job}: stopped at step {stopped} by the time limit's USR1; {info['JobState']}, "
        f"restarts {info['Restarts']}"
    )
    print("\n".join(slurm.jobcomp(job)))


def test_a_second_job_on_the_output_dir_of_a_running_one_is_refused(slurm, shards, tmp_path):
    """One writer per run (engine/lease.py), on real SLURM: job A trains; job B, submitted on A's output dir
    (say, the same script sent twice), exits 2 with one line naming A's job and how to take over, and A trains
    on. (A requeue of A itself, same job id and a higher SLURM_RESTART_COUNT, takes the lease over instead:
    tests/test_lease.py.)"""
    out, log_a, log_b = tmp_path / "run", tmp_path / "a.out", tmp_path / "b.out"
    job_a = _run(*sbatch_args(shards, out, log_a, "train.max_steps=100000"), env=job_env(slurm)).split(";")[0].strip()
    try:
        deadline = time.monotonic() + PATIENCE
        while not steps(out):  # A holds the lease from before its first step
            assert time.monotonic() < deadline, log_tail(log_a)
            assert slurm.job(job_a).get("JobState") in ("PENDING", "RUNNING"), log_tail(log_a)
            time.sleep(0.5)
        args = sbatch_args(shards, out, log_b, "train.max_steps=100000")
        args[2:2] = ["--wait"]
        proc = subprocess.run(args, capture_output=True, text=True, env=job_env(slurm), timeout=PATIENCE)
        assert proc.returncode != 0, log_tail(log_b)
        # One line per task of B (each of its 2 ranks says it), the same line.
        refused = {line for line in log_b.read_text().splitlines() if "is in use by another run" in line}
        assert len(refused) == 1, refused
        assert f"job slurm {job_a}," in next(iter(refused)) and "run.take_over=true" in next(iter(refused))
        assert slurm.job(job_a)["JobState"] == "RUNNING"
        before = len(steps(out))
        while len(steps(out)) <= before:  # and A still trains and logs into its own output dir
            assert time.monotonic() < deadline and slurm.job(job_a)["JobState"] == "RUNNING", log_tail(log_a)
            time.sleep(0.5)
    finally:
        _run("scancel", job_a, env=slurm.env, check=False)
        deadline = time.monotonic() + PATIENCE
        while slurm.job(job_a).get("JobState") in ("PENDING", "RUNNING", "COMPLETING") and time.monotonic() < deadline:
            time.sleep(0.5)
