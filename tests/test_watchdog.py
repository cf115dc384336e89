"""No stuck or slow rank holds the job (engine/watchdog.py, engine/stragglers.py, engine/startup.py), with real
processes: 2 ranks on gloo, one frozen with SIGSTOP or slowed by SIGSTOP pulses (it runs a fifth of the time).

Timeouts come from the config (run.timeouts.step_s), and every bound a test waits for is that timeout plus a
generous margin: a loaded machine makes a test slower, never fail it. (The SLURM version, a frozen rank's job
requeueing itself and finishing, is in tests/test_slurm.py; the soak's "freeze" fault in scripts/soak.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from electra_scale.engine.checkpoint import MARKER
from tests.cli import PATIENCE, run_cli, start_cli
from tests.test_train import NO_DROPOUT, metrics, pretrain_args

STEPS, EVERY = 8, 4
STEP_S = 30  # run.timeouts.step_s of the frozen runs: a tiny step takes well under a second, even loaded
MARGIN = 240  # the watchdog looks every STEP_S / 50 s; the rest is the machine's load, generously


def common(*extra: str) -> tuple[str, ...]:
    return (f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", *NO_DROPOUT, *extra)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted run the resumed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_cli(pretrain_args(shards, str(out), *common()), ranks=2)
    return out


def wait_for(predicate, run, log: Path, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        assert run.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {PATIENCE}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_a_frozen_rank_is_named_by_the_other_which_exits_75_and_the_rerun_resumes_exactly(shards, reference, tmp_path):
    """Rank 1 frozen (SIGSTOP) past a complete checkpoint: rank 0 blocks in a step's collective (or a save's
    barrier); its watchdog names the phase, the step and what it waited for, and exits 75 within the timeout
    plus a margin. The frozen rank, thawed, ends too and saves nothing; the same command then resumes from the
    newest complete checkpoint and trains to step 8 with the reference's losses."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    # A save every 2 steps, complete before training goes on (async_upload=false): once step 3 is logged, step
    # 2's checkpoint is complete, and the run still has 5 steps and 3 saves to make before it could end (each
    # save waits for its node's uploader, a process of its own), so the freeze always lands before its end.
    # Wherever it lands, one of the two phases waits for rank 1: both get the same timeout.
    timeouts = (f"run.timeouts.step_s={STEP_S}", f"run.timeouts.checkpoint_s={STEP_S}")
    args = pretrain_args(
        shards, str(out), *common(*timeouts, "checkpoint.every_steps=2", "checkpoint.async_upload=false")
    )
    run = start_cli(args, ranks=2, stderr=log)
    frozen = run.procs[1].pid
    try:
        wait_for(lambda: "step 3/8 |" in log.read_text(), run, log, "step 3")
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        run.procs[0].join(STEP_S + MARGIN)
        detected = time.monotonic() - stopped
        assert run.procs[0].exitcode == 75, (run.procs[0].exitcode, log.read_text()[-3000:])
        # Thawed (SIGCONT) after its peer has gone, the frozen rank ends too, without a save: its phase is long
        # expired (its watchdog fires at its next look) or its collective fails on the closed connection.
        os.kill(frozen, signal.SIGCONT)
        run.procs[1].join(STEP_S + MARGIN)
        assert run.procs[1].exitcode not in (None, 0), run.procs[1].exitcode
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
        run.kill()
        run.close()
    text = log.read_text()
    print(f"\nthe thawed rank 1 exited {run.procs[1].exitcode}")
    (line,) = [x for x in text.splitlines() if "watchdog: rank 0 stuck" in x]
    pattern = r"watchdog: rank 0 stuck in (step|checkpoint) for (\d+)s at step (\d+), waiting for (.+) \(run\.timeouts"
    m = re.search(pattern, line)
    assert m, line
    assert STEP_S <= int(m.group(2)) <= detected + 1 and 3 <= int(m.group(3)) <= STEPS, line
    assert f"run.timeouts.{m.group(1)}_s={STEP_S}" in line and "exiting 75" in line
    complete = sorted(int(p.parent.name.removeprefix("step_")) for p in (out / "checkpoints").glob(f"step_*/{MARKER}"))
    assert complete and complete[-1] < STEPS, "nothing past the freeze was marked complete"
    print(f"\nfrozen rank 1: rank 0 exited 75 {detected:.1f}s after the SIGSTOP (step_s={STEP_S}):\n{line}")

    proc = run_cli(args, ranks=2)
    assert "resumed from" in proc.stderr and f"at step {complete[-1]}" in proc.stderr
    assert "its process" in proc.stderr and "is gone" in proc.stderr  # the lease of the dead rank 0, taken over
    ref, got = metrics(str(reference)), metrics(str(out))
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):  # the same ranks, data and RNG: the same numbers
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
    # Each start's first record says where its start-up time went: the new run's at step 1, the resume's next.
    assert [m["step"] for m in got if "startup" in m] == [1, complete[-1] + 1]
    startup = got[complete[-1]]["startup"]
    assert startup["checkpoint_fetch_s"] >= 0 and startup["first_step_s"] > 0 and startup["total_s"] > 0


