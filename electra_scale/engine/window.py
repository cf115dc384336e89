"""One logging window of the pretraining loop: what the steps between two logging steps add up, and the
record those sums become at the logging step.

The metric sums stay on the device (one host copy per logging step, not per metric); the host's own counts
(data wait, real tokens, each source's draws, skipped blocks) ride along in the same all-reduce
(``step.all_reduce_host``): a logging step adds no collective of its own.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from electra_scale.engine.model import training_flops
from electra_scale.engine.objective import summarize
from electra_scale.engine.step import all_reduce_host, real_counts


class LogWindow:
    def __init__(
        self, cfg, stream, sources, world: int, peak: float | None, start_step: int, host_group=None, stragglers=None
    ):
        self.cfg, self.stream, self.sources, self.world, self.peak = cfg, stream, sources, world, peak
        self.host_group, self.stragglers = host_group, stragglers  # stragglers: engine/stragglers.py, or None
        self.mixed = len(sources) > 1
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len  # positions, padding included
        self.source_examples = stream.source_examples(start_step)  # all ranks' draws of each source so far
        self.skipped_logged = 0
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0
        self.real_tokens, self.real_pairs = 0, 0  # this rank's: throughput and FLOPs count what is not padding
        self.source_window = [0] * len(self.sources)  # this rank's draws of each source
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)

    def add_batches(self, micro_batches, waited_s: float) -> None:
        """A step's input: how long the step blocked on it, and what in it is not padding."""
        self.steps += 1
        self.data_wait += waited_s
        tokens, pairs = real_counts(micro_batches)
        self.real_tokens, self.real_pairs = self.real_tokens + tokens, self.real_pairs + pairs
        if self.mixed:
            drawn = torch.bincount(torch.cat([mb.sources for mb in micro_batches]), minlength=len(self.sources))
            self.source_window = [a + b for a, b in zip(self.source_window, drawn.tolist())]

    def add_outputs(self, out: dict[str, torch.Tensor]) -> None:
        for key, value in out.items():
            self.sums[key] += value.detach()  # stays on the device: one sync per logging step, not per metric

    def exclude(self, seconds: float) -> None:
        """Leave time out of the window's throughput (a held-out evaluation)."""
        self.start += seconds

    def record(self, done: int, lr: float, grad_norm: float, main: bool = True) -> dict:
        """The window's metrics summed over every rank (one all-reduce), as metrics.jsonl's record. The loop
        starts the next window (``reset``) once it has logged the record: logging is outside every window."""
        cfg, stream, world = self.cfg, self.stream, self.world
        keys = sorted(self.sums)
        values = [self.sums[k] for k in keys]  # device tensors, the AUC's histograms among them
        values += [float(len(stream.skipped) - self.skipped_logged), self.data_wait]
        values += [float(self.real_tokens), float(self.real_pairs)]
        values += [float(n) for n in self.source_window]  # rides along: no collective of its own
        if self.stragglers is not None:
            values += self.stragglers.slots(self.data_wait, self.steps)  # each rank's own slot of W + W
        n_sources = len(self.sources)
        summed = all_reduce_host(values, self.host_group)
        straggler_slots = []
        if self.stragglers is not None:
            summed, straggler_slots = summed[: -self.stragglers.size], summed[-self.stragglers.size :]
        *reduced_values, skipped_new, wait_sum, tokens, pairs = summed[: len(summed) - n_sources]
        drawn = summed[len(summed) - n_sources :]
        self.source_examples = [n + round(d) for n, d in zip(self.source_examples, drawn)]
        self.skipped_logged = len(stream.skipped)
        elapsed = time.perf_counter() - self.start
        record = summarize(dict(zip(keys, reduced_values)), cfg.objective.disc_weight)
        tflops = training_flops(cfg, tokens, pairs) / elapsed / 1e12
        record.update(
            lr=lr,
            grad_norm=grad_norm,
            step_time_s=elapsed / self.steps,
            tokens_per_s=tokens / elapsed,  # real tokens (not padding), all ranks
            pad_frac=1.0 - tokens / (self.steps * self.tokens_per_step),  # positions of the batches that are padding
            tflops=tflops,
            mfu=tflops / self.peak / world if self.peak else None,
            samples_seen=done * cfg.train.global_batch_size,
            # Share of the window's wall time the ranks spent blocked on their next batch (mean over ranks).
            data_wait=wait_sum / world / elapsed,
            skipped_blocks=skipped_new,  # bad blocks left out in this window, all ranks (data.on_corrupt_shard)
        )
        if self.stragglers is not None:
            record.update(self.stragglers.report(done, straggler_slots, main))
        if self.mixed:  # each source's examples so far, and the epochs of it they make (each source has its own)
            record["source_examples"] = dict(zip(stream.source_names, self.source_examples))
            record["source_epochs"] = {
                s.name: round(n / layout.epoch_size, 4)
                for s, n, layout in zip(self.sources, self.source_examples, stream.layouts)
            }
        return record
