"""Held-out evaluation during pretraining (``eval.*``), as google-research/electra's ``--do_eval``: the run's own
objective on a fixed set of examples it never trains on, with no update, every ``eval.every_steps`` steps.

What makes two evaluations comparable, and training unchanged:

- **The same examples**: the first ``eval.examples`` of ``eval.shards`` (data/evalset.py), read once.
- **Dropout off**: the objective runs in eval mode, then goes back to train mode.
- **The same masks and generator samples**: they are keyed by (``eval.seed``, the example's index in the set)
  through the objective's counter-based hash (engine/objective.py), instead of (train seed, stream position),
  and sampled at ``objective.temperature``, the generator curriculum's end. So two evaluations of the same
  weights give the same record, on any number of ranks (up to the order of float sums), and runs with other
  train seeds are scored on the same masked tokens.
- **Training's randomness untouched**: the keyed hash draws nothing from torch's generators, and dropout is off;
  torch's RNG state (and the device's) is restored afterwards all the same (``torch.random.fork_rng``), so a
  library that draws in eval mode cannot shift training's dropout either. Losses with evaluation on are
  bit-identical to losses with it off (tests/test_train.py).

Each rank evaluates its share of the set; the metric sums (the AUC's histograms among them) stay on the device
and are summed over the ranks once per evaluation, in the one host all-reduce of ``step.all_reduce_host``. The
forward passes go through the DeepSpeed engine, which under ZeRO-3 gathers the parameters; every rank runs the
same number of them (data/evalset.py).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from electra_scale.config import Config
from electra_scale.data.evalset import eval_micro_batches, load_eval_manifest
from electra_scale.data.shards import Manifest
from electra_scale.engine.objective import summarize
from electra_scale.engine.step import all_reduce_host, objective_inputs

log = logging.getLogger("electra_scale")


class Evaluator:
    """The run's held-out evaluation: ``due(step)`` says when, ``run(engine, step)`` returns the record (on every
    rank; rank 0 logs it). Built at set-up, so a bad eval set stops the run before anything is written."""

    def __init__(self, cfg: Config, train_manifest: Manifest, rank: int, world_size: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.every, self.last = cfg.eval.every_steps, cfg.train.max_steps
        manifest = load_eval_manifest(cfg.eval.shards, train_manifest)
        self.batches, self.examples = eval_micro_batches(
            cfg.eval.shards, manifest, cfg.eval.examples, rank, world_size, cfg.train.micro_batch_size
        )
        if rank == 0 and self.examples < cfg.eval.examples:
            log.info(
                "eval: %s holds %d examples, fewer than eval.examples=%d: evaluating on all of them",
                cfg.eval.shards,
                self.examples,
                cfg.eval.examples,
            )

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    @torch.no_grad()
    def run(self, engine, step: int, group=None) -> dict:
        """Evaluate the engine's weights (a DeepSpeed engine, or the objective module itself): the record has the
        training records' metric names, plus the number of examples and the evaluation's wall time (this rank's).
        ``group``: the host all-reduce's (gloo)."""
        started = time.perf_counter()
        objective = getattr(engine, "module", engine)
        was_training = objective.training
        objective.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        sums: dict[str, torch.Tensor] = defaultdict(float)
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                for mb in self.batches:
                    out = engine(**objective_inputs(mb, self.cfg, self.device), eval_seed=self.cfg.eval.seed)
                    for key, value in out.items():
                        sums[key] += value.detach()  # on the device: one sync for the whole evaluation
        finally:
            objective.train(was_training)
        keys = sorted(sums)
        reduced = dict(zip(keys, all_reduce_host([sums[k] for k in keys], group)))
        record = summarize(reduced, self.cfg.objective.disc_weight)
        record.update(examples=self.examples, eval_time_s=time.perf_counter() - started)
        return record


def describe(step: int, record: dict) -> str:
    """The log line of an evaluation."""
    parts = [f"eval at step {step}", f"loss {record['loss']:.4f}", f"gen {record['gen_loss']:.3f}"]
    parts.append(f"gen_acc {record['gen_acc']:.3f}")
    if "disc_loss" in record:
        parts += [f"disc {record['disc_loss']:.4f}", f"disc_acc {record['disc_acc']:.3f}"]
        if record.get("disc_auc") is not None:
            parts.append(f"auc {record['disc_auc']:.3f}")
        parts += [f"precision {record['disc_precision']:.3f}", f"recall {record['disc_recall']:.3f}"]
    parts.append(f"{record['examples']} examples in {record['eval_time_s']:.1f}s")
    return " | ".join(parts)
