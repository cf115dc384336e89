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
import json
import os
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from electra_scale.data.shards import (
    FORMAT,
    MANIFEST,
    BlockWriter,
    DataError,
    Manifest,
    ShardInfo,
    default_samples_per_block,
)
from electra_scale.data.tables import TABLE_SUFFIXES, check_table, iter_texts, saved_dataset_files
from electra_scale.data.tokenizer import (
    load_tokenizer,
    normalization_of,
    resolve_spec,
    save_tokenizer,
    special_ids,
    special_roles,
    tokenizer_sha256,
)
from electra_scale.infra import storage

Document = list[str]  # a document's sentences, in order

# Split after . ! ? (optionally followed by a closing quote/bracket) when the next sentence starts with an
# uppercase letter, a digit or an opening quote. Deliberately simple: "Mr. Smith" is split, which only
# moves a segment boundary by a few tokens.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")

# Documents tokenized per encode_batch call: large enough for the Rust tokenizer's thread pool.
_DOCS_PER_BATCH = 512


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(paragraph)) if s]


# --------------------------------------------------------------------------------------------- reading
_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".parquet")


def _input_kind(url: str) -> str:
    if url.endswith(TABLE_SUFFIXES):
        return "table"
    name = url[:-3] if url.endswith(".gz") else url
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise DataError(
        f"unsupported input {url}: expected .txt or .jsonl files (optionally .gz), .parquet files, or a "
        "datasets save_to_disk directory"
    )


def resolve_inputs(inputs: list[str], text_column: str = "text") -> list[str]:
    """Check every input exists and every table has the text column (fail before any work); a directory or
    prefix expands to the supported files below it, a save_to_disk directory to its .arrow files."""
    files: list[str] = []
    for url in inputs:
        url = str(url)
        is_local_dir = not storage.is_s3(url) and Path(url).is_dir()
        if not is_local_dir and storage.exists(url):
            _input_kind(url)
            files.append(url)
            continue
        saved = saved_dataset_files(url)
        if saved is not None:
            files.extend(saved)
            continue
        below = [n for n in storage.list_files(url) if n.endswith(_SUFFIXES)]
        if not below:
            raise DataError(
                f"input {url} does not exist (or holds no .txt/.jsonl/.parquet files and is no save_to_disk directory)"
            )
        files.extend(storage.join(url, n) for n in below)
    for url in files:
        if _input_kind(url) == "table":
            check_table(url, text_column)
    return files


def _paragraphs(text: str) -> Document:
    return [p.strip() for p in text.splitlines() if p.strip()]


