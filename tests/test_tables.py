"""Corpora as tables: Parquet files and datasets' save_to_disk directories, written here by pyarrow (and one by
datasets itself, tests/data/saved_dataset), prepared into the same shards as the same documents in .jsonl."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from electra_scale.data import DataError, load_manifest, prepare
from electra_scale.data.tables import iter_texts
from electra_scale.infra import storage
from tests.cli import run_cli

SEQ_LEN = 64
FIXTURE = Path(__file__).parent / "data" / "saved_dataset"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vel", "dor", "in", "gra", "pho", "sun", "e", "str", "ous"]


def _documents(n: int) -> list[str]:
    rng = random.Random(3)

    def sentence() -> str:
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(2, 20))]
        return " ".join(words).capitalize() + "."

    return ["\n".join(" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(3)) for _ in range(n)]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _documents(240)


@pytest.fixture(scope="module")
def reference(docs, tmp_path_factory):
    """The documents as .jsonl, prepared: what every table below must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("ref")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "shards"
    manifest = prepare([str(root / "docs.jsonl")], str(out), "train:400", SEQ_LEN, samples_per_block=8, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def vocab(reference) -> str:
    """The reference's tokenizer, given to every other prepare: a WordPiece trained twice on the same texts can
    differ (its merges break ties in a thread-dependent order)."""
    return str(reference[0] / "tokenizer.json")


def _prepare_as_reference(inputs: list[str], out, vocab: str, reference, text_column: str = "text") -> None:
    """Prepare ``inputs`` as the reference was prepared, and check that the shards are the reference's."""
    prepare(inputs, str(out), vocab, SEQ_LEN, samples_per_block=8, progress=False, text_column=text_column)
    _same_shards(out, reference)


def _table(texts: list[str | None]) -> pa.Table:
    """A text column with the other kinds of columns a corpus has (ids, a URL, a score)."""
    return pa.table(
        {
            "id": pa.array(range(len(texts)), pa.int64()),
            "url": [f"https://example.org/{i}" for i in range(len(texts))],
            "content": pa.array(texts, pa.large_string()),
            "score": [0.5] * len(texts),
        }
    )


def _with_nulls(docs: list[str]) -> list[str | None]:
    texts: list[str | None] = list(docs)
    for i in (0, 17, 101):  # a null first, and in the middle of row groups
        texts.insert(i, None)
    return texts


def _same_shards(out: Path | str, reference) -> None:
    ref_out, ref_manifest = reference
    manifest = load_manifest(str(out))
    assert manifest.num_samples == ref_manifest.num_samples > 50
    assert manifest.shards == ref_manifest.shards  # names, sizes, every block's range and CRC-32
    assert manifest.tokenizer_sha256 == ref_manifest.tokenizer_sha256
    for shard in manifest.shards:
        assert storage.read_bytes(storage.join(str(out), shard.name)) == Path(ref_out, shard.name).read_bytes()


def _save_to_disk(directory: Path, table: pa.Table, files: int, batch_rows: int) -> None:
    """What datasets' Dataset.save_to_disk writes: data-0000i-of-0000n.arrow (IPC streams of record batches),
    state.json naming them in order, dataset_info.json."""
    directory.mkdir(parents=True)
    per_file = -(-table.num_rows // files)
    names = []
    for i in range(files):
        name = f"data-{i:05d}-of-{files:05d}.arrow"
        part = table.slice(i * per_file, per_file)
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


# --------------------------------------------------------------------------------------------- parquet
def test_parquet_files_and_directories_make_the_jsonl_shards(docs, reference, vocab, tmp_path):
    """Several row groups, null texts, non-text columns, a text column under another name; split over two files
    in a directory (Hub layout, sorted by name): the same shards as the .jsonl of the same documents."""
    texts = _with_nulls(docs)
    table = _table(texts)
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=25)
    assert pq.ParquetFile(tmp_path / "one.parquet").metadata.num_row_groups == 10
    _prepare_as_reference([str(tmp_path / "one.parquet")], str(tmp_path / "a"), vocab, reference, text_column="content")

    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(table.slice(0, 100), hub / "train-00000-of-00002.parquet", row_group_size=30)
    pq.write_table(table.slice(100), hub / "train-00001-of-00002.parquet", row_group_size=30)
    _prepare_as_reference([str(tmp_path / "hub")], str(tmp_path / "b"), vocab, reference, text_column="content")


def test_parquet_on_s3_fetches_only_the_text_column(docs, reference, vocab, tmp_path, s3_bucket):
    """On S3 a Parquet file is read by ranged GETs of its footer and the text column's chunks: the bulky other
    column is never fetched, and the texts come one row group at a time."""
    bulky = pa.array([f"{i:08d}" * 2000 for i in range(len(docs))])  # 16 kB a row that must stay unread
    table = _table(docs).append_column("html", bulky)
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=40, compression="none")
    url = f"{s3_bucket}/corpus/big.parquet"
    storage.upload_file(tmp_path / "big.parquet", url)
    size = storage.object_size(url)

    storage.reset_io_stats()
    texts = iter_texts(url, "content")
    assert next(texts) == docs[0]
    assert storage.IO.bytes < size / 20  # the footer and the first row group's text chunk
    assert list(texts) == docs[1:]
    assert storage.IO.bytes < size / 5, (storage.IO.bytes, size)

    _prepare_as_reference([f"{s3_bucket}/corpus"], f"{s3_bucket}/shards", vocab, reference, text_column="content")


