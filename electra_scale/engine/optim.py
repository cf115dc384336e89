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


def fused_adam_available() -> bool:
    """Can DeepSpeed's FusedAdam (its Adam on GPUs) be had here: prebuilt into the installed DeepSpeed
    (``DS_BUILD_FUSED_ADAM=1``, as in our image), or compiled at first use, which needs nvcc and ninja."""
    import importlib.util
    import os
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return True
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    return bool(nvcc) and bool(shutil.which("ninja") or importlib.util.find_spec("ninja"))


def choose_adam(ds_config: dict, device: torch.device) -> None:
    """Settle the optimizer for this device, before ``deepspeed.initialize``: torch's AdamW runs fused on a GPU
    (one kernel for all tensors); DeepSpeed's Adam, which optim.bias_correction=false needs, must be buildable,
    or the run stops here with the ways out rather than deep inside DeepSpeed."""
    from electra_scale.config import ConfigError

    if device.type != "cuda":
        return
    params = ds_config["optimizer"]["params"]
    if params.get("torch_adam"):
        params["fused"] = True
    elif not fused_adam_available():
        raise ConfigError(
            "optim.bias_correction=false needs DeepSpeed's FusedAdam, which is not prebuilt in this DeepSpeed and "
            "cannot be compiled here (no nvcc or ninja): use the electra-scale image (built with "
            "DS_BUILD_FUSED_ADAM=1), install the CUDA toolkit, or set optim.bias_correction=true for torch's "
            "fused AdamW (the same after the first few thousand steps of warmup)"
        )
    else:
        deepspeed_arch_list()


def deepspeed_arch_list() -> str | None:
    """Make TORCH_CUDA_ARCH_LIST readable to DeepSpeed's JIT builder, which takes each entry as numbers and fails
    on the architecture suffixes that CUDA 12+ images set ("9.0a", "10.0f": "invalid literal for int() ... '0a'",
    seen on our H200 image). The suffix enables arch-specific instructions that FusedAdam does not use, so the
    plain architecture builds the same kernel. Returns the list now in force (None when unset)."""
    import os
    import re

    raw = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not raw:
        return None
    entries = [e for e in re.split(r"[;\s]+", raw.strip()) if e]
    fixed = []
    for entry in entries:
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry)
        if m:  # anything else (names like "Hopper") is left for DeepSpeed to refuse in its own words
            entry = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}"
        if entry not in fixed:
            fixed.append(entry)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)
    return os.environ["TORCH_CUDA_ARCH_LIST"]
