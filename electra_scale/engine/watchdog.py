"""A watchdog per rank: a job whose processes are all alive but one of them makes no progress ends, with the
restartable exit code, instead of waiting out the process group's 30-minute default in silence.

The loop marks where it is with cheap calls (a monotonic timestamp and a label, no lock, no collective, no host
sync): ``phase("step", step)`` as a step begins, ``waiting("the logging all-reduce")`` inside it where it knows
what it waits for. A daemon thread looks every few seconds; once the current phase has lasted longer than its
timeout (``run.timeouts``) it logs one line (the phase, how long, the step, what it waited for) and ends the
process with ``os._exit(75)``: a main thread stuck in a collective or a read cannot be unwound, and an exit that
ran atexit handlers or joined threads could hang on the same thing. The launcher (torchrun, SLURM through
slurm/common.sh, Kubernetes' podFailurePolicy) restarts on 75, and the run resumes from its last complete
checkpoint. Every rank has its own watchdog: the frozen rank's peers fire, each naming what it waited for.

What a firing must not do is mark anything complete. It writes nothing; the process dies with its threads. A
checkpoint's background upload is cut off where it is (the node's uploader process dies with its rank): COMPLETE is
written by rank 0 only after every node's file list is up (engine/checkpoint.py), so a checkpoint without the
marker is ignored on resume, and ``fired()`` stops the marker once the watchdog has decided. The lease
(engine/lease.py) is not released: the restart takes it over (its process is gone, or it is a later incarnation of
the same job); a predecessor that was frozen and is resumed later (SIGCONT) finds its phase long expired and exits
at the watchdog's next look, and in any case its lease check fails before any marker it might reach.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta

from electra_scale.config import Config
from electra_scale.infra import launch

log = logging.getLogger("electra_scale")

# Conservative bandwidth to object storage or disk for one checkpoint (engine/checkpoint.py's resume_budget
# assumes the same 25 MB/s): a Large run's defaults then stretch where its checkpoint does.
SLOW_BYTES_PER_S = 25e6
# Bytes a checkpoint holds per parameter: bf16/fp32 weights (model states) plus Adam's fp32 master copy and two
# moments (12 bytes, ZeRO shards them but every byte is written once).
CHECKPOINT_BYTES_PER_PARAM = 16

_fired = threading.Event()
_active: list[Watchdog] = []


def fired() -> bool:
    """The watchdog of this process has decided to end it: nothing may be marked complete any more."""
    return _fired.is_set()


def checkpoint_bytes(cfg: Config) -> int:
    """The checkpoint's size, estimated from the model's parameter count (meta device, no memory)."""
    from electra_scale.engine.model import param_counts

    return param_counts(cfg)["total_params"] * CHECKPOINT_BYTES_PER_PARAM


def resolve_timeouts(cfg: Config) -> dict[str, float]:
    """``run.timeouts`` with the nulls derived from the model's size. Reasoning (docs/faults.md, "Hangs"):

    - setup: NVRx's 600 s for starting processes and the rendezvous, plus three passes over the checkpoint at
      25 MB/s (download, hash, universal conversion: the budget engine/checkpoint.py's resume gives the same
      work). It also covers the first step of every start, which compiles and JITs.
    - step: NVRx's 180 s, fixed: a step is seconds even for Large at 512 ranks; 180 s is a hang.
    - checkpoint: NVRx's 420 s, plus two passes at 25 MB/s: a save first waits for the previous upload
      (hash and upload of this rank's share, all of it on one rank at worst) and then writes locally.
    - eval: 600 s, fixed: eval.examples (1024 by default) forward passes with no update.
    """
    t = cfg.run.timeouts
    size = checkpoint_bytes(cfg) if t.setup_s is None or t.checkpoint_s is None else 0
    return {
        "setup": t.setup_s if t.setup_s is not None else 600.0 + 3 * size / SLOW_BYTES_PER_S,
        "step": t.step_s,
        "checkpoint": t.checkpoint_s if t.checkpoint_s is not None else 420.0 + 2 * size / SLOW_BYTES_PER_S,
        "eval": t.eval_s,
    }


def process_group_timeout(limits: dict[str, float]) -> timedelta:
    """The process group's own timeout: the longest phase, so that a collective that waits legitimately (a
    barrier behind a long save) is never cut, while one blocked on a dead peer is released (gloo honours it)."""
    return timedelta(seconds=max(limits.values()))


class Watchdog:
    """The phase this rank is in, and the thread that ends the process when it lasts too long."""

    def __init__(self, limits: dict[str, float], rank: int, exit_code: int, poll_s: float | None = None):
        self.limits, self.rank, self.exit_code = limits, rank, exit_code
        # (phase, started, step, waiting for, limit, the config key): replaced whole, so the thread never sees
        # half an update (one reference assignment under the GIL).
        self._now: tuple | None = None
        self._stop = threading.Event()
        # Look often enough to fire within a few per cent of the shortest timeout; never busy.
        self.poll_s = poll_s or min(5.0, max(0.1, min(limits.values()) / 50))
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()
        _active.append(self)

    def phase(self, name: str, step: int | None = None, waiting: str | None = None, limit: str | None = None):
        """Enter ``name`` now (its timeout is ``limit``'s, by default its own). ``step``: the step it is for."""
        key = limit or name
        self._now = (name, time.monotonic(), step, waiting, self.limits[key], key)

    def waiting(self, what: str) -> None:
        """Within the phase, what the rank now waits for (the phase's clock runs on)."""
        now = self._now
        if now is not None:
            self._now = (now[0], now[1], now[2], what, now[4], now[5])

    def idle(self) -> None:
        """No phase: nothing is timed (the run is over, or in code the loop does not mark)."""
        self._now = None

    def close(self) -> None:
        self._now = None
        self._stop.set()
        if self in _active:
            _active.remove(self)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = self._now
            if now is not None and time.monotonic() - now[1] > now[4]:
                self._fire(now)

    def _fire(self, now: tuple) -> None:
        name, started, step, waiting, limit, key = now
        _fired.set()
        at = f" at step {step}" if step is not None else ""
        what = f", waiting for {waiting}" if waiting else ""
        log.error(
            "watchdog: rank %d stuck in %s for %.0fs%s%s (run.timeouts.%s_s=%g); exiting %d so that the launcher "
            "restarts the run from its last complete checkpoint",
            self.rank,
            name,
            time.monotonic() - started,
            at,
            what,
            key,
            limit,
            self.exit_code,
        )
        _end_descendants()  # data loader workers (and their forkserver) would outlive an os._exit
        with contextlib.suppress(Exception):  # a Kubernetes pod's torchrun says 1; its supervisor then says 75
            launch.mark_preempted()
        for stream in [*logging.getLogger().handlers, *log.handlers, sys.stdout, sys.stderr]:
            with contextlib.suppress(Exception):  # a broken stream must not keep a stuck process alive
                stream.flush()
        os._exit(self.exit_code)


def _end_descendants() -> None:
    """SIGKILL this process's descendants (Linux /proc; elsewhere nothing)."""
    todo, found = [os.getpid()], []
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                todo += children
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def close_all() -> None:
    """Stop every watchdog of this process (the run ended, normally or by an error the CLI reports)."""
    for dog in list(_active):
        dog.close()


def start(cfg: Config, rank: int, exit_code: int) -> Watchdog:
    """This rank's watchdog, in the setup phase from now on; rank 0 logs the timeouts once."""
    limits = resolve_timeouts(cfg)
    dog = Watchdog(limits, rank, exit_code)
    dog.phase("setup", waiting="distributed init (every rank's rendezvous)")
    if rank == 0:
        log.info(
            "watchdog: timeouts %s (run.timeouts); the process group's %.0fs",
            ", ".join(f"{k} {v:.0f}s" for k, v in limits.items()),
            process_group_timeout(limits).total_seconds(),
        )
    return dog
