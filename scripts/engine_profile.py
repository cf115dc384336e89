"""Where the DeepSpeed engine's step costs more than a bare PyTorch loop's, by counting: one step of each on the
same fixed batch (tools/bench's BareLoop and EngineLoop, the code bench times), under torch.profiler. Per step:
operator calls (each a kernel launch on a GPU), host syncs, and the operators the engine adds, by count and
self time; for each DeepSpeed JSON given, so that a setting's effect shows as counts, which a 2-core CPU can
measure, not as wall time, which it cannot.

    python scripts/engine_profile.py --config configs/small.yaml [key=value ...] \
        --ds ds_configs/zero2.json --ds ds_configs/zero1.json [--json-out F]

Syncs counted as in scripts/step_profile.py: ``aten::_local_scalar_dense`` (``.item()``, ``float()`` ...),
``aten::nonzero``, ``aten::is_nonzero``, ``aten::masked_select``, ``aten::unique``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import SYNC_OPS, VIEW_OPS  # noqa: E402


def profile_step(loop, steps: int = 1) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            loop.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counts: collections.Counter = collections.Counter()
    self_us: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and e.name not in VIEW_OPS and e.device_type.name == "CPU":
            counts[e.name] += 1
            self_us[e.name] += e.self_cpu_time_total
    return {
        "ops": sum(counts.values()) / steps,
        "syncs": sum(counts[n] for n in SYNC_OPS) / steps,
        "sync_ops": {n: counts[n] / steps for n in SYNC_OPS if counts[n]},
        "counts": {n: c / steps for n, c in counts.items()},
        "self_us": {n: t / steps for n, t in self_us.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--ds", action="append", required=True, help="a DeepSpeed JSON to profile (repeat)")
    p.add_argument("--json-out")
    args = p.parse_args()

    # DeepSpeed's accelerator follows the device: the GPU's where there is one (a CPU accelerator there would
    # profile DeepSpeed's CPU code paths next to CUDA tensors).
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    from electra_scale.config import load_config
    from electra_scale.infra import launch
    from electra_scale.infra.launch import free_port
    from electra_scale.tools.bench.data import synthetic_shards
    from electra_scale.tools.bench.paths import BareLoop, EngineLoop, fixed_batch

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    base = load_config(args.config, args.overrides)
    device = launch.init_distributed(launch.detect())
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(
            f"{tmp}/shards", base.model.vocab_size, base.data.seq_len, 4 * base.train.micro_batch_size
        )
        cfg = load_config(args.config, [*args.overrides, f"train.global_batch_size={base.train.micro_batch_size}"])
        batches, special = fixed_batch(shards, cfg)
        bare = BareLoop(cfg, batches, special, device)
        for _ in range(2):
            bare.step()
        report = {"config": args.config, "overrides": args.overrides, "device": device.type, "bare": profile_step(bare)}
        bare.close()
        for ds in args.ds:
            trial = load_config(args.config, [*args.overrides, f"train.global_batch_size={base.train.micro_batch_size}",
                                              f"train.deepspeed_config={ds}"])  # fmt: skip
            engine = EngineLoop(trial, batches, special, device)
            for _ in range(2):
                engine.step()
            report[ds] = profile_step(engine)
            engine.close()

    b = report["bare"]
    print(f"{'path':<28} {'ops/step':>9} {'syncs/step':>11}  sync ops")
    print(f"{'bare PyTorch loop':<28} {b['ops']:>9.0f} {b['syncs']:>11.0f}  {b['sync_ops']}")
    for ds in args.ds:
        r = report[ds]
        print(f"{'engine ' + Path(ds).name:<28} {r['ops']:>9.0f} {r['syncs']:>11.0f}  {r['sync_ops']}")
        extra = {n: r["counts"][n] - b["counts"].get(n, 0) for n in r["counts"]}
        top = sorted(extra, key=lambda n: -(r["self_us"][n] - b["self_us"].get(n, 0)))[:6]
        added = ", ".join(f"{n.removeprefix('aten::')} +{extra[n]:.0f}" for n in top if extra[n] > 0)
        print(f"{'':<28} ops the engine adds (most self time first): {added}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
