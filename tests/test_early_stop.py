"""A stop signal that reaches `electra-scale pretrain` while it still imports torch (engine/early_stop.py): on a
loaded node SLURM's time-limit USR1 can come that early, and a task killed by it never saves, nor does a
requeued one that starts as slowly (the flake of tests/test_slurm.py's time-limit test)."""

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
    # Without the early handler the process dies of the signal (-10) before it has a run to stop.
    assert proc.returncode == 75, err[-3000:]
    assert err.index("test: SIGUSR1 sent while importing torch") < err.index("SIGUSR1 received: stopping"), err[-3000:]
    # Adopted as a signal during set-up: the run goes on to train (so that an incarnation signalled while it
    # starts still makes progress), stops within its first two steps (the stop vote lags one step) and saves.
    stopped = int(re.search(r"stopped at step (\d+) by a signal", err).group(1))
    assert 1 <= stopped <= 2, stopped
    assert (Path(out) / "checkpoints" / f"step_{stopped:07d}" / "COMPLETE").exists()
    assert [m["step"] for m in metrics(str(out))] == list(range(1, stopped + 1))


def test_a_signal_recorded_before_the_run_is_adopted_by_its_stop_request():
    """The hand-over itself, in this process: what early_stop recorded becomes the run's stop request, once."""
    from electra_scale.engine import early_stop
    from electra_scale.engine.train import StopRequest

    before = {sig: signal.getsignal(sig) for sig in early_stop.SIGNALS}
    try:
        early_stop.install()
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)  # a second one changes nothing
        stop = StopRequest()
        assert stop.requested and stop.signal_name == "SIGTERM"
        stop.restore()
        assert not StopRequest().requested, "handed over once"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
