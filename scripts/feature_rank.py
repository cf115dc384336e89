"""Has an encoder's representation collapsed? The effective rank of its token features on real sentences.

    .venv/bin/python scripts/feature_rank.py MODEL_DIR [MODEL_DIR ...] [--random-like MODEL_DIR]
        [--task rotten_tomatoes] [--sentences 256]

MODEL_DIR is an export (`electra-scale export`: its discriminator/ or mlm/ folder). For each model it encodes
the task's first dev sentences and prints, over all real tokens' last-layer features: the effective rank
(exp of the entropy of the normalised singular values squared; at most the hidden size), the share of
variance in the top principal direction, and the mean cosine similarity between random pairs of tokens.
A discriminator that learned only "everything is original" keeps little reason to tell tokens apart, and
shows it here as an effective rank near 1; such an encoder fine-tunes to the majority class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def feature_stats(model_dir: str, texts: list[str], random_init: bool = False) -> dict[str, float]:
    import torch
    from transformers import ElectraConfig, ElectraModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    if random_init:
        torch.manual_seed(0)
        model = ElectraModel(ElectraConfig.from_pretrained(model_dir))
    else:
        model = ElectraModel.from_pretrained(model_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**enc).last_hidden_state
    tokens = hidden[enc["attention_mask"].bool()]
    centred = tokens - tokens.mean(0)
    energy = torch.linalg.svdvals(centred) ** 2
    p = energy / energy.sum()
    pairs = torch.randint(len(tokens), (2, 4000), generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    return {
        "effective_rank": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
        "top_direction_share": float(p[0]),
        "token_cosine": float((unit[pairs[0]] * unit[pairs[1]]).sum(-1).mean()),
        "hidden_size": tokens.shape[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--random-like", help="also measure a randomly initialised model of this export's shape")
    ap.add_argument("--task", default="rotten_tomatoes")
    ap.add_argument("--data", help="GLUE-format task directory (default: the built-in rotten tomatoes)")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "electra-scale"))
    args = ap.parse_args()

    import torch

    from electra_scale.eval.tasks import build_rotten_tomatoes, load_glue

    torch.set_num_threads(1)
    data = args.data or str(build_rotten_tomatoes(Path(args.cache_dir)))
    texts = [ex.text_a for ex in load_glue(args.task, data).splits["dev"][: args.sentences]]
    rows = [(m, feature_stats(m, texts)) for m in args.models]
    if args.random_like:
        rows.insert(0, ("random init", feature_stats(args.random_like, texts, random_init=True)))
    print(f"{'model':60s} {'eff. rank':>9s} {'top dir.':>8s} {'cosine':>7s}")
    for name, s in rows:
        print(f"{name[-60:]:60s} {s['effective_rank']:9.1f} {s['top_direction_share']:8.3f} {s['token_cosine']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
