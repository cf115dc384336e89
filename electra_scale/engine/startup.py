"""Restart latency, measured: where a start's time goes, from the process's birth to its first step done.

A restart's GPU-hours are lost from the failure to the first step after it. The launcher's part (a requeue,
a new pod) is outside the process; from the process's start on, each part is a mark here: imports (the kernel's
process start time to ``pretrain``, DeepSpeed's import included), distributed init (the rendezvous: it ends
when the slowest rank has joined, so another rank's slower start shows here), the run's inputs and lease,
checkpoint fetch and verify, the engine, checkpoint load, the data stream's seek to the resumed step (its first
batches), and the first step (compile and JIT included). Rank 0 logs them once per start in one line, and the
first metrics.jsonl record of the start carries them under ``startup`` (with the wall-clock times of the process
start and the first step, so that a supervisor that knows when the failure was, scripts/soak.py, can add the
launcher's part).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("electra_scale")

PARTS = {
    "imports": "imports",
    "distributed_init": "distributed init",
    "inputs_and_lease": "inputs and lease",
    "checkpoint_fetch": "checkpoint fetch + verify",
    "engine": "engine build",
    "checkpoint_load": "checkpoint load",
    "data_seek": "data stream seek",
    "first_step": "first step",
}


def process_start_time() -> float:
    """This process's start, wall-clock seconds (Linux: /proc; elsewhere: now, so imports count as 0)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class StartupClock:
    def __init__(self):
        self.process_start = process_start_time()
        # DeepSpeed is imported lazily (by launch.init_distributed): imported here, so that its seconds count as
        # imports, not as distributed init.
        import deepspeed  # noqa: F401

        now = time.time()
        self.parts: dict[str, float] = {"imports": max(0.0, now - self.process_start)}
        self._last = time.monotonic()
        self.record: dict | None = None  # once the first step is done: what the first logging record carries

    def mark(self, part: str) -> None:
        """``part`` ended now (it began where the previous one ended)."""
        now = time.monotonic()
        self.parts[part] = self.parts.get(part, 0.0) + now - self._last
        self._last = now

    def first_step_done(self, main: bool, resumed_from: str | None) -> None:
        self.mark("first_step")
        total = sum(self.parts.values())
        self.record = {f"{k}_s": round(v, 3) for k, v in self.parts.items()}
        self.record.update(total_s=round(total, 3), process_start=round(self.process_start, 3))
        self.record["first_step_at"] = round(time.time(), 3)
        if main:
            log.info(
                "startup: %s; %.1fs from process start to the first step done (%s)",
                ", ".join(f"{PARTS[k]} {v:.1f}s" for k, v in self.parts.items()),
                total,
                f"resumed from {resumed_from}" if resumed_from else "a new run",
            )

    def take(self) -> dict:
        """The record for the first logging step of this start (then nothing more)."""
        record, self.record = self.record, None
        return {"startup": record} if record else {}
