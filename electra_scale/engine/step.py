"""One training step, and the DeepSpeed engine it runs on: the code ``pretrain``, ``bench`` and the probe scripts
share, so that what is measured and what trains are the same thing.

    engine = build_engine(cfg, objective, world_size, device)
    outs = train_step(engine, micro_batches, cfg, device, world_size)

One optimizer step is one *global* batch: this rank's ``grad_accum`` micro-batches (data/stream.py). Its loss is
normalised by the global batch's target counts, known from the data before the forward pass and summed over
the ranks on the device (``global_counts``), so 2 ranks x B trains exactly like 1 rank x 2B.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from electra_scale.config import Config, ConfigError, deepspeed_config
from electra_scale.engine.masking import count_batch_targets, max_predictions, predictions_for
from electra_scale.engine.model import prepare_encoders
from electra_scale.engine.objective import training_loss
from electra_scale.engine.optim import choose_adam, electra_schedule, param_groups
from electra_scale.engine.packing import pack


def settle_device(cfg: Config, device: torch.device) -> None:
    """What every path that trains or times a step sets first, in one place (pretrain, bench's bare and engine
    loops, --find-micro-batch, scripts/step_profile.py, engine_profile.py, objective_cost.py), so that their
    figures compare: TF32 for the fp32 matmuls of a bf16/fp16 run, and padding-free batches refused in fp32 on
    a GPU, whose FlashAttention variable-length kernel takes bf16 or fp16 only."""
    if device.type != "cuda":
        return
    if cfg.train.unpad and cfg.train.precision == "fp32":
        raise ConfigError(
            "train.unpad=true on a GPU needs train.precision=bf16 or fp16 (FlashAttention's variable-length kernel "
            "has no fp32); set train.precision=bf16, or train.unpad=false to train fp32 on padded batches"
        )
    if cfg.train.precision != "fp32":
        # The only fp32 matmul of a bf16/fp16 run is the vocabulary projection (objective.masked_lm_logits),
        # whose inputs are bf16/fp16 values: TF32 tensor cores compute it exactly, at half the bf16 rate.
        torch.backends.cuda.matmul.allow_tf32 = True


def build_engine(cfg: Config, objective: torch.nn.Module, world_size: int, device: torch.device, universal=False):
    """The DeepSpeed engine for ``objective``: the run's DeepSpeed JSON filled from ``cfg``
    (``config.deepspeed_config``), the optimizer settled for the device, the encoders prepared
    (activation checkpointing, compile) and ELECTRA's LR schedule. ``universal``: it will load a checkpoint
    converted from another world size."""
    import deepspeed

    settle_device(cfg, device)
    ds_config = deepspeed_config(cfg, world_size)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    choose_adam(ds_config, device)
    prepare_encoders(objective, cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=param_groups(objective, cfg.optim.weight_decay),
        config=ds_config,
        lr_scheduler=partial(electra_schedule, warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.max_steps),
    )
    return engine


def global_counts(
    local: list[tuple[int, int]], device: torch.device, masked_on_device: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The global batch's target counts, the loss denominators, as device tensors: the host sends this rank's
    counts (known from the data, before the forward pass) and never waits for the sum. On GPUs the all-reduce
    is NCCL's, queued on the stream ahead of the forward pass that needs it. ``masked_on_device``: this rank's
    masked count when only the device knows it (whole-word masking), used in place of the data's."""
    t = torch.tensor([sum(c[0] for c in local), sum(c[1] for c in local)], dtype=torch.float64)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    if masked_on_device is not None:
        t = torch.stack([masked_on_device.to(t.device, torch.float64), t[1]])
    dist.all_reduce(t)
    return {"n_masked": t[0], "n_tokens": t[1]}


def all_reduce_host(values: list[float | torch.Tensor], group=None) -> list[float | list[float]]:
    """Sum numbers and device tensors (the metric sums, the AUC's histograms) over the ranks in one all-reduce
    (logging steps only): the tensors are joined on the device and copied to the host at once, one sync however
    many metrics there are, and summed with the host numbers over ``group`` (gloo on GPUs, since NCCL has no CPU
    tensors). A number or a one-element tensor comes back a float, any other tensor a flat list of floats. With no
    process group (one process outside a launcher: a tool, a unit test) the sums are this process's."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    device_part = torch.zeros(0, dtype=torch.float64)
    if tensors:
        on = tensors[0].device
        device_part = torch.cat([t.detach().to(on, torch.float64).flatten() for t in tensors]).cpu()
    numbers = torch.tensor([float(v) for v in values if not isinstance(v, torch.Tensor)], dtype=torch.float64)
    flat = torch.cat([device_part, numbers])
    if dist.is_initialized():
        dist.all_reduce(flat, group=group)
    summed = iter(flat[: device_part.numel()].split([t.numel() for t in tensors]))
    plain = iter(flat[device_part.numel() :].tolist())
    out: list[float | list[float]] = []
    for v in values:
        if not isinstance(v, torch.Tensor):
            out.append(next(plain))
        else:
            part = next(summed)
            out.append(float(part[0]) if v.numel() == 1 else part.tolist())
    return out


def real_counts(micro_batches: list) -> tuple[int, int]:
    """The real (non-padding) tokens of data/stream.py micro-batches, and their attended query-key pairs (the sum
    of squared lengths): what model.training_flops counts. Host numbers the data path already has."""
    lengths = [mb.lengths.long() for mb in micro_batches]
    return sum(int(x.sum()) for x in lengths), sum(int((x * x).sum()) for x in lengths)


def objective_inputs(mb, cfg: Config, device: torch.device, non_blocking: bool = True) -> dict:
    """The objective's keyword arguments for a data/stream.py ``MicroBatch`` on ``device``; with train.unpad, its
    packing too (engine/packing.py), built on the host from the example counts: the masked slots in use per
    example are the reference's budget, round(real tokens x mask_prob) within the cap (whole-word masking may
    use fewer: their weights are 0)."""
    inputs = mb.model_inputs(device, non_blocking=non_blocking)
    if cfg.train.unpad:
        L, p = mb.tokens.shape[1], cfg.objective.mask_prob
        used = predictions_for(mb.lengths, mb.candidates, p, L)
        inputs["packing"] = pack(mb.lengths, used, L, max_predictions(p, L), device)
    return inputs


def train_step(engine, micro_batches: list, cfg: Config, device: torch.device, world_size: int) -> list[dict]:
    """Forward, backward and DeepSpeed's step for each of this rank's micro-batches of one global batch; the
    optimizer steps after the last. Returns each micro-batch's loss and metric sums (device tensors)."""
    objective = engine.module
    objective.step = engine.global_steps  # the generator curriculum's clock (restored with a checkpoint)
    inputs = [objective_inputs(mb, cfg, device) for mb in micro_batches]
    masked = None
    if cfg.objective.whole_word_mask:  # words cut the budget: the count is the device's (a few small kernels)
        with torch.no_grad():
            masked = sum(objective.count_masked(**x) for x in inputs)
    local = [count_batch_targets(mb, cfg.objective.mask_prob) for mb in micro_batches]
    totals = global_counts(local, device, masked)
    outs = []
    for x in inputs:
        out = engine(**x)
        # DeepSpeed averages gradients over ranks and accumulation steps; undo that to get the global mean.
        loss = training_loss(out, totals, cfg.objective.disc_weight) * (world_size * len(micro_batches))
        engine.backward(loss)
        engine.step()
        outs.append(out)
    return outs
