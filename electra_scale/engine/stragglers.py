"""Which rank is slow: each rank's own time per step rides on the logging all-reduce the loop already makes.

A rank's step time as a clock sees it is the same on every rank: the fast ones wait for the slow one inside the
step's collectives. What differs is the time a rank spends on its own: its forward passes (no collective in
them at ZeRO-0/1/2; ZeRO-3's parameter gathers are in them) and its wait for the next batch. That is what is
measured: forward hooks on the objective take a timestamp on the host (CPU) or record CUDA events (GPU; read
at logging steps, which already synchronise), and the loop's ``data_wait`` is this rank's. Each rank fills its
own slot of a vector of W + W floats (own time, data wait, per step), appended to the logging all-reduce's
values: summed, every rank has every rank's numbers, with no collective of its own (4 KiB more at W = 512,
at logging steps only).

The record gets ``slowest_rank``, its ``slowest_step_s`` and ``slowest_data_wait_s``, and ``slowest_vs_median``:
its time over the median of the other ranks'. A rank that stays slowest by more than ``run.straggler.factor``
for ``run.straggler.window`` logging steps in a row is named in one warning, withdrawn in one line when it has
not been for as many (as metrics.DiscriminatorHealth withdraws its warning).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from electra_scale.config import StragglerConfig

log = logging.getLogger("electra_scale")


class StragglerReport:
    def __init__(self, rank: int, world: int, cfg: StragglerConfig, module: torch.nn.Module, device: torch.device):
        self.rank, self.world, self.cfg = rank, world, cfg
        self.cuda = device.type == "cuda"
        self._spans: list = []  # this window's forward passes: (start, end) events on GPU; seconds on CPU
        self._started = None
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)
        self.named: int | None = None  # the rank named in a standing warning
        self._streak: tuple[int | None, int] = (None, 0)  # (rank, logging steps in a row it was over the factor)
        self._recovered = 0  # logging steps in a row the named rank was not over the factor

    @property
    def size(self) -> int:
        return 2 * self.world

    def _before(self, module, _args) -> None:
        if not module.training:  # a held-out evaluation's forward passes are not steps
            return
        if self.cuda:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def _after(self, _module, _args, _out) -> None:
        if self._started is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._started, end))
        else:
            self._spans.append(time.perf_counter() - self._started)
        self._started = None

    def slots(self, data_wait: float, steps: int) -> list[float]:
        """This window's W + W slots, this rank's filled: (forward + data wait) per step, data wait per step.
        Called at logging steps only (on GPU it waits for the window's last forward pass to end)."""
        if self.cuda and self._spans:
            self._spans[-1][1].synchronize()
            forward = sum(start.elapsed_time(end) for start, end in self._spans) / 1000
        else:
            forward = float(sum(self._spans))
        self._spans.clear()
        out = [0.0] * self.size
        steps = max(steps, 1)
        out[self.rank] = (forward + data_wait) / steps
        out[self.world + self.rank] = data_wait / steps
        return out

    def report(self, step: int, summed: list[float], main: bool) -> dict:
        """The record's fields from the summed slots; on ``main``, the warning (or its withdrawal)."""
        if self.world < 2:
            return {}
        own, wait = summed[: self.world], summed[self.world :]
        slowest = max(range(self.world), key=lambda r: own[r])
        others = statistics.median(own[r] for r in range(self.world) if r != slowest)
        ratio = own[slowest] / others if others > 0 else float("inf") if own[slowest] > 0 else 1.0
        if main:
            self._judge(step, slowest, ratio, own[slowest], others)
        return {
            "slowest_rank": slowest,
            "slowest_step_s": own[slowest],
            "slowest_data_wait_s": wait[slowest],
            "slowest_vs_median": ratio if ratio != float("inf") else None,
        }

    def _judge(self, step: int, slowest: int, ratio: float, seconds: float, median: float) -> None:
        over = ratio > self.cfg.factor
        if self.named is not None:
            # Withdrawn after as many logging steps in a row without it as it took to name it: one slow window
            # more or less does not make the warning come and go.
            self._recovered = 0 if over and slowest == self.named else self._recovered + 1
            if self._recovered >= self.cfg.window:
                log.info(
                    "straggler: rank %d has recovered at step %d (for %d logging steps; the slowest is now rank %d "
                    "at %.2fx the median of the others); the warning no longer holds",
                    self.named,
                    step,
                    self._recovered,
                    slowest,
                    ratio,
                )
                self.named, self._streak = None, (None, 0)
            return
        rank, count = self._streak
        self._streak = (slowest, count + 1 if rank == slowest else 1) if over else (None, 0)
        if self._streak[1] >= self.cfg.window:
            self.named, self._recovered = slowest, 0
            log.warning(
                "straggler: rank %d is the slowest for %d logging steps in a row, at step %d %.3fs of its own per "
                "step (forward passes + data wait) against the others' median %.3fs (%.2fx; run.straggler.factor="
                "%g): every rank waits for it. Check its node (GPU clocks, thermal throttling, a noisy neighbour, "
                "its data reads)",
                slowest,
                self._streak[1],
                step,
                seconds,
                median,
                ratio,
                self.cfg.factor,
            )
