"""A trained vocabulary (``--tokenizer train:V``) learnt from a bounded, deterministic sample of the inputs, so
that a 160 GB corpus does not have to be read to learn it: the first ``--tokenizer-sample`` x (the unit's share
of the bytes) of every unit (data/units.py), so the sample spreads over all files and all of each large file.
The bytes are the inputs' own, compressed for a .gz or Parquet file (as the units are cut), so a compressed
unit is sampled by how much of its compressed stream has been read. A corpus no larger than the sample is read
whole, as it always was. ``prepare --tokenizer-only`` is the step of
its own that a split prepare runs first (every task must share one vocabulary)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from tokenizers import Tokenizer

from electra_scale.data.shards import DataError
from electra_scale.data.tables import row_group_bytes, row_group_rows
from electra_scale.data.tokenizer import is_trained_spec, load_tokenizer, resolve_spec, save_tokenizer
from electra_scale.data.units import (
    CHUNK_BYTES,
    Document,
    Segment,
    Unit,
    held_out,
    input_sizes,
    plan_units,
    resolve_inputs,
    segment_documents,
    split_sentences,
)
from electra_scale.infra import storage

SAMPLE_BYTES = 1 << 30  # 1 GiB of text: ~250M tokens, ample for a WordPiece vocabulary of 30k-64k


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '12345' -> bytes (powers of 1024 either way: these are budgets, not sizes)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1] if t[-1:] in units else t) * units[t[-1] if t[-1:] in units else ""])
    except (ValueError, KeyError, IndexError):
        raise DataError(f"{text!r} is not a size: use bytes or a number with K, M, G or T (e.g. 1GB)") from None


def _pieces(seg: Segment) -> Iterator[tuple[Segment, int, int]]:
    """A segment as (piece, its bytes, its rows): a Parquet segment by row group (rows: from the footer, so the
    share of a row group read can be counted in its compressed bytes), any other whole (rows 0: not counted)."""
    if seg.row_groups and seg.url.endswith(".parquet"):
        sizes, rows = row_group_bytes(seg.url), row_group_rows(seg.url)
        for g in seg.row_groups:
            yield Segment(seg.url, seg.start, seg.end, [g]), sizes[g], rows[g]
    else:
        yield seg, seg.end - seg.start, 0


def _unit_sample(unit: Unit, budget: int | None, text_column: str) -> Iterator[Document]:
    """The first documents of ``unit`` until ``budget`` of its bytes are read (None: all of them). The bytes are
    the unit's own, like with like: a plain file's text, a .gz file's compressed bytes as they are read, a
    Parquet row group's compressed bytes x the share of its rows read."""
    used = 0
    for seg in unit.segments:
        for piece, size, rows in _pieces(seg):
            gz = piece.url.endswith(".gz")
            read = [0]  # a .gz piece's compressed bytes read so far

            def report(n: int, read=read) -> None:
                read[0] += n

            before, text = used, 0
            for n, paragraphs in enumerate(segment_documents(piece, text_column, report), start=1):
                if budget is not None and used >= budget:
                    return
                doc = [s for p in paragraphs for s in split_sentences(p)]
                text += sum(len(s) + 1 for s in doc)
                used = before + (min(size, read[0]) if gz else size * n // rows if rows else text)
                yield doc
            if gz or rows:
                used = before + size


def train_on_sample(
    units: list[Unit],
    spec: str,
    lowercase: bool,
    sample_bytes: int,
    text_column: str,
    eval_fraction: float,
    say=None,
    normalization: str | None = None,
) -> Tokenizer:
    """The vocabulary ``spec`` learnt from the training documents of the sample; ``say`` hears its size and time.
    A corpus no larger than the sample is read whole."""
    total = sum(u.bytes for u in units)
    seen = {"bytes": 0, "documents": 0}

    def texts() -> Iterator[str]:
        for unit in units:
            budget = None if total <= sample_bytes else sample_bytes * unit.bytes // total
            for doc in _unit_sample(unit, budget, text_column):
                seen["bytes"] += sum(len(s) + 1 for s in doc)
                seen["documents"] += 1
                if not (eval_fraction > 0 and held_out(doc, eval_fraction)):
                    yield from doc

    started = time.monotonic()
    tok = load_tokenizer(spec, texts=texts, lowercase=lowercase, normalization=normalization)
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
    normalization: str | None = None,
) -> Tokenizer:
    """``prepare --tokenizer-only``: learn ``spec`` from the sample, write OUT/tokenizer.json and vocab.txt."""
    spec, lowercase = resolve_spec(spec, lowercase)
    if not is_trained_spec(spec):
        raise DataError(
            f"--tokenizer-only learns a vocabulary: give --tokenizer train:V, train-unigram:V or train-bpe:V, "
            f"not {spec}"
        )
    files = resolve_inputs(inputs, text_column)
    units = plan_units(files, input_sizes(files), chunk_bytes)
    try:  # a vocabulary that cannot be learnt as asked is the input's fault: one line, exit 2
        tok = train_on_sample(units, spec, lowercase, sample_bytes, text_column, eval_fraction, say, normalization)
    except ValueError as err:
        raise DataError(f"--tokenizer: {err}") from err
    save_tokenizer(tok, output)
    if say is not None:
        say(f"wrote {storage.join(output, 'tokenizer.json')} and vocab.txt; give the tasks --tokenizer with it")
    return tok
