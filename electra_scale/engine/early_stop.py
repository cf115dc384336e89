"""A stop signal that arrives before the run can act on it.

SLURM's ``--signal=USR1@N`` reaches the training step's tasks at a time set by the job's end, not by the run's
progress, and Kubernetes' or SLURM preemption's SIGTERM comes whenever it comes. On a loaded node a task can
still be importing torch and DeepSpeed (tens of seconds) at that moment; SIGUSR1's and SIGTERM's default action
ends the process, so the checkpoint the signal asks for never happens (srun reports the task killed by the
signal, 138 for USR1), and a requeued run that starts as slowly is killed the same way, again and again: no
incarnation ever trains a step.

``electra-scale pretrain`` therefore calls ``install()`` first thing, before its heavy imports: from then on a
signal is only recorded, and the run's ``StopRequest`` (engine/train.py) adopts it, exactly as a signal that
comes during set-up: the run goes on to its first steps, checkpoints and exits 75. It does not exit at once
because each incarnation must make progress even where every one of them is signalled while it starts.

This module imports nothing but the standard library: it must be cheap to import before anything else.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None


def _record(signum, _frame) -> None:
    global _received
    if _received is None:  # the first one counts; a second changes nothing, as for StopRequest
        _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on instead of dying of them (the process's first thing)."""
    for sig in SIGNALS:
        signal.signal(sig, _record)


def take() -> int | None:
    """The signal recorded since ``install()`` (None if none), handed over once."""
    global _received
    signum, _received = _received, None
    return signum


def uninstall() -> int | None:
    """The signals' default actions back (a process that will not train itself: a pod's supervisor); the
    signal recorded meanwhile, if any."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    return take()
