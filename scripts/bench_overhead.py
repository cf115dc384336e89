"""Framework overhead: tokens/s of `electra-scale pretrain` vs a bare PyTorch loop, same model and batch shape.

    .venv/bin/python scripts/bench_overhead.py [--config configs/small.yaml] [--steps 40] [--micro-batch 8]

The bare loop is the least a training step can do: the same ElectraObjective (same masking, generator,
sampling, discriminator), torch AdamW over the same parameter groups, one fixed batch, no data loading,
no DeepSpeed, no logging. `electra-scale pretrain` runs the real thing (1 rank, DeepSpeed ZeRO-2, streaming
shards, metrics) with torch's AdamW too (optim.bias_correction=true), so the ratio is the framework's overhead.
The shards come from the demo's Wikipedia corpus, tokenized with a trained vocabulary padded to the model's
vocab size with unused entries (only the matmul shapes matter here). Prints a table; writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_shards(work: Path, vocab_size: int, seq_len: int) -> str:
    from electra_scale.data import load_tokenizer, prepare
    from electra_scale.demo import fetch_corpus

    corpus = fetch_corpus(ROOT / "demo-output")
    shards = work / "shards"
    trained = prepare([str(corpus)], str(work / "trained"), "train:4096", seq_len=seq_len, progress=False)
    vocab = (work / "trained" / "vocab.txt").read_text().splitlines()
    vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    (work / "vocab.txt").write_text("\n".join(vocab) + "\n")
    load_tokenizer(str(work / "vocab.txt"))  # fail early if the padded vocab is not loadable
    prepare([str(corpus)], str(shards), str(work / "vocab.txt"), seq_len=seq_len, progress=False)
    del trained
    return str(shards)


def bare_loop(cfg, shards: str, steps: int, warmup: int) -> float:
    import torch

    from electra_scale.data import PretrainStream, load_manifest
    from electra_scale.objective import build_objective, count_targets, training_loss
    from electra_scale.optim import electra_schedule, param_groups

    torch.set_num_threads(os.cpu_count() or 1)
    manifest = load_manifest(shards)
    torch.manual_seed(0)
    model = build_objective(cfg, manifest.special_ids)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, eps=cfg.optim.eps)
    sched = electra_schedule(opt, cfg.optim.warmup_steps, cfg.train.max_steps)
    stream = PretrainStream(
        shards,
        manifest,
        seed=0,
        global_batch_size=cfg.train.micro_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=0,
        world_size=1,
        num_workers=0,
    )
    mb = next(iter(stream))[0]
    n_masked, n_tokens = count_targets(mb.input_ids, mb.attention_mask, manifest.special_ids, cfg.objective.mask_prob)
    totals = {"n_masked": n_masked, "n_tokens": n_tokens}
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        out = model(mb.input_ids, mb.attention_mask, mb.token_type_ids, mb.positions)
        loss = training_loss(out, totals, cfg.objective.disc_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return steps * cfg.train.micro_batch_size * cfg.data.seq_len / elapsed


def framework(config: str, overrides: list[str], shards: str, out: Path, steps: int, log_every: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "electra_scale",
        "pretrain",
        "--config",
        config,
        f"data.shards={shards}",
        f"run.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        "checkpoint.every_steps=100000",
        "run.tensorboard=false",
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:]  # the first window includes start-up and warm-up
    return sum(r["tokens_per_s"] for r in timed) / len(timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--skip-bare", action="store_true", help="only run electra-scale pretrain")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for the pretrain run")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from electra_scale.config import load_config

    overrides = [
        f"train.global_batch_size={args.micro_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.precision=fp32",
        "optim.bias_correction=true",
        "data.num_workers=1",
    ]
    cfg = load_config(args.config, overrides + [f"train.max_steps={args.steps}"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_shards(work, cfg.model.vocab_size, cfg.data.seq_len)
        log_every = max(args.steps // 4, 1)
        bare = None if args.skip_bare else bare_loop(cfg, shards, steps=args.steps - log_every, warmup=log_every)
        ours = framework(args.config, overrides, shards, work / "run", args.steps, log_every)
    print(
        f"\n{args.config}: 1 rank, seq {cfg.data.seq_len}, micro-batch {args.micro_batch}, fp32, "
        f"{os.cpu_count()} CPU threads"
    )
    print(f"  electra-scale pretrain   {ours:10,.0f} tokens/s   {' '.join(args.overrides)}")
    if bare is not None:
        print(f"  bare PyTorch loop        {bare:10,.0f} tokens/s")
        print(f"  overhead (bare / ours)   {bare / ours:10.3f}x")


if __name__ == "__main__":
    main()