def test_text_column_names_the_jsonl_field_too(docs, reference, vocab, tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    _prepare_as_reference([str(tmp_path / "docs.jsonl")], str(tmp_path / "a"), vocab, reference, text_column="body")


# --------------------------------------------------------------------------------------------- save_to_disk
def test_save_to_disk_directories_make_the_jsonl_shards(docs, reference, vocab, tmp_path, s3_bucket):
    """A save_to_disk directory of 3 .arrow files of 16-row batches, with null texts, local and on S3."""
    table = _table(_with_nulls(docs)).rename_columns(["id", "url", "text", "score"])
    saved = tmp_path / "saved"
    _save_to_disk(saved, table, files=3, batch_rows=16)
    _prepare_as_reference([str(saved)], str(tmp_path / "a"), vocab, reference)

    for f in sorted(saved.iterdir()):
        storage.upload_file(f, f"{s3_bucket}/saved/{f.name}")
    _prepare_as_reference([f"{s3_bucket}/saved"], str(tmp_path / "b"), vocab, reference)


def test_a_directory_written_by_datasets_itself(tmp_path):
    """tests/data/saved_dataset was written by datasets 5.2.0's save_to_disk (see its README): its texts in
    order, the null one left out."""
    state = json.loads((FIXTURE / "state.json").read_text())
    files = [str(FIXTURE / f["filename"]) for f in state["_data_files"]]
    assert len(files) == 2
    texts = [t for f in files for t in iter_texts(f, "text")]
    expected = [f"Document {i} is about the river and the city." for i in range(60) if i % 7 != 3]
    assert texts == expected
    manifest = prepare([str(FIXTURE)], str(tmp_path / "out"), "train:200", SEQ_LEN, progress=False)
    assert manifest.num_samples == len(expected)  # each short document is one example


# --------------------------------------------------------------------------------------------- errors
def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["prepare", *args], check=False)


def test_bad_tables_are_one_line_and_exit_2(docs, tmp_path):
    pq.write_table(_table(docs[:20]), tmp_path / "t.parquet", row_group_size=5)
    common = ["--tokenizer", "train:100", "--seq-len", str(SEQ_LEN)]

    proc = _cli("--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "o1"), *common)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"electra-scale prepare: error: {tmp_path / 't.parquet'} has no column 'text'; its columns: id, url, "
        "content, score; choose the text with --text-column"
    )
    proc = _cli(
        "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "o2"), "--text-column", "id", *common
    )
    assert proc.returncode == 2
    assert (
        "column 'id' holds int64, not text; choose a string column with --text-column (string columns: url, "
        "content)" in proc.stderr
    )

    (tmp_path / "fake.parquet").write_text('{"text": "a JSON line, not Parquet"}\n')
    proc = _cli("--input", str(tmp_path / "fake.parquet"), "--output", str(tmp_path / "o3"), *common)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(
        f"electra-scale prepare: error: {tmp_path / 'fake.parquet'} is not a Parquet file ("
    )

    saved = tmp_path / "dd"
    _save_to_disk(saved / "train", _table(docs[:10]), files=1, batch_rows=4)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    proc = _cli("--input", str(saved), "--output", str(tmp_path / "o4"), *common)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"electra-scale prepare: error: {saved} is a DatasetDict saved with save_to_disk (splits: train); prepare "
        f"one split at a time: --input {saved / 'train'}"
    )
    (saved / "train" / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    proc = _cli("--input", str(saved / "train"), "--output", str(tmp_path / "o5"), *common)
    assert proc.returncode == 2 and "is not an Arrow IPC stream" in proc.stderr
    # Every input is checked before any work: no output directory was made.
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_a_corrupt_row_group_is_a_data_error(docs, tmp_path):
    pq.write_table(_table(docs), tmp_path / "t.parquet", row_group_size=20)
    data = (tmp_path / "t.parquet").read_bytes()
    # The footer intact, a row group's bytes zeroed: found only when that row group is read.
    (tmp_path / "t.parquet").write_bytes(data[:4] + b"\0" * 20000 + data[20004:])
    with pytest.raises(DataError, match=r"t\.parquet: cannot read it \(.*\); the file may be truncated or corrupt"):
        list(iter_texts(str(tmp_path / "t.parquet"), "content"))
