"""Count what one training step asks of the device: operator calls (each a kernel launch on a GPU) and host
syncs, with torch.profiler. A GPU stalls on every sync; on CPU they cost nothing, so they must be counted, not
timed. On a GPU it also lists kernel launches, the runtime's synchronisations and where the kernel time goes.

    python scripts/step_profile.py --config configs/small.yaml [key=value ...] [--micro-batch 32] [--device cpu]
        [--json-out F]

``train.unpad=true`` profiles the padding-free step (its packing built before the profiled region, as the data
path builds it ahead of the step).

Syncs counted: ``aten::_local_scalar_dense`` (``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor,
and ``.tolist()``), ``aten::nonzero`` and the ops that return a data-dependent shape, ``aten::is_nonzero``.
The step is the objective's forward and backward on one micro-batch of the config's shape (the model is the
config's, the batch random ids with ~10% short examples), as train.py runs it inside the DeepSpeed engine.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from electra_scale.config import load_config  # noqa: E402
from electra_scale.engine.objective import build_objective  # noqa: E402
from electra_scale.engine.step import objective_inputs, settle_device  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::unique")
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
# Ops that only make a new view or describe a tensor: no kernel on a GPU.
VIEW_OPS = {
    f"aten::{name}"
    for name in (
        "view reshape _reshape_alias t transpose detach expand permute select slice as_strided unsqueeze squeeze "
        "alias _unsafe_view numpy_T contiguous empty empty_like empty_strided lift_fresh resolve_conj resolve_neg "
        "result_type split chunk unbind narrow"
    ).split()
}


def batch(cfg, m: int, seed: int = 0):
    """A micro-batch as the data path hands it over (data/stream.py's MicroBatch), random ids."""
    from electra_scale.data.stream import MicroBatch

    g = torch.Generator().manual_seed(seed)
    L = cfg.data.seq_len
    lengths = torch.where(torch.rand(m, generator=g) < 0.1, torch.randint(8, L, (m,), generator=g), L)
    tokens = torch.randint(5, cfg.model.vocab_size, (m, L), generator=g)
    cols = torch.arange(L)[None, :]
    tokens = torch.where(cols < lengths[:, None], tokens, 0)
    tokens[:, 0] = SPECIAL["cls"]
    first_sep = lengths // 2
    tokens[torch.arange(m), first_sep] = SPECIAL["sep"]
    tokens[torch.arange(m), lengths - 1] = SPECIAL["sep"]
    candidates = lengths - 3
    return MicroBatch(
        tokens=tokens.to(torch.int32),
        lengths=lengths,
        first_sep=first_sep,
        candidates=candidates,
        positions=torch.arange(m, dtype=torch.long),
        samples=torch.arange(m, dtype=torch.long),
    )


def profile_step(cfg, m: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    settle_device(cfg, device)  # TF32 as pretrain sets it; fp32 + unpad refused on a GPU
    objective = build_objective(cfg, SPECIAL).to(device)
    if device.type == "cuda" and cfg.train.precision == "bf16":
        objective = objective.to(torch.bfloat16)  # as DeepSpeed's bf16 mode runs it
    mb = batch(cfg, m)
    for _ in range(2):  # warm-up: lazy init, kernel selection and the allocator are not the step
        objective(**objective_inputs(mb, cfg, device))["gen_loss"].sum().backward()
        objective.zero_grad(set_to_none=True)
    # Host work on host data (whether any example is padded; with train.unpad the packing): not counted.
    inputs = objective_inputs(mb, cfg, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        out = objective(**inputs)
        (out["gen_loss"] + 50 * out.get("disc_loss", 0)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    counts = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    # Only top-level aten ops launch work of their own; nested ones (aten::add inside aten::linear) do not.
    top = collections.Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    kernels = collections.Counter({k: v for k, v in top.items() if k not in VIEW_OPS})
    # The CPU implementation of the varlen op (engine/packing.py) reads the example lengths on the host: a "sync"
    # that exists on the CPU only (on a GPU the op is FlashAttention's kernel). Counted apart, so that the rest
    # of the padding-free step shows its own count, which on a GPU is the step's.
    inside_op = collections.Counter(
        e.name for e in prof.events() if e.name in SYNC_OPS and device.type == "cpu" and _under(e, "electra_scale::")
    )
    syncs = {name: counts[name] - inside_op[name] for name in SYNC_OPS if counts[name] - inside_op[name]}
    report_gpu = {}
    if device.type == "cuda":
        runtime = collections.Counter(e.name for e in prof.events())
        report_gpu = {
            "kernel_launches": sum(
                v for k, v in runtime.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
            ),
            "runtime_syncs": {k: v for k, v in runtime.items() if "Synchronize" in k and k != "cudaDeviceSynchronize"},
            "top_cuda_ops_ms": {
                e.key: round(e.self_device_time_total / 1000, 3)
                for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:15]
            },
            "cuda_time_ms": round(sum(e.self_device_time_total for e in prof.key_averages()) / 1000, 3),
        }
    return {
        **report_gpu,
        "micro_batch": m,
        "seq_len": cfg.data.seq_len,
        "aten_calls": sum(counts.values()),
        "top_level_ops": sum(top.values()),
        "kernel_ops": sum(kernels.values()),
        "host_syncs": sum(syncs.values()),
        "syncs_by_op": syncs,
        "cpu_reference_attention_syncs": sum(inside_op.values()),
        "most_called": dict(kernels.most_common(12)),
    }


def _under(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    m = args.micro_batch or cfg.train.micro_batch_size
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    report = {**profile_step(cfg, m, device), "unpad": cfg.train.unpad}
    print(
        f"{args.config}: micro-batch {m} x seq {report['seq_len']}: {report['kernel_ops']} ops that launch work "
        f"({report['top_level_ops']} top-level, {report['aten_calls']} aten calls in all), "
        f"{report['host_syncs']} host syncs {report['syncs_by_op']}"
        + (f" (+ {report['cpu_reference_attention_syncs']} in the CPU's varlen op)" if device.type == "cpu" else "")
    )
    print("most called:", ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in report["most_called"].items()))
    if device.type == "cuda":
        print(f"GPU: {report['kernel_launches']} kernel launches, {report['cuda_time_ms']} ms of kernels, "
              f"runtime syncs {report['runtime_syncs']}")  # fmt: skip
        for name, ms in report["top_cuda_ops_ms"].items():
            print(f"  {ms:9.3f} ms  {name}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