def iter_documents(url: str, text_column: str = "text") -> Iterator[Document]:
    """The documents of one input file, each as its list of paragraphs (non-empty, stripped lines)."""
    kind = _input_kind(url)
    if kind == "table":
        for text in iter_texts(url, text_column):
            doc = _paragraphs(text)
            if doc:
                yield doc
        return
    if kind == "jsonl":
        for lineno, line in enumerate(storage.iter_lines(url), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{url} line {lineno}: not valid JSON ({err})") from err
            if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
                raise DataError(f'{url} line {lineno}: expected an object with a string "{text_column}" field')
            doc = _paragraphs(obj[text_column])
            if doc:
                yield doc
        return
    doc: Document = []
    for line in storage.iter_lines(url):
        line = line.strip()
        if line:
            doc.append(line)
        elif doc:  # a blank line ends the document
            yield doc
            doc = []
    if doc:
        yield doc


def iter_corpus(files: list[str], text_column: str = "text") -> Iterator[Document]:
    """Every document of every input, as its list of sentences."""
    for url in files:
        for paragraphs in iter_documents(url, text_column):
            yield [s for p in paragraphs for s in split_sentences(p)]


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
    """Writes ``train-%06d.tar`` shards of ``samples_per_shard`` examples, in blocks of ``samples_per_block``
    (a shard's last block may be shorter), and publishes each shard as soon as it is complete: renamed into
    place locally, or uploaded from a temp dir (then deleted) for S3. ``prepare``, ``convert-shards`` and the
    bench's synthetic sets all write through here."""

    def __init__(self, output: str, samples_per_shard: int, samples_per_block: int, dtype: np.dtype, workdir: str):
        if samples_per_shard < 1 or samples_per_block < 1:
            raise ValueError("samples_per_shard and samples_per_block must be positive")
        self.output, self.dtype = output, np.dtype(dtype)
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
        return f"train-{len(self.shards):06d}.tar"

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
    normalization: str | None = None,
) -> Manifest:
    """Tokenize ``inputs`` into ELECTRA examples of at most ``seq_len`` tokens, write shards, the tokenizer
    and ``manifest.json`` (last) under ``output``; return the manifest. Blocks default to ~1 MiB of ids
    (``shards.BLOCK_BYTES``), shards to 64 blocks.

    ``eval_fraction`` > 0 holds out about that share of the *documents* (``held_out``) as a shard set of its own
    at ``eval_output`` (default ``<output>/eval``), for ``eval.shards``: no example of a held-out document is
    in the training set, and a trained vocabulary (``train:N``) sees only the training documents. The held-out
    set is complete (its manifest written) before the training set's manifest is."""
    output = str(output)
    if seq_len < 8:
        raise ValueError(f"seq_len must be at least 8, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction {eval_fraction} must be in [0, 1): the share of documents held out")
    eval_output = str(eval_output or storage.join(output, "eval")) if eval_fraction > 0 else None
    if (samples_per_shard is not None and samples_per_shard < 1) or (
        samples_per_block is not None and samples_per_block < 1
    ):
        raise ValueError(
            f"samples_per_shard/samples_per_block must be positive, got {samples_per_shard}/{samples_per_block}"
        )
    files = resolve_inputs(inputs, text_column)
    for where in filter(None, (output, eval_output)):
        if storage.exists(storage.join(where, MANIFEST)):
            # Overwriting shards under a live manifest would hand readers a mix of two runs.
            raise DataError(
                f"{where} already holds a prepared shard set (manifest.json); choose a new output or delete it first"
            )

    def documents() -> Iterator[tuple[bool, Document]]:  # (held out?, the document's sentences)
        for doc in iter_corpus(files, text_column):
            yield (eval_fraction > 0 and held_out(doc, eval_fraction)), doc

    def texts() -> Iterator[str]:
        for is_eval, doc in documents():
            if not is_eval:
                yield from doc

    try:  # a tokenizer that cannot be used is the input's fault: one line, exit 2 (cli.py)
        roles = special_roles(tokenizer)  # a model directory's own names for [CLS] [SEP]... (XLM-R's <s> </s>...)
        tokenizer, lowercase = resolve_spec(tokenizer, lowercase)  # a model directory: its file and lowercasing
        tok = load_tokenizer(tokenizer, texts=texts, lowercase=lowercase, normalization=normalization)
        ids = special_ids(tok, roles)
    except ValueError as err:
        raise DataError(f"--tokenizer: {err}") from err
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size < 65536 else np.int32)

    # Encode from a copy: a given tokenizer.json may carry padding/truncation settings, and special tokens
    # written in the text (a literal "[SEP]") must not become real [SEP]s, which would break token types.
    enc = Tokenizer.from_str(tok.to_str())
    enc.no_padding()
    enc.no_truncation()
    enc.encode_special_tokens = True

    if not storage.is_s3(output):
        os.makedirs(output, exist_ok=True)
    if eval_output and not storage.is_s3(eval_output):
        os.makedirs(eval_output, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="electra-prepare-") as workdir:
        per_block = samples_per_block or default_samples_per_block(seq_len, dtype.itemsize)

        def split(where: str | None, name: str, rng_seed: int) -> tuple[ShardWriter, ExampleBuilder] | None:
            if where is None:
                return None
            scratch = os.path.join(workdir, name)  # each set stages its own files (on S3 the names are the same)
            os.makedirs(scratch)
            writer = ShardWriter(where, samples_per_shard or 64 * per_block, per_block, dtype, scratch)
            return writer, ExampleBuilder(seq_len, ids["cls"], ids["sep"], random.Random(rng_seed))

        train = split(output, "train", seed)
        # The held-out set's builder draws from its own generator, so the training set is exactly what a
        # prepare of the training documents alone would write.
        held = split(eval_output, "eval", seed + 1)
        sets = [s for s in (train, held) if s is not None]
        bar = tqdm(desc="prepare", unit="doc", disable=not progress)
        try:
            for docs in _batches(documents(), _DOCS_PER_BATCH):
                flat = [s for _, doc in docs for s in doc]
                encoded = iter(e.ids for e in enc.encode_batch(flat, add_special_tokens=False))
                for is_eval, doc in docs:
                    writer, builder = held if is_eval else train
                    for _ in doc:
                        example = builder.add_sentence(next(encoded))
                        if example is not None:
                            writer.write(example)
                    example = builder.end_document()
                    if example is not None:
                        writer.write(example)
                bar.update(len(docs))
                bar.set_postfix(samples=train[0].num_samples, shards=len(train[0].shards), refresh=False)
            for writer, _ in sets:
                writer.close()
        except BaseException:
            for writer, _ in sets:
                writer.abort()
            raise
        finally:
            bar.close()
    writer = train[0]
    if writer.num_samples == 0:
        raise DataError(f"inputs {files} produced no examples (are they empty?)")
    fields = dict(
        seq_len=seq_len,
        vocab_size=vocab_size,
        special_ids=ids,
        tokenizer_sha256=tokenizer_sha256(tok),
        lowercase=lowercase,
        seed=seed,
        normalization=normalization_of(tok),
    )
    if held is not None:
        if held[0].num_samples == 0:
            raise DataError(
                f"--eval-fraction {eval_fraction} held out none of the documents of {files}; raise it, or leave "
                "it out for no held-out set"
            )
        save_tokenizer(tok, eval_output)
        held[0].publish(**fields)
    save_tokenizer(tok, output)
    return writer.publish(**fields)


def held_out(doc: Document, fraction: float) -> bool:
    """Whether ``prepare --eval-fraction`` holds this document out: a hash of its text below ``fraction``. The
    choice depends on the document alone, not on its place in the corpus or the seed, so the same text is held
    out in every prepare of any corpus that has it, and a duplicate of a held-out document is held out with it."""
    digest = hashlib.sha256("\n".join(doc).encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def _batches(it: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in it:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