def rank_pid(run, rank: int) -> int:
    """The process of one rank: the suite's own (one process a rank, forked: /proc's environ is the parent's), or
    under torchrun the child whose environment says RANK (its data loader workers share it: the first found,
    breadth first)."""
    if len(run.procs) > 1:
        return run.procs[rank].pid
    todo = [p.pid for p in run.procs]
    while todo:
        pid = todo.pop(0)
        with contextlib.suppress(OSError):
            if f"\0RANK={rank}\0" in "\0" + Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
                return pid
            todo += [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    raise AssertionError(f"no process of rank {rank} under {[p.pid for p in run.procs]}")


def test_a_rank_that_runs_a_fifth_of_the_time_is_named_the_straggler(shards, tmp_path):
    """Rank 1 runs a fifth of the time: stopped (SIGSTOP) for 80 ms of every 100 ms, as a node throttled by
    its host or sharing its cores would be, so its own time per step is about five times rank 0's whatever else
    the machine is doing (rank 0 is not stopped; its waits for rank 1 inside collectives are not its own time).
    The straggler warning names it; the records name it too. No sleep hook in the code under test."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = pretrain_args(
        shards,
        str(out),
        "train.max_steps=100",
        "train.log_every=4",  # a record averages 4 steps: one step's scheduling noise does not make a streak
        "checkpoint.every_steps=1000",
        "run.straggler.window=3",
        "data.num_workers=1",
    )
    run = start_cli(args, ranks=2, stderr=log)
    done = threading.Event()

    def throttle(pid: int) -> None:
        while not done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            done.wait(0.08)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            done.wait(0.02)

    throttler = None
    try:
        wait_for(lambda: "step 4/100 |" in log.read_text(), run, log, "the first logging step")
        throttler = threading.Thread(target=throttle, args=(rank_pid(run, 1),), daemon=True)
        throttler.start()
        assert run.wait(PATIENCE) == 0, log.read_text()[-3000:]
    finally:
        done.set()
        if throttler is not None:
            throttler.join()  # its last act is a SIGCONT: nothing is left stopped
        run.kill()
        run.close()
    text = log.read_text()
    warned = [x for x in text.splitlines() if "straggler: rank" in x and "is the slowest" in x]
    # Named, and only rank 1 ever (a warning withdrawn after a run of fast windows may come back: it is noisy).
    assert warned and all("straggler: rank 1 is the slowest" in x for x in warned), text[-3000:]
    withdrawn = [x for x in text.splitlines() if "straggler: rank 1 has recovered" in x]
    assert len(withdrawn) in (len(warned) - 1, len(warned))
    print(f"\n{warned[0]}")
    records = metrics(str(out))
    assert all(m["slowest_rank"] in (0, 1) and m["slowest_step_s"] > 0 for m in records)
    late = records[len(records) // 2 :]
    assert sum(m["slowest_rank"] == 1 for m in late) > len(late) // 2, [m["slowest_rank"] for m in late]
    print(json.dumps({k: v for k, v in records[-1].items() if k.startswith("slowest")}))


def test_the_default_timeouts_scale_with_the_model_and_bad_ones_are_refused():
    from electra_scale.config import ConfigError, load_config
    from electra_scale.engine.watchdog import process_group_timeout, resolve_timeouts

    tiny, large = (resolve_timeouts(load_config(f"configs/{name}.yaml")) for name in ("tiny", "large"))
    assert tiny["setup"] >= 600 and tiny["checkpoint"] >= 420 and tiny["step"] == 180
    assert large["setup"] > tiny["setup"] and large["checkpoint"] > tiny["checkpoint"], "a Large checkpoint is slower"
    assert large["step"] == tiny["step"] and large["eval"] == tiny["eval"]
    set_ = resolve_timeouts(load_config("configs/tiny.yaml", ["run.timeouts.setup_s=42", "run.timeouts.step_s=7"]))
    assert set_["setup"] == 42 and set_["step"] == 7
    assert process_group_timeout(large).total_seconds() == pytest.approx(max(large.values()))
    with pytest.raises(ConfigError, match=r"run.timeouts.step_s=0.0 is not allowed; it must be > 0 \(seconds\)"):
        load_config("configs/tiny.yaml", ["run.timeouts.step_s=0"])
    with pytest.raises(ConfigError, match=r"run.straggler.factor=1.0 is not allowed; it must be > 1"):
        load_config("configs/tiny.yaml", ["run.straggler.factor=1"])
