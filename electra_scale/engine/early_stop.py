"""A stop signal that arrives while the run is still starting.

SLURM's ``--signal=USR1@N`` reaches the training step's processes at a time set by the job's end, not by the
run's progress, and Kubernetes' or SLURM preemption's SIGTERM comes whenever it comes. On a loaded node a task
can still be starting at that moment, and two things then went wrong:

- the task was still importing torch and DeepSpeed (tens of seconds under load), before the run's StopRequest
  (engine/train.py) had a handler: USR1's default action ended it (srun: 138) with nothing saved, and a requeued
  run that started as slowly died the same way, again and again;
- SLURM signals every process of the step, children included: DeepSpeed's JIT op build (`ninja`, run at every
  start, in ``deepspeed.init_distributed`` and the engine's build) died of it, and the run failed (exit 1,
  the job FAILED rather than requeued).

So ``electra-scale pretrain`` blocks both signals on its first line (``hold``), before its heavy imports. A
blocked signal waits, pending; the processes started meanwhile inherit the mask, so a ``ninja`` finishes its
check or build whatever the scheduler sends. The run unblocks them once its engine is built (``release``), where
StopRequest's handler exists: a signal that came during the start is handled there, exactly as one during
set-up, and the run stops after its first steps with a checkpoint. It does not exit at once because each
incarnation must make progress even where every one of them is signalled while it starts. (Data-loader
workers start after the release, with the run's handlers, as before.)

This module imports nothing but the standard library: it must be cheap to import before anything else.
"""

from __future__ import annotations

import signal

SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1})

_held = False


def hold() -> None:
    """Block SIGTERM/SIGUSR1 in this process and the processes and threads it starts (the CLI's first line)."""
    global _held
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _held = True


def release() -> None:
    """Unblock them: one that came while they were held is handled now, by the handler then installed. A no-op
    in a process that never held them (a tool that runs pretrain in-process keeps its own mask)."""
    global _held
    if _held:
        _held = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def take() -> int | None:
    """The signal that came while they were held (None if none), consumed rather than handled; and release."""
    received = None
    if _held and signal.sigpending() & SIGNALS:
        info = signal.sigtimedwait(SIGNALS, 0)
        received = info.si_signo if info is not None else None
    release()
    return received
