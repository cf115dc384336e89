"""A small English-like corpus (400 documents of random sentences over a few dozen words): what the training
tests (tests/conftest.py) and the soak (scripts/soak.py) prepare their shards from."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "river city music war king church water light school green north road film game island stone paper "
    "bridge garden market winter summer station language mountain history science theory"
).split()


def write_corpus(path: Path, documents: int = 400, seed: int = 0) -> Path:
    """``documents`` lines of ``{"text": ...}`` at ``path``, the same for the same seed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(documents):
            sentences = [
                " ".join(rng.choices(WORDS, k=rng.randint(4, 18))).capitalize() + "." for _ in range(rng.randint(2, 12))
            ]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def prepare_shards(corpus: Path, out: str) -> tuple[str, int]:
    """The corpus as the tiny preset's shards (seq 128, a 300-token WordPiece vocabulary trained on it, blocks of
    16 examples in shards of 64): (prefix, vocabulary size)."""
    from electra_scale.data import prepare

    manifest = prepare(
        [str(corpus)], out, "train:300", seq_len=128, samples_per_shard=64, samples_per_block=16, progress=False
    )
    return out, manifest.vocab_size
