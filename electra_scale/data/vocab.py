"""A trained vocabulary (``--tokenizer train:V``) learnt from a bounded, deterministic sample of the inputs, so
that a 160 GB corpus does not have to be read to learn it: the first ``--tokenizer-sample`` x (the unit's share
of the bytes) of every unit (data/units.py), so the sample spreads over all files and all of each large file.
A corpus no larger than the sample is read whole, as it always was. ``prepare --tokenizer-only`` is the step of
its own that a split prepare runs first (every task must share one vocabulary)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from tokenizers import Tokenizer

from electra_scale.data.shards import DataError
from electra_scale.data.tokenizer import load_tokenizer, resolve_spec, save_tokenizer
from electra_scale.data.units import (
    CHUNK_BYTES,
    Unit,
    held_out,
    input_sizes,
    plan_units,
    resolve_inputs,
    unit_documents,
)
from electra_scale.infra import storage

SAMPLE_BYTES = 1 << 30  # 1 GiB of text: ~250M tokens, ample for a WordPiece vocabulary of 30k-64k


def is_trained_spec(spec: str) -> bool:
    """Whether a tokenizer spec learns its vocabulary from the corpus (train:V, and the trainers' other forms)."""
    return str(spec).startswith("train")


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '12345' -> bytes (powers of 1024 either way: these are budgets, not sizes)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1] if t[-1:] in units else t) * units[t[-1] if t[-1:] in units else ""])
    except (ValueError, KeyError, IndexError):
        raise DataError(f"{text!r} is not a size: use bytes or a number with K, M, G or T (e.g. 1GB)") from None


def train_on_sample(
    units: list[Unit], spec: str, lowercase: bool, sample_bytes: int, text_column: str, eval_fraction: float, say=None
) -> Tokenizer:
    """The vocabulary ``spec`` learnt from the training documents of the sample; ``say`` hears its size and time."""
    total = sum(u.bytes for u in units)
    seen = {"bytes": 0, "documents": 0}

    def texts() -> Iterator[str]:
        for unit in units:
            budget = unit.bytes if total <= sample_bytes else sample_bytes * unit.bytes // total
            taken = 0
            for doc in unit_documents(unit, text_column):
                if taken >= budget:
                    break
                size = sum(len(s) + 1 for s in doc)
                taken += size
                seen["bytes"] += size
                seen["documents"] += 1
                if not (eval_fraction > 0 and held_out(doc, eval_fraction)):
                    yield from doc

    started = time.monotonic()
    tok = load_tokenizer(spec, texts=texts, lowercase=lowercase)
    if say is not None:
        say(
            f"vocabulary {spec} learnt from a sample of {seen['bytes'] / 1e6:,.1f} MB ({seen['documents']:,} "
            f"documents) of {total / 1e6:,.1f} MB in {time.monotonic() - started:.1f} s"
        )
    return tok


def prepare_vocabulary(
    inputs: list[str],
    output: str,
    spec: str,
    lowercase: bool = True,
    sample_bytes: int = SAMPLE_BYTES,
    text_column: str = "text",
    eval_fraction: float = 0.0,
    chunk_bytes: int = CHUNK_BYTES,
    say=None,
) -> Tokenizer:
    """``prepare --tokenizer-only``: learn ``spec`` from the sample, write OUT/tokenizer.json and vocab.txt."""
    spec, lowercase = resolve_spec(spec, lowercase)
    if not is_trained_spec(spec):
        raise DataError(f"--tokenizer-only learns a vocabulary: give --tokenizer train:VOCAB_SIZE, not {spec}")
    files = resolve_inputs(inputs, text_column)
    units = plan_units(files, input_sizes(files), chunk_bytes)
    tok = train_on_sample(units, spec, lowercase, sample_bytes, text_column, eval_fraction, say)
    save_tokenizer(tok, output)
    if say is not None:
        say(f"wrote {storage.join(output, 'tokenizer.json')} and vocab.txt; give the tasks --tokenizer with it")
    return tok
