"""ELECTRA's wall time per token over MLM's at the same encoder, next to their FLOP ratio.

    .venv/bin/python scripts/objective_cost.py [--config configs/compare/cpu.yaml] [--rounds 7] [--threads 1]

Builds both objectives from the compare preset's pretraining config (or any run config), then times the
objective's forward + backward on the same random batch, alternating ELECTRA and MLM rounds so that load on the
machine hits both alike; prints the median ms per step of each. The optimizer step and data path are left out:
they cost the same per parameter or per token for both, and `electra-scale bench` measures them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load(config: str, overrides: list[str]):
    from electra_scale.config import load_config
    from electra_scale.tools.compare import load_spec, run_config

    if "compare" in Path(config).parts:  # a compare preset: its run config, with the overrides on top
        from dataclasses import asdict

        from electra_scale.config import config_from_dict, parse_value, set_dotted

        spec = load_spec([config], [])

        def from_spec(kind: str):
            raw = asdict(run_config(spec, kind, "unused", "unused", None))
            for item in overrides:
                key, _, value = item.partition("=")
                set_dotted(raw, key, parse_value(value))
            return config_from_dict(raw, config)

        return from_spec
    return lambda kind: load_config(config, [*overrides, f"objective.kind={kind}"])


def _bf16(cfg):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.precision = "bf16"
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/compare/cpu.yaml")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 weights there, as the engine runs them)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="on top of the config (or compare preset)")
    args = ap.parse_args()

    import torch

    from electra_scale.engine.masking import count_targets
    from electra_scale.engine.model import flops_per_token
    from electra_scale.engine.objective import build_objective, training_loss
    from electra_scale.engine.step import settle_device

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config_for = load(args.config, args.overrides)
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    cfgs = {kind: config_for(kind) for kind in ("electra", "mlm")}
    cfg = cfgs["electra"]
    # TF32 as pretrain sets it for the bf16 run these objectives are on a GPU (their fp32 vocabulary projection).
    settle_device(config_for("electra") if device.type != "cuda" else _bf16(cfg), device)
    batch, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.model.vocab_size, (batch, seq), generator=gen)
    ids[:, 0], ids[:, -1] = special["cls"], special["sep"]
    mask, types, positions = torch.ones_like(ids), torch.zeros_like(ids), torch.arange(batch)
    ids, mask, types, positions = (t.to(device) for t in (ids, mask, types, positions))

    objectives, times = {}, {}
    for kind, c in cfgs.items():
        torch.manual_seed(0)
        objectives[kind] = build_objective(c, special).to(device).train()
        if device.type == "cuda":
            objectives[kind] = objectives[kind].to(torch.bfloat16)
        times[kind] = []
    n_masked, n_tokens = count_targets(ids, mask, special, cfg.objective.mask_prob)
    totals = {"n_masked": float(n_masked), "n_tokens": float(n_tokens)}

    def step(kind: str) -> None:
        obj = objectives[kind]
        loss = training_loss(obj(ids, mask, types, positions), totals, cfgs[kind].objective.disc_weight)
        loss.backward()
        obj.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for kind in objectives:  # warm-up
        step(kind)
    for _ in range(args.rounds):
        for kind in objectives:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(kind)
            times[kind].append((time.perf_counter() - started) / args.steps)

    ms = {kind: 1000 * statistics.median(t) for kind, t in times.items()}
    flops = {kind: flops_per_token(c) for kind, c in cfgs.items()}
    print(f"shape: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, generator "
          f"{cfg.model.generator_hidden_size}, vocab {cfg.model.vocab_size}, batch {batch} x {seq}, "
          f"{args.threads} thread(s), {device.type}, median of {args.rounds} rounds")  # fmt: skip
    for kind in objectives:
        print(f"  {kind:8s} {ms[kind]:8.1f} ms/step   {flops[kind] / 1e6:8.2f} MFLOP/token")
    print(f"ELECTRA / MLM: wall time per token {ms['electra'] / ms['mlm']:.3f}x, "
          f"FLOPs per token {flops['electra'] / flops['mlm']:.3f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
