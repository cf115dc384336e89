"""What a fine-tuning or probing run is told: the task's settings, the seeds, and where downloaded tasks are cached."""

from __future__ import annotations

from dataclasses import dataclass, field

from electra_scale.config import ConfigError, cache_root

DEFAULT_CACHE = cache_root() / "tasks"


# Logistic/ridge regularisation grid, chosen on dev. No 1e-4: with a few hundred examples in 64-256 standardised
# dimensions it is unregularised in effect, and its fit took more L-BFGS iterations than the other four together.
PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class FinetuneConfig:
    lr: float = 3e-4  # the reference's ELECTRA-Small value (Base 1e-4, Large 5e-5)
    layer_decay: float = 0.8  # 0.8 for Small and Base, 0.9 for Large
    epochs: int = 3
    batch_size: int = 32
    max_seq_len: int = 128
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train_limit: int | None = None  # low-resource setting: this many training examples per seed
    # few-label setting: K examples of each class per seed (eval/draw.py: the same draw for every model at a seed)
    per_class: int | None = None
    finetune: bool = True
    probe: bool = False
    eval_batch_size: int = 128

    def check(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"finetune: {what}")

        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(0 < self.layer_decay <= 1, f"layer_decay={self.layer_decay} must be in (0, 1]")
        need(self.epochs > 0, f"epochs={self.epochs} must be > 0")
        need(self.batch_size > 0, f"batch_size={self.batch_size} must be > 0")
        need(self.max_seq_len >= 8, f"max_seq_len={self.max_seq_len} must be >= 8")
        need(0 <= self.warmup_frac < 1, f"warmup_frac={self.warmup_frac} must be in [0, 1)")
        need(len(self.seeds) > 0, "give at least one seed")
        need(self.train_limit is None or self.train_limit > 0, f"train_limit={self.train_limit} must be > 0")
        need(self.per_class is None or self.per_class > 0, f"per_class={self.per_class} must be > 0")
        need(self.per_class is None or self.train_limit is None, "give per_class or train_limit, not both")
        need(self.finetune or self.probe, "nothing to do: enable fine-tuning or the probe")
