"""One writer per run (engine/lease.py): the lease against real SeaweedFS and local disk, then three real
`pretrain` processes on one S3 output dir: a second run refuses, a run takes a stale lease, and the run it
was taken from stops without marking its checkpoint complete."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from electra_scale.engine.lease import Holder, Lease, LeaseHeld, LeaseLost
from electra_scale.infra import storage
from tests.cli import PATIENCE, Run, run_cli, start_cli
from tests.test_train import pretrain_args


def elsewhere(me: Holder, **changes) -> Holder:
    """Another process on another machine: its pid means nothing here."""
    return replace(me, token=os.urandom(8).hex(), host="node-b", pid=4242, space="another machine", **changes)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lease_on_local_disk_and_seaweedfs(where, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="electra_scale")
    out = f"{s3_bucket}/run" if where == "s3" else str(tmp_path / "new" / "run")
    me = Holder.this_process(30.0, env={"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"})
    leases = []

    def acquire(holder: Holder, take_over: bool = False) -> Lease:
        leases.append(Lease.acquire(out, holder.timeout_s, take_over, me=holder))
        return leases[-1]

    try:
        first = acquire(me)
        first.check()  # a heartbeat: a conditional refresh
        # Another run (another machine, another job) is refused, with the holder named and the way out.
        with pytest.raises(LeaseHeld) as held:
            acquire(elsewhere(me, job="slurm 8", instance="0"))
        text = str(held.value)
        assert f"host {me.host}, job slurm 7, pid {os.getpid()}, last heartbeat" in text
        assert "run.take_over=true" in text and "30s after its last heartbeat" in text
        with pytest.raises(LeaseHeld):  # the same job, the same incarnation: a second srun step, not a requeue
            acquire(elsewhere(me, instance="0"))

        # A requeue of the same job (a higher SLURM_RESTART_COUNT) takes over; the predecessor stops writing.
        requeued = acquire(elsewhere(me, instance="1"))
        with pytest.raises(LeaseLost, match="now held by host node-b, job slurm 7, pid 4242"):
            first.check()
        assert "later incarnation of job slurm 7 (0 -> 1)" in caplog.text

        # take_over=true, from anywhere; the lease's old holder learns it at its next check.
        if where == "s3":  # ... also on a store that ignored conditions: the generation comparison catches it
            requeued.store.conditional = False
        forced = acquire(elsewhere(me, job=None, instance=None), take_over=True)
        with pytest.raises(LeaseLost):
            requeued.check()
        assert "run.take_over=true" in caplog.text
        requeued.release()  # a lost lease is not released: the holder's stays
        forced.check()

        # A holder on this machine whose process is gone (kill -9): taken at once.
        dead = acquire(replace(me, token="d" * 32, pid=dead_pid(), job=None), take_over=True)
        dead._stop.set()  # it stops beating, as a killed process would
        acquire(replace(me, token="e" * 32, job=None))  # the crashed holder is not waited for
        assert f"its process {dead.holder.pid} on this machine is gone" in caplog.text
        with pytest.raises(LeaseLost):
            dead.check()

        # A lease without a heartbeat for its own timeout (1 s) is stale; the store's clock says when.
        short = acquire(elsewhere(me, timeout_s=1.0, job=None), take_over=True)
        short._stop.set()
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                taker = acquire(replace(me, token="f" * 32, job=None))
                break
            except LeaseHeld:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert "it is stale: no heartbeat for" in caplog.text and "(its lease_timeout_s is 1)" in caplog.text
        with pytest.raises(LeaseLost):
            short.check()

        # A normal end releases it: the next run finds no lease.
        taker.release()
        before = len(caplog.records)
        fresh = acquire(replace(me, token="0" * 32))
        assert not [r for r in caplog.records[before:] if "taking over" in r.getMessage()], "it was free"
        fresh.release()
    finally:
        for lease in leases:
            lease.release()
    if where == "s3":
        assert storage.read_versioned(f"{out}/lease.json") is None
    else:
        # Taken over along the way: a last generation, marked released, stays (the only writer's would go).
        (last,) = (Path(out) / "lease").iterdir()
        assert json.loads(last.read_text())["released"] is True
        only = Lease.acquire(str(tmp_path / "fresh" / "run"), 30.0, False)
        only.release()
        assert not (tmp_path / "fresh").exists(), "a lease that only ever had one writer leaves nothing behind"


# ------------------------------------------------------------------------------------------------ processes
def wait_for(what: str, log: Path, proc: Run) -> None:
    deadline = time.monotonic() + PATIENCE
    while what not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["stale", "replacement"])
def test_a_second_run_refuses_a_stale_lease_is_taken_and_its_holder_stops_writing(
    how, shards, s3_bucket, s3_server, tmp_path
):
    """A holds the lease and is stuck uploading step 2 (its proxy holds the upload). C refuses to start. Then B
    takes the lease, resumes from step 1, and is held in its own step-2 upload:
    - stale: A is frozen first (SIGSTOP: alive, not beating, like a partitioned node), and B takes the lease once
      it is stale;
    - replacement: A stays alive and beating, and B is the next incarnation of A's job (a Kubernetes Job's
      replacement pod, ELECTRA_JOB_INSTANCE; a SLURM requeue is the same rule on SLURM_RESTART_COUNT), which
      takes over at once: the overlap of a live predecessor.
    A, released, finds its lease taken: it marks nothing complete and exits 1 naming B. B then completes steps 2
    and 3 and releases the lease."""
    from tests.faultproxy import FaultProxy

    bucket, run = s3_bucket.removeprefix("s3://"), f"{s3_bucket}/run"
    part2 = f"PUT /{bucket}/run/checkpoints/step_0000002/parts/node_0.json"
    common = ("train.max_steps=40", "checkpoint.every_steps=1", "run.lease_timeout_s=10")

    def incarnation(n: int) -> dict[str, str]:
        """The environment of incarnation n of A's job (none in the stale case: two unrelated runs)."""
        return {"ELECTRA_JOB_ID": "pretrain-small", "ELECTRA_JOB_INSTANCE": f"pod-{n}"} if how == "replacement" else {}

    def start(name: str, endpoint: str, *extra: str, **env: str) -> tuple[Run, Path]:
        log = tmp_path / f"{name}.log"
        args = pretrain_args(shards, run, *common, f"run.cache_dir={tmp_path / name}", *extra)
        return start_cli(args, env={"AWS_ENDPOINT_URL": endpoint, **env}, stderr=log), log

    with FaultProxy(s3_server.endpoint).start() as proxy_a, FaultProxy(s3_server.endpoint).start() as proxy_b:
        proxy_a.stall_after(0, match=part2)
        proxy_b.stall_after(0, match=part2)
        a, a_log = start("a", proxy_a.endpoint, **incarnation(1))
        b = None
        try:
            wait_for("waiting for the upload of step_0000002", a_log, a)

            c = run_cli(pretrain_args(shards, run, *common), check=False)
            print(c.stderr.strip().splitlines()[-1])
            assert c.returncode == 2, c.stderr[-3000:]
            (line,) = [x for x in c.stderr.splitlines() if "error:" in x]
            assert line.startswith(f"electra-scale pretrain: error: run.output_dir={run} is in use by another run")
            a_job = incarnation(1).get("ELECTRA_JOB_ID", "-")
            assert f"job {a_job}, pid {a.pid}, last heartbeat" in line
            assert "take over now with run.take_over=true" in line

            if how == "stale":
                a.send_signal(signal.SIGSTOP)
                deadline = time.monotonic() + PATIENCE
                while storage.read_versioned(f"{run}/lease.json")[2] <= 10:  # the store's clock: stale after 10 s
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
                b, b_log = start("b", proxy_b.endpoint, "train.stop_at_step=3")
                why = "it is stale"
            else:
                assert storage.read_versioned(f"{run}/lease.json")[2] < 10, "A's lease is fresh: it is beating"
                b, b_log = start("b", proxy_b.endpoint, "train.stop_at_step=3", **incarnation(2))
                why = "this is a later incarnation of job pretrain-small (pod-1 -> pod-2)"
            wait_for("waiting for the upload of step_0000002", b_log, b)
            text = b_log.read_text()
            assert "lease: taking over" in text and f"pid {a.pid}" in text and why in text
            assert "resumed from" in text and "at step 1" in text
            holder = json.loads(storage.read_text(f"{run}/lease.json"))
            assert holder["pid"] == b.pid

            a.send_signal(signal.SIGCONT)
            proxy_a.release()  # A's step-2 upload goes on: it must not mark the checkpoint complete
            assert a.wait(timeout=PATIENCE) == 1, a_log.read_text()[-3000:]
            error = [x for x in a_log.read_text().splitlines() if "electra-scale pretrain: error:" in x]
            print(error[-1])
            assert "checkpoint step_0000002 was not completed: this run lost its lease" in error[-1]
            assert f"now held by host {holder['host']}, job {a_job}, pid {b.pid}" in error[-1]
            assert "marks no checkpoint complete and prunes nothing" in error[-1]
            assert not storage.exists(f"{run}/checkpoints/step_0000002/COMPLETE")
            assert "checkpoint step_0000002 complete" not in a_log.read_text()

            proxy_b.release()
            assert b.wait(timeout=PATIENCE) == 0, b_log.read_text()[-3000:]
        finally:
            for proc in (a, b):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
    for step in (2, 3):
        marker = json.loads(storage.read_text(f"{run}/checkpoints/step_{step:07d}/COMPLETE"))
        assert marker["writer"] == holder["token"], f"step {step} was marked by B"
    assert storage.read_text(f"{run}/checkpoints/latest").strip() == "step_0000003"
    assert storage.read_versioned(f"{run}/lease.json") is None, "B's normal end released the lease"
