"""Raw text -> ELECTRA pretraining examples -> webdataset tar shards + manifest (``electra-scale prepare``).

Inputs are local paths or s3:// URLs (a directory/prefix stands for the supported files below it):

* ``.txt``:   documents separated by a blank line; each non-empty line is a paragraph (or a sentence).
* ``.jsonl``: one document per line, ``{"text": ...}``; newlines inside a text are paragraph breaks (also in
  the tables below).
* either of them gzipped (``.txt.gz``, ``.jsonl.gz``).
* ``.parquet`` files, and ``datasets.save_to_disk`` directories: one document per row (data/tables.py).

``.jsonl`` and the tables take their text from ``text_column`` (default ``text``).

Paragraphs are split into sentences with a simple regex, because the reference
(google-research/electra ``build_pretraining_dataset.py``) expects one sentence per line and packs examples
sentence by sentence. Examples are built exactly as the reference's ``ExampleBuilder`` does (see
``ExampleBuilder``), with a seeded ``random.Random`` so a re-run gives byte-identical shards.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from electra_scale.data.parts import (
    PARTS,
    assign,
    done_unit,
    finalize,
    finished_with,
    is_unfinalized,
    settings_sha,
    unit_result,
    write_part,
    write_unit,
)
from electra_scale.data.pool import run_units
from electra_scale.data.shards import (
    FORMAT,
    MANIFEST,
    BlockWriter,
    DataError,
    Manifest,
    ShardInfo,
    default_samples_per_block,
    load_manifest,
)
from electra_scale.data.tokenizer import (
    is_trained_spec,
    load_tokenizer,
    normalization_of,
    resolve_spec,
    save_tokenizer,
    special_ids,
    special_roles,
    tokenizer_json,
    tokenizer_sha256,
)
from electra_scale.data.units import (  # noqa: F401 - re-exported: prepare's inputs, as before
    CHUNK_BYTES,
    Document,
    Unit,
    held_out,
    input_sizes,
    iter_corpus,
    iter_documents,
    plan_units,
    resolve_inputs,
    split_sentences,
    unit_documents,
)
from electra_scale.data.vocab import SAMPLE_BYTES, train_on_sample
from electra_scale.infra import storage

# Documents tokenized per encode_batch call: large enough for the Rust tokenizer's thread pool.
_DOCS_PER_BATCH = 512


# --------------------------------------------------------------------------------------------- examples
class ExampleBuilder:
    """Packs one document's sentences into ELECTRA examples, a port of the reference's ``ExampleBuilder``
    (google-research/electra, build_pretraining_dataset.py), including the order of its random draws:

    * sentences accumulate until their length reaches ``target_length`` (or the document ends);
    * with prob. 0.1 the example has one segment only, else the first segment targets
      (target_length - 3) // 2; a sentence goes to the first segment if it is empty, if the sentence keeps it
      under target, or (50%) if the second segment is still empty and the first is under target; otherwise to
      the second;
    * the segments are trimmed to fit ``[CLS] A [SEP] B [SEP]`` in max_len;
    * with prob. 0.05 the next example's target length is random in [5, max_len] (short examples, as in
      fine-tuning), else max_len.

    Only the unpadded ids ``[CLS] A [SEP] (B [SEP])`` are stored: token types (0 through the first [SEP], 1
    after) and the attention mask are re-derived at load time, as the reference computes them.
    """

    def __init__(self, max_len: int, cls_id: int, sep_id: int, rng: random.Random):
        self.max_len, self.cls_id, self.sep_id, self.rng = max_len, cls_id, sep_id, rng
        self.sentences: list[list[int]] = []
        self.length = 0
        self.target_length = max_len

    def add_sentence(self, ids: list[int]) -> list[int] | None:
        # The reference appends empty sentences too; they never draw a random number nor add tokens, so
        # skipping them is equivalent.
        if not ids:
            return None
        self.sentences.append(ids)
        self.length += len(ids)
        return self._create_example() if self.length >= self.target_length else None

    def end_document(self) -> list[int] | None:
        return self._create_example() if self.length else None

    def _create_example(self) -> list[int]:
        rng = self.rng
        first_target = 100000 if rng.random() < 0.1 else (self.target_length - 3) // 2
        first: list[int] = []
        second: list[int] = []
        for sent in self.sentences:
            if (
                not first
                or len(first) + len(sent) < first_target
                or (not second and len(first) < first_target and rng.random() < 0.5)
            ):
                first += sent
            else:
                second += sent
        first = first[: self.max_len - 2]
        second = second[: max(0, self.max_len - len(first) - 3)]
        self.sentences, self.length = [], 0
        self.target_length = rng.randint(5, self.max_len) if rng.random() < 0.05 else self.max_len
        example = [self.cls_id, *first, self.sep_id]
        if second:
            example += [*second, self.sep_id]
        return example


# --------------------------------------------------------------------------------------------- shards
class ShardWriter:
    """Writes ``<prefix>%06d.tar`` shards of ``samples_per_shard`` examples, in blocks of ``samples_per_block``
    (a shard's last block may be shorter), and publishes each shard as soon as it is complete: renamed into
    place locally, or uploaded from a temp dir (then deleted) for S3. ``prepare``, ``convert-shards`` and the
    bench's synthetic sets all write through here."""

    def __init__(
        self,
        output: str,
        samples_per_shard: int,
        samples_per_block: int,
        dtype: np.dtype,
        workdir: str,
        prefix: str = "train-",
    ):
        if samples_per_shard < 1 or samples_per_block < 1:
            raise ValueError("samples_per_shard and samples_per_block must be positive")
        self.output, self.dtype, self.prefix = output, np.dtype(dtype), prefix
        self.samples_per_shard = samples_per_shard
        self.samples_per_block = min(samples_per_block, samples_per_shard)
        self.local_dir = workdir if storage.is_s3(output) else output
        self.shards: list[ShardInfo] = []
        self.num_samples = self.num_tokens = 0
        self._writer: BlockWriter | None = None
        self._file = None
        self._pending: list[list[int] | np.ndarray] = []  # the block being filled
        self._in_shard = 0

    def _name(self) -> str:
        return f"{self.prefix}{len(self.shards):06d}.tar"

    def _tmp_path(self) -> str:
        return os.path.join(self.local_dir, f".{self._name()}.tmp")

    def write(self, ids: list[int] | np.ndarray) -> None:
        self._pending.append(ids)
        self.num_samples += 1
        self.num_tokens += len(ids)
        self._in_shard += 1
        if len(self._pending) == self.samples_per_block or self._in_shard == self.samples_per_shard:
            self._flush_block()
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def _flush_block(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 - closed in _finish
            self._writer = BlockWriter(self._file, self.dtype)
        self._writer.write(f"{self.num_samples - len(self._pending):09d}", self._pending)
        self._pending = []

    def _finish(self) -> None:
        self._flush_block()
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        tmp, name = self._tmp_path(), self._name()
        self._writer.checksum(tmp)
        size = os.path.getsize(tmp)
        if storage.is_s3(self.output):
            storage.upload_file(tmp, storage.join(self.output, name))
            os.unlink(tmp)
        else:
            os.replace(tmp, os.path.join(self.output, name))
        self.shards.append(ShardInfo(name=name, samples=self._writer.samples, bytes=size, blocks=self._writer.blocks))
        self._writer, self._file, self._in_shard = None, None, 0

    def close(self) -> None:
        if self._pending or self._writer is not None:
            self._finish()

    def publish(self, **fields) -> Manifest:
        """Write ``manifest.json`` for the shards written, last: its presence marks the set complete.
        ``fields``: the manifest's own (seq_len, vocab_size, special_ids, tokenizer_sha256, lowercase, seed)."""
        manifest = Manifest(
            **fields,
            dtype=self.dtype.name,
            num_samples=self.num_samples,
            num_tokens=self.num_tokens,
            samples_per_block=self.samples_per_block,
            shards=self.shards,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            format=FORMAT,
            prefix=self.output,
        )
        storage.write_text(storage.join(self.output, MANIFEST), manifest.to_json())
        return manifest

    def abort(self) -> None:
        """On failure, leave no half-written temp shard in the output dir."""
        if self._file is not None:
            self._file.close()
            Path(self._tmp_path()).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- one unit
@dataclass
class UnitJob:
    """What a worker needs to write one unit's shards (the tokenizer comes once per worker, pool.py)."""

    unit: Unit
    output: str
    eval_output: str | None
    seq_len: int
    samples_per_shard: int
    samples_per_block: int
    dtype: str
    seed: int
    eval_fraction: float
    text_column: str
    settings_sha256: str
    cls_id: int  # the tokenizer's own [CLS] and [SEP] (a model directory may name them <s> </s>: special_roles)
    sep_id: int


def unit_seed(seed: int, unit: int, split: int) -> int:
    """The example builder's seed for one unit's training (split 0) or held-out (1) examples. Unit 0 keeps the
    seeds of a single pass (seed, seed + 1), so a corpus of one unit prepares as before units existed."""
    if unit == 0:
        return seed + split
    return int.from_bytes(hashlib.sha256(f"{seed}/{unit}/{split}".encode()).digest()[:8], "big")


def encoder(tok_json: str) -> Tokenizer:
    """The tokenizer prepare encodes with. A copy: a given tokenizer.json may carry padding/truncation settings,
    and special tokens written in the text (a literal "[SEP]") must not become real [SEP]s, which would break
    token types."""
    enc = Tokenizer.from_str(tok_json)
    enc.no_padding()
    enc.no_truncation()
    enc.encode_special_tokens = True
    return enc


def prepare_unit(job: UnitJob, enc: Tokenizer, report=lambda n: None) -> dict:
    """Tokenize one unit into examples, write its shards (train-UUUUUU-SSSSSS.tar) and then its marker; return
    the marker's content (parts.unit_result)."""
    cls_id, sep_id = job.cls_id, job.sep_id
    u = job.unit.index
    with tempfile.TemporaryDirectory(prefix="electra-prepare-") as workdir:

        def split(where: str | None, name: str, k: int) -> tuple[ShardWriter, ExampleBuilder] | None:
            if where is None:
                return None
            scratch = os.path.join(workdir, name)  # each set stages its own files (on S3 the names are the same)
            os.makedirs(scratch)
            writer = ShardWriter(
                where, job.samples_per_shard, job.samples_per_block, np.dtype(job.dtype), scratch, f"train-{u:06d}-"
            )
            return writer, ExampleBuilder(job.seq_len, cls_id, sep_id, random.Random(unit_seed(job.seed, u, k)))

        train = split(job.output, "train", 0)
        # The held-out set's builder draws from its own generator, so the training set is exactly what a
        # prepare of the training documents alone would write.
        held = split(job.eval_output, "eval", 1) if job.eval_fraction > 0 else None
        sets = [s for s in (train, held) if s is not None]
        documents = held_docs = 0
        try:
            for docs in _batches(unit_documents(job.unit, job.text_column, report), _DOCS_PER_BATCH):
                flat = [s for doc in docs for s in doc]
                # encode_batch_fast: encode_batch's ids without the offsets, which prepare never reads (~18% less CPU)
                encoded = iter(e.ids for e in enc.encode_batch_fast(flat, add_special_tokens=False))
                for doc in docs:
                    is_eval = held is not None and held_out(doc, job.eval_fraction)
                    held_docs += is_eval
                    writer, builder = held if is_eval else train
                    for _ in doc:
                        example = builder.add_sentence(next(encoded))
                        if example is not None:
                            writer.write(example)
                    example = builder.end_document()
                    if example is not None:
                        writer.write(example)
                documents += len(docs)
            for writer, _ in sets:
                writer.close()
        except BaseException:
            for writer, _ in sets:
                writer.abort()
            raise
    result = unit_result(
        u, job.settings_sha256, documents, held_docs, {"train": train[0], "eval": held[0] if held else None}
    )
    write_unit(job.output, result)  # last: the unit counts from here on
    return result


# --------------------------------------------------------------------------------------------- prepare
def prepare(
    inputs: list[str],
    output: str,
    tokenizer: str,
    seq_len: int,
    samples_per_shard: int | None = None,
    seed: int = 12345,
    lowercase: bool = True,
    progress: bool = True,
    samples_per_block: int | None = None,
    text_column: str = "text",
    eval_fraction: float = 0.0,
    eval_output: str | None = None,
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
    tokenizer_sample: int = SAMPLE_BYTES,
    say=None,
    normalization: str | None = None,
) -> Manifest | None:
    """Tokenize ``inputs`` into ELECTRA examples of at most ``seq_len`` tokens, write shards, the tokenizer
    and ``manifest.json`` (last) under ``output``; return the manifest. Blocks default to ~1 MiB of ids
    (``shards.BLOCK_BYTES``), shards to 64 blocks.

    The inputs are cut into units (data/units.py, every ``chunk_bytes``); ``workers`` processes write them.
    Task ``task_index`` of ``num_tasks`` writes its units and its part (data/parts.py); with one task it then
    writes the manifest itself, with several the last to finish does (else ``finalize``), and returns it or
    None. The shards are the same however the units are shared out.

    ``eval_fraction`` > 0 holds out about that share of the *documents* (``held_out``) as a shard set of its own
    at ``eval_output`` (default ``<output>/eval``), for ``eval.shards``: no example of a held-out document is
    in the training set, and a trained vocabulary (``train:N``, learnt from a ``tokenizer_sample``-byte sample
    of the inputs, data/vocab.py) sees only the training documents. The held-out set is complete (its manifest
    written) before the training set's manifest is."""
    started = time.monotonic()
    output = str(output)
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction {eval_fraction} must be in [0, 1): the share of documents held out")
    if not 0 <= task_index < num_tasks:
        raise DataError(f"--task-index {task_index} is not one of the {num_tasks} tasks (0 to {num_tasks - 1})")
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    eval_output = str(eval_output or storage.join(output, "eval")) if eval_fraction > 0 else None
    if (samples_per_shard is not None and samples_per_shard < 1) or (
        samples_per_block is not None and samples_per_block < 1
    ):
        raise ValueError(
            f"samples_per_shard/samples_per_block must be positive, got {samples_per_shard}/{samples_per_block}"
        )
    try:
        roles = special_roles(tokenizer)  # a model directory's own names for [CLS] [SEP]... (XLM-R's <s> </s>...)
        tokenizer, lowercase = resolve_spec(tokenizer, lowercase)  # a model directory: its file and lowercasing
    except ValueError as err:
        raise DataError(f"--tokenizer: {err}") from err
    if is_trained_spec(tokenizer) and num_tasks > 1:
        raise DataError(
            f"--tokenizer {tokenizer} with --num-tasks {num_tasks}: every task must share one vocabulary; learn it "
            f"first with `electra-scale prepare --input ... --output {output} --tokenizer {tokenizer} "
            f"--tokenizer-only`, then give the tasks --tokenizer {storage.join(output, 'tokenizer.json')}"
        )
    files = resolve_inputs(inputs, text_column)
    # Overwriting shards under a live manifest would hand readers a mix of two runs. A split set finalized with
    # this task's very settings (its parts kept) is the exception, checked below: nothing to do.
    finished = [w for w in filter(None, (output, eval_output)) if storage.exists(storage.join(w, MANIFEST))]
    if finished and (num_tasks == 1 or not is_unfinalized(output)):
        _refuse_finished(finished[0])
    sizes = input_sizes(files)
    units = plan_units(files, sizes, chunk_bytes)
    try:  # a tokenizer that cannot be used is the input's fault: one line, exit 2 (cli.py)
        if is_trained_spec(tokenizer):
            tok = train_on_sample(
                units, tokenizer, lowercase, tokenizer_sample, text_column, eval_fraction, say, normalization
            )
        else:
            tok = load_tokenizer(tokenizer, lowercase=lowercase, normalization=normalization)
        ids = special_ids(tok, roles)
    except ValueError as err:
        raise DataError(f"--tokenizer: {err}") from err
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size < 65536 else np.int32)
    per_block = samples_per_block or default_samples_per_block(seq_len, dtype.itemsize)
    settings = dict(
        files=files,
        text_column=text_column,
        tokenizer_sha256=tokenizer_sha256(tok),
        vocab_size=vocab_size,
        special_ids=ids,
        dtype=dtype.name,
        seq_len=seq_len,
        samples_per_shard=samples_per_shard or 64 * per_block,
        samples_per_block=min(per_block, samples_per_shard or per_block),
        seed=seed,
        eval_fraction=eval_fraction,
        eval_output=eval_output,
        lowercase=lowercase,
        normalization=normalization_of(tok),
        chunk_bytes=chunk_bytes,
        num_units=len(units),
        # Units are byte ranges of the inputs: an input whose size changed moves them, so it must not reuse a
        # marker (or be merged with a part) of the inputs before. (Sizes, not mtimes: a copy keeps the size.)
        sizes=sizes,
    )
    sha = settings_sha(settings)
    if finished:
        if finished_with(output, settings):
            manifest = load_manifest(output)
            if say is not None:
                n, m = manifest.num_samples, len(manifest.shards)
                say(f"already finalized: {n:,} examples in {m} shards; nothing to do")
            return manifest
        _refuse_finished(finished[0])
    for where in filter(None, (output, eval_output)):
        if not storage.is_s3(where):
            os.makedirs(where, exist_ok=True)
        save_tokenizer(tok, where)

    mine = assign(units, task_index, num_tasks)
    done = {u.index: r for u in mine if (r := done_unit(output, u.index, sha)) is not None}
    jobs = [
        UnitJob(
            u,
            output,
            eval_output,
            seq_len,
            settings["samples_per_shard"],
            settings["samples_per_block"],
            dtype.name,
            seed,
            eval_fraction,
            text_column,
            sha,
            ids["cls"],
            ids["sep"],
        )
        for u in mine
        if u.index not in done
    ]
    desc = "prepare" if num_tasks == 1 else f"prepare task {task_index}/{num_tasks}"
    results = run_units(jobs, tokenizer_json(tok), workers, progress, desc, encoder, prepare_unit)
    results = sorted([*done.values(), *results], key=lambda r: r["unit"])
    write_part(output, task_index, num_tasks, settings, results, time.monotonic() - started)
    if num_tasks == 1:
        manifest = finalize(output, say=say)
        storage.delete_prefix(storage.join(output, PARTS))
        return manifest
    try:  # the last task to finish finalizes; `prepare --finalize` stays the documented step
        return finalize(output, say=say)
    except DataError as err:  # this task's work is done and counted either way
        if say is not None and "have not finished" not in str(err):
            say(f"task {task_index} done; the set is not finalized: {err}")
        return None


def _refuse_finished(where: str) -> None:
    raise DataError(
        f"{where} already holds a prepared shard set (manifest.json); choose a new output or delete it first"
    )


def _batches(it: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in it:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
