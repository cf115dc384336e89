"""Is the discriminator learning anything? A short ELECTRA run that prints, every --log steps,
the discriminator's loss next to the base rate (the entropy of always answering with the replaced share), its
recall and precision on replaced tokens, and the generator's accuracy.

    .venv/bin/python scripts/rtd_probe.py --corpus runs/compare-cpu/corpus/wiki_en.jsonl \\
        [--layers 4 --hidden 128 --gen 32 --lr 1e-3 --steps 1500] [--uniform-generator] \\
        [--sharing gdes] [--temperature-start 3 --temperature-warmup 1000] [--whole-word] [--save DIR]

--uniform-generator zeroes the generator's logits, so replacements are uniform over the vocabulary: the control
run. A discriminator that learns there but not with the real generator has a correct objective and a hard task;
one that learns in neither has a bug. --sharing, --temperature-start/--temperature-warmup and --whole-word set
the objective's options of the same names (objective.embedding_sharing, temperature_start,
temperature_warmup_steps, whole_word_mask); --save writes the discriminator as an export does (folded for gdes,
with the tokenizer), for scripts/feature_rank.py and `electra-scale finetune`. The last line is a JSON summary
of the last --log steps. The objective and the step are electra_scale's own (``step.build_engine``,
``step.train_step``: DeepSpeed ZeRO-0, torch AdamW, ELECTRA's schedule, one rank); the data are random packed
windows of the corpus (no shards, no tokenizer file), which is why it is a script and not part of `pretrain`.
docs/compare.md records what it showed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, help="a .jsonl file with a 'text' field per line")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32, help="generator hidden size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--log", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--uniform-generator", action="store_true")
    ap.add_argument("--sharing", choices=("shared", "gdes"), default="shared")
    ap.add_argument("--temperature-start", type=float, default=None)
    ap.add_argument("--temperature-warmup", type=int, default=0)
    ap.add_argument("--whole-word", action="store_true")
    ap.add_argument("--save", help="write the discriminator (HF format, with vocab.txt) here at the end")
    args = ap.parse_args()

    import numpy as np
    import torch

    import electra_scale.engine.objective as objective
    from electra_scale.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig, validate
    from electra_scale.data.stream import MicroBatch
    from electra_scale.data.tokenizer import load_tokenizer, special_ids
    from electra_scale.data.words import continuation_ids
    from electra_scale.engine.model import build_electra
    from electra_scale.engine.step import build_engine, train_step
    from electra_scale.infra import launch

    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines() if line]
    tok = load_tokenizer(f"train:{args.vocab}", lambda: iter(texts))
    special = special_ids(tok)
    ids = np.concatenate([np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)])
    seq = 128
    n = len(ids) // (seq - 2)
    body = ids[: n * (seq - 2)].reshape(n, seq - 2)
    windows = np.concatenate([np.full((n, 1), special["cls"]), body, np.full((n, 1), special["sep"])], axis=1)
    print(f"{n} windows of {seq} tokens from {len(ids):,} tokens", flush=True)

    cfg = Config(
        model=ModelConfig(
            vocab_size=args.vocab, embedding_size=args.hidden, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden, max_position_embeddings=seq,
            generator_hidden_size=args.gen,
        ),
        objective=ObjectiveConfig(
            kind="electra", embedding_sharing=args.sharing, temperature_start=args.temperature_start,
            temperature_warmup_steps=args.temperature_warmup, whole_word_mask=args.whole_word,
        ),
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup, bias_correction=True),
        train=TrainConfig(
            max_steps=args.steps, global_batch_size=args.batch, micro_batch_size=args.batch, seed=1,
            precision="fp32", deepspeed_config="ds_configs/zero0.json",
        ),
    )  # fmt: skip
    cfg.data.seq_len = seq
    validate(cfg)
    device = launch.init_distributed(launch.detect())
    # After launch, which on CPU gives each rank its share of the cores (all of them here): --threads set
    # before it was overridden, and a "1-thread" probe beside other work ran 2 OpenMP threads on a shared core.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator, discriminator = build_electra(cfg.model, special["pad"])
    pieces = continuation_ids(tok) if args.whole_word else None
    rtd = objective.ElectraObjective(generator, discriminator, cfg.objective, special, cfg.train.seed, pieces)
    if args.uniform_generator:
        real = objective.masked_lm_logits
        objective.masked_lm_logits = lambda *a: real(*a) * 0.0  # softmax of zeros: uniform samples
    engine = build_engine(cfg, rtd, 1, device)

    rng = np.random.default_rng(0)
    sums: dict[str, float] = {}
    last: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = rng.integers(0, n, args.batch)
        mb = MicroBatch(
            tokens=torch.from_numpy(windows[pick]),
            lengths=torch.full((args.batch,), seq),
            first_sep=torch.full((args.batch,), seq - 1),
            candidates=torch.full((args.batch,), seq - 2),
            positions=torch.from_numpy(pick) + step * n,
            samples=torch.from_numpy(pick),
        )
        for out in train_step(engine, [mb], cfg, device, 1):
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (v.detach() if v.numel() > 1 else float(v.detach()))  # AUC histograms
        if step % args.log == 0:
            m = objective.summarize(sums, cfg.objective.disc_weight)
            r = m["replaced_frac"]
            base = -(r * math.log(r) + (1 - r) * math.log(1 - r))
            print(
                f"step {step:5d} {time.perf_counter() - started:6.0f}s  gen_acc {m['gen_acc']:.3f}  replaced {r:.3f}  "
                f"disc_loss {m['disc_loss']:.4f} (base rate {base:.4f})  auc {m['disc_auc']:.3f}  "
                f"recall {m['disc_recall']:.3f}  precision {m['disc_precision']:.3f}",
                flush=True,
            )
            last = {"step": step, "disc_loss": m["disc_loss"], "base_rate": base, "margin": base - m["disc_loss"]}
            last.update({k: m[k] for k in ("disc_auc", "disc_recall", "disc_precision", "gen_acc", "replaced_frac")})
            sums = {}
    if args.save:
        from transformers import ElectraTokenizer

        out = Path(args.save)
        rtd.exported_discriminator().save_pretrained(out)
        vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        (out / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
        ElectraTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True).save_pretrained(out)
        print(f"saved the discriminator to {out}", flush=True)
    print(json.dumps({"summary": last, "args": vars(args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
