"""bf16 runs accumulate gradients in fp32 over micro-batches (config.deepspeed_config sets DeepSpeed's
``data_types.grad_accum_dtype``), at ZeRO-1 and ZeRO-2: measured on the values, not on the optimizer's attributes.

Each micro-batch's backward runs in bf16 and gives bf16 gradients g_k; what accumulation must add is their sum.
The reference is that sum in fp64, of the very g_k the engine's backward produces (a bf16 copy of the same model
on the same inputs, outside DeepSpeed). fp32 accumulation is within ~1e-7 of it; bf16 accumulation, which
rounds every partial sum to 8 mantissa bits, is ~1e-3 off, and the test shows that it can tell the two apart.
All four cases (ZeRO-1 and ZeRO-2, each with fp32 and bf16 accumulation) run in one process, one rank of
DeepSpeed on gloo, one engine after another: a process start costs more than a case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCHES = 8
_EXPECTED: dict = {}


def _measure(stage: int, accum_dtype: str | None, device) -> float:
    """Relative error (2-norm over all parameters) of the engine's accumulated gradient against the fp64 sum."""
    import copy

    import torch
    from deepspeed.utils import safe_get_full_grad

    from electra_scale.config import load_config
    from electra_scale.engine.masking import count_targets
    from electra_scale.engine.objective import build_objective, training_loss
    from electra_scale.engine.step import build_engine

    ds = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"}}
    if accum_dtype:
        ds["data_types"] = {"grad_accum_dtype": accum_dtype}
    ds_path = Path(os.environ["ACCUM_TMP"]) / f"zero{stage}-{accum_dtype}.json"
    ds_path.write_text(json.dumps(ds))
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "model.vocab_size=512",
            "model.dropout=0",
            "model.attention_dropout=0",
            "train.precision=bf16",
            f"train.deepspeed_config={ds_path}",
            "train.micro_batch_size=4",
            f"train.global_batch_size={4 * MICRO_BATCHES}",
            "optim.grad_clip=0",
        ],
    )
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    torch.manual_seed(0)
    objective = build_objective(cfg, special)
    reference = copy.deepcopy(objective).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    inputs = []
    for k in range(MICRO_BATCHES):
        ids = torch.randint(5, 512, (4, 64), generator=g)
        ids[:, 0], ids[:, -1] = special["cls"], special["sep"]
        mask = torch.ones_like(ids)
        inputs.append(dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                           positions=torch.arange(4 * k, 4 * k + 4), padded=False))  # fmt: skip
    counts = [count_targets(x["input_ids"], x["attention_mask"], special, cfg.objective.mask_prob) for x in inputs]
    totals = {"n_masked": float(sum(c[0] for c in counts)), "n_tokens": float(sum(c[1] for c in counts))}

    if not _EXPECTED:  # the same model and inputs in every case: the reference sum is computed once
        _EXPECTED.update({n: torch.zeros_like(p, dtype=torch.float64) for n, p in reference.named_parameters()})
        for x in inputs:
            reference.zero_grad(set_to_none=True)
            training_loss(reference(**x), totals, cfg.objective.disc_weight).backward()
            for n, p in reference.named_parameters():
                if p.grad is not None:
                    _EXPECTED[n] += p.grad.double()
    expected = _EXPECTED

    engine = build_engine(cfg, objective, 1, device)
    for k, x in enumerate(inputs):
        # As train_step: DeepSpeed divides the loss by the accumulation steps (exact in bf16: a power of two).
        engine.backward(training_loss(engine(**x), totals, cfg.objective.disc_weight) * MICRO_BATCHES)
        if k < MICRO_BATCHES - 1:
            engine.step()  # not a boundary: accumulates only
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    err = sum(float((got[n].double() - e).pow(2).sum()) for n, e in expected.items() if got[n] is not None)
    norm = sum(float(e.pow(2).sum()) for e in expected.values())
    assert all(got[n] is not None for n in expected), "a parameter has no accumulated gradient"
    engine.destroy()
    return (err / norm) ** 0.5


def test_bf16_gradients_accumulate_in_fp32(tmp_path):
    from electra_scale.infra.launch import free_port

    env = {**os.environ, "ACCUM_TMP": str(tmp_path), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    print(errors)
    for stage in ("1", "2"):
        # fp32 accumulation (the run config's default): only the rounding of fp32 sums; bf16, there to show that
        # the test can tell the two apart, is measurably worse.
        assert errors[stage]["fp32"] < 1e-5, errors
        assert errors[stage]["bf16"] > 10 * errors[stage]["fp32"], errors


if __name__ == "__main__":
    import torch.distributed as dist

    from electra_scale.infra import launch

    device = launch.init_distributed(launch.detect())
    # The default (no data_types in the JSON) is what the run config gives: fp32.
    found = {str(stage): {a: _measure(stage, None if a == "fp32" else a, device) for a in ("fp32", "bf16")}
             for stage in (1, 2)}  # fmt: skip
    dist.destroy_process_group()
    print(json.dumps(found))
