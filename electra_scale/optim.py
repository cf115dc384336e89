"""ELECTRA's optimisation: Adam(W) with weight decay off for biases and LayerNorm, and the reference's
schedule, linear warmup multiplied onto linear decay to zero (``optimization.py`` in google-research/electra).

The optimizer itself is DeepSpeed's (built from the JSON that ``config.deepspeed_config`` fills in), so ZeRO
can shard its state; here we only hand it the parameter groups and the schedule.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY = ("bias", "LayerNorm", "layer_norm")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared tensors are listed once
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def electra_lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """lr(step) / peak lr. The reference uses the step count *before* the update, so step 0 gets lr 0."""
    decay = max(0.0, 1.0 - step / total_steps)
    warmup = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return decay * warmup


def electra_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, partial(electra_lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))
