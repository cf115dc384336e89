"""Corpora stored as tables, read with pyarrow for ``electra-scale prepare``: each row's text is a document.

* **Parquet** (``.parquet``; a file, or a directory / prefix of them, as the Hugging Face Hub serves FineWeb,
  C4 or Wikipedia). Read one batch of one row group at a time and only the text column, so memory holds part of
  one row group's text whatever the file's size. On S3 through ranged GETs (``storage.open_seekable``): the
  footer, then the text column's chunk of each row group; the other columns are never fetched.
* **``datasets.save_to_disk`` directories** (``state.json`` + ``dataset_info.json`` + ``data-*.arrow``):
  ``state.json`` lists the ``.arrow`` files, Arrow IPC *streams* of record batches (1,000 rows each by default),
  read batch by batch front to back (``storage.open_read``), so S3 costs one streamed GET per file. A
  DatasetDict (``dataset_dict.json``, one directory per split) is refused, naming its splits: prepare one.

``datasets`` itself is not needed. A null text is skipped, as an empty document is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from electra_scale.data.shards import DataError
from electra_scale.infra import storage

TABLE_SUFFIXES = (".parquet", ".arrow")
# Rows converted to Python strings at a time: small against a row group (often 10^4-10^5 rows of web text).
_ROWS_PER_BATCH = 1024


def _pyarrow():
    # Imported when a table is read: `electra_scale.data` is imported by every dataloader worker, which never
    # needs pyarrow.
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet

    return pa


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --------------------------------------------------------------------------------------------- save_to_disk
def saved_dataset_files(url: str) -> list[str] | None:
    """The ``.arrow`` files of a ``save_to_disk`` directory, in the dataset's row order; None when ``url`` is
    not one. A DatasetDict is a DataError naming its splits."""
    if storage.exists(storage.join(url, "dataset_dict.json")):
        try:
            splits = json.loads(storage.read_text(storage.join(url, "dataset_dict.json")))["splits"]
        except (ValueError, KeyError, TypeError):
            splits = []
        first = storage.join(url, splits[0]) if splits else storage.join(url, "SPLIT")
        raise DataError(
            f"{url} is a DatasetDict saved with save_to_disk (splits: {', '.join(splits) or '?'}); prepare one "
            f"split at a time: --input {first}"
        )
    state_url = storage.join(url, "state.json")
    if not (storage.exists(state_url) and storage.exists(storage.join(url, "dataset_info.json"))):
        return None
    try:
        names = [entry["filename"] for entry in json.loads(storage.read_text(state_url))["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{state_url} is not a datasets state.json (no '_data_files' list of {{filename: ...}}); re-save the "
            "dataset with datasets' save_to_disk"
        ) from err
    if not names:
        raise DataError(f"{state_url} lists no data files: the saved dataset is empty")
    return [storage.join(url, name) for name in names]


# --------------------------------------------------------------------------------------------- reading
def _open_parquet(url: str):
    pa = _pyarrow()
    # A local file is read by pyarrow's own I/O; an S3 object through storage's ranged GETs (retries, endpoint
    # and credentials are storage's).
    source = storage.open_seekable(url) if storage.is_s3(url) else url
    try:
        # pre_buffer=False: with it pyarrow reads ahead whole row groups, without bound (380 MB of RSS instead
        # of 175 for a 257 MB file, docs/data.md); without it, one read per row group's text chunk.
        return pa.parquet.ParquetFile(source, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{url} is not a Parquet file ({_first_line(err)}); leave it out of --input, or rename it if it is "
            "another format prepare reads"
        ) from err


def _open_stream(url: str):
    pa = _pyarrow()
    raw = storage.open_read(url)
    try:
        return pa.ipc.open_stream(raw)
    except (pa.ArrowException, OSError) as err:
        raw.close()
        raise DataError(
            f"{url} is not an Arrow IPC stream, the format of datasets' save_to_disk files ({_first_line(err)})"
        ) from err


def _text_index(url: str, schema: Any, column: str) -> int:
    pa = _pyarrow()
    names = list(schema.names)
    if column not in names:
        raise DataError(
            f"{url} has no column {column!r}; its columns: {', '.join(names) or '(none)'}; "
            "choose the text with --text-column"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        texts = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        raise DataError(
            f"{url}: column {column!r} holds {kind}, not text; choose a string column with --text-column "
            f"(string columns: {', '.join(texts) or 'none'})"
        )
    return names.index(column)


def check_table(url: str, column: str) -> None:
    """Fail before any work if ``url`` cannot be read or lacks a text column ``column`` (reads the footer, or
    the stream's schema, only)."""
    if url.endswith(".parquet"):
        pf = _open_parquet(url)
        try:
            _text_index(url, pf.schema_arrow, column)
        finally:
            pf.close()
        return
    reader = _open_stream(url)
    try:
        _text_index(url, reader.schema, column)
    finally:
        reader.close()


def row_group_bytes(url: str) -> list[int]:
    """The compressed size of each row group of a Parquet file (its footer only): prepare's work units cut a
    large file between row groups (data/units.py)."""
    pf = _open_parquet(url)
    try:
        meta = pf.metadata
        return [
            sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
            for g in range(meta.num_row_groups)
        ]
    finally:
        pf.close()


def row_group_rows(url: str) -> list[int]:
    """The rows of each row group of a Parquet file (its footer only)."""
    pf = _open_parquet(url)
    try:
        return [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    finally:
        pf.close()


def iter_texts(url: str, column: str, row_groups: list[int] | None = None) -> Iterator[str]:
    """Every non-null text of ``column`` in one Parquet or Arrow stream file, in row order (of a Parquet file's
    ``row_groups`` only, if given)."""
    if url.endswith(".parquet"):
        pf = _open_parquet(url)
        try:
            _text_index(url, pf.schema_arrow, column)
            groups = range(pf.metadata.num_row_groups) if row_groups is None else row_groups
            for group in groups:  # one row group in memory at a time
                batches = pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[column], row_groups=[group])
                yield from _texts(url, batches, 0)
        finally:
            pf.close()
        return
    reader = _open_stream(url)
    try:
        yield from _texts(url, reader, _text_index(url, reader.schema, column))
    finally:
        reader.close()


def _texts(url: str, batches, index: int) -> Iterator[str]:
    pa = _pyarrow()
    try:
        for batch in batches:
            for text in batch.column(index).to_pylist():
                if text is not None:
                    yield text
    except (pa.ArrowException, OSError) as err:  # pyarrow raises OSError for a page it cannot decode
        raise DataError(f"{url}: cannot read it ({_first_line(err)}); the file may be truncated or corrupt") from err
