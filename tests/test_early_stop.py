"""A stop signal that reaches `electra-scale pretrain` while it still starts (engine/early_stop.py): on a loaded
node SLURM's time-limit USR1 can come while a task imports torch, or while DeepSpeed's `ninja` runs, and a task
killed by it never saves, nor does a requeued one that starts as slowly (the flake of
tests/test_slurm_requeue.py's time-limit test)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.cli import PATIENCE, ROOT
from tests.test_train import metrics, pretrain_args

# A fresh interpreter, as srun starts each task, told to send itself SIGUSR1 the moment it starts importing torch
# (an audit hook; the signal is real and the CLI is the real one): the signal lands at a known point of the
# start-up, before any handler of the run exists, however fast or slow this machine is.
SIGNAL_AT_TORCH_IMPORT = """
import os, signal, sys

def hook(event, args):
    if event == "import" and args[0] == "torch" and not hook.sent:
        hook.sent = True
        print("test: SIGUSR1 sent while importing torch", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

hook.sent = False
sys.addaudithook(hook)
from electra_scale.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


def test_a_signal_while_the_cli_imports_torch_stops_the_run_with_a_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(shards, str(out), "train.max_steps=400", "checkpoint.every_steps=1000")
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_TORCH_IMPORT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    err = proc.stderr
    # Without the signals held from the CLI's first line the process dies of it (-10) before it has a run.
    assert proc.returncode == 75, err[-3000:]
    assert err.index("test: SIGUSR1 sent while importing torch") < err.index("SIGUSR1 received: stopping"), err[-3000:]
    # Adopted as a signal during set-up: the run goes on to train (so that an incarnation signalled while it
    # starts still makes progress), stops within its first two steps (the stop vote lags one step) and saves.
    stopped = int(re.search(r"stopped at step (\d+) by a signal", err).group(1))
    assert 1 <= stopped <= 2, stopped
    assert (Path(out) / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").exists()
    assert [m["step"] for m in metrics(str(out))] == list(range(1, stopped + 1))


def test_a_signal_held_during_the_start_reaches_the_run_and_spares_the_processes_started_meanwhile():
    """In this process: what comes while the signals are held is handled once released, by the run's handler;
    and a process started meanwhile (DeepSpeed's `ninja`, which SLURM's signal reaches too) survives it."""
    from electra_scale.engine import early_stop
    from electra_scale.engine.train import StopRequest

    stop = StopRequest()
    try:
        early_stop.hold()
        child = subprocess.run(
            [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR1); print('alive')"],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
        assert (child.returncode, child.stdout) == (0, "alive\n"), "the child inherits the held signals"
        signal.raise_signal(signal.SIGTERM)
        assert not stop.requested, "held, not yet handled"
        early_stop.release()
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        early_stop.release()
        stop.restore()
