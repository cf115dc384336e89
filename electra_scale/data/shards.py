"""The shard set on disk or S3: ``manifest.json`` and webdataset tar shards of token-id arrays.

Layout under a prefix (local dir or s3://bucket/prefix)::

    train-000000.tar ...   samples {"__key__": "000000042", "ids.npy": uint16/int32 [len]} (unpadded)
    tokenizer.json, vocab.txt
    manifest.json          written last: its presence means the shard set is complete

Every rank reads the manifest first, so it knows the epoch size, can refuse a vocab/seq-len mismatch up front
and can compute any stream position without touching the shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from webdataset.tariterators import group_by_keys

from electra_scale import storage

FORMAT = "electra-scale-shards/1"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """A problem with the data itself (missing/corrupt shards, a manifest that does not fit the model)."""


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int


@dataclass
class Manifest:
    seq_len: int
    vocab_size: int
    dtype: str  # numpy dtype of the stored ids: "uint16" when vocab_size < 65536, else "int32"
    special_ids: dict[str, int]
    tokenizer_sha256: str
    lowercase: bool
    seed: int
    num_samples: int
    num_tokens: int
    shards: list[ShardInfo]
    created: str
    format: str = FORMAT
    # Where it was loaded from (for error messages); not part of the JSON.
    prefix: str = field(default="", compare=False, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("prefix")
        return json.dumps({"format": d.pop("format"), **d}, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> Manifest:
        where = storage.join(prefix, MANIFEST) if prefix else MANIFEST
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where} has format {got!r}, expected {FORMAT!r}; re-run `electra-scale prepare`")
        try:
            shards = [ShardInfo(str(s["name"]), int(s["samples"]), int(s["bytes"])) for s in d["shards"]]
            m = cls(
                seq_len=int(d["seq_len"]),
                vocab_size=int(d["vocab_size"]),
                dtype=str(d["dtype"]),
                special_ids={str(k): int(v) for k, v in d["special_ids"].items()},
                tokenizer_sha256=str(d["tokenizer_sha256"]),
                lowercase=bool(d["lowercase"]),
                seed=int(d["seed"]),
                num_samples=int(d["num_samples"]),
                num_tokens=int(d["num_tokens"]),
                shards=shards,
                created=str(d["created"]),
                prefix=prefix,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(
                f"{where} is malformed ({type(err).__name__}: {err}); re-run `electra-scale prepare`"
            ) from err
        if sum(s.samples for s in shards) != m.num_samples or not shards:
            raise DataError(
                f"{where} is inconsistent: its shards hold {sum(s.samples for s in shards)} samples "
                f"but num_samples is {m.num_samples}"
            )
        if m.dtype not in ("uint16", "int32"):
            raise DataError(f"{where} has unsupported dtype {m.dtype!r}")
        return m

    def check_compatible(self, vocab_size: int, seq_len: int) -> None:
        """Refuse to train a model on shards it cannot read correctly (wrong ids or wrong example length)."""
        where = self.prefix or "the shard prefix"
        if vocab_size != self.vocab_size:
            raise DataError(
                f"shards at {where} were tokenized with vocab_size {self.vocab_size} but model.vocab_size is "
                f"{vocab_size}; set model.vocab_size={self.vocab_size} or re-run prepare with a matching "
                "tokenizer"
            )
        if seq_len != self.seq_len:
            raise DataError(
                f"shards at {where} were built with seq_len {self.seq_len} but the training seq_len is "
                f"{seq_len}; "
                f"set the training seq_len to {self.seq_len} or re-run prepare with --seq-len {seq_len}"
            )


def load_manifest(prefix: str) -> Manifest:
    url = storage.join(prefix, MANIFEST)
    if not storage.exists(url):
        raise DataError(f"no manifest.json at {prefix}: is this the output of `electra-scale prepare`?")
    try:
        d = json.loads(storage.read_text(url))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{url} is not valid JSON ({err}); re-run `electra-scale prepare`") from err
    return Manifest.from_dict(d, prefix=prefix)


class _CountingReader(io.RawIOBase):
    """Wraps a stream and counts bytes handed out, so a corrupt shard can be reported with a byte offset."""

    def __init__(self, raw: Any):
        self.raw, self.offset = raw, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.offset += len(data)
        return data

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_shard(url: str, expected_samples: int | None = None, expected_bytes: int | None = None) -> list[np.ndarray]:
    """All samples' id arrays of one shard, in tar order. A truncated or corrupt shard raises ``DataError``
    naming the byte where it broke; pass the manifest's counts to also catch a shard cut exactly between two
    members, or a damaged header (tar itself takes either for the end of the archive).

    A connection that breaks mid-read is not our concern here: ``storage.open_read`` resumes the GET from the
    byte where it broke (docs/faults.md), and raises ``StorageError`` once its retry budget is spent."""
    stream = _CountingReader(storage.open_read(url))
    out: list[np.ndarray] = []
    where = 0  # start of the member being read, for errors in a member's content
    archive: tarfile.TarFile | None = None
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - stream mode; `stream` is closed below

        def files() -> Iterator[dict[str, Any]]:
            nonlocal where
            for info in archive:
                where = info.offset
                if info.isreg():
                    yield {"fname": info.name, "data": archive.extractfile(info).read(), "__url__": url}

        for sample in group_by_keys(files()):  # webdataset's grouping of a sample's files by key
            out.append(np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False))
        tar_end = archive.offset  # where tar stopped: the end-of-archive marker, or a header it could not parse
        while stream.read(1 << 16):  # the end-of-archive padding, so the byte count below is the file's size
            pass
    except tarfile.TarError as err:
        # Data that ran out is reported where it ran out; a header tar refuses, where that header starts.
        at = stream.offset if "unexpected end" in str(err) or archive is None else archive.offset
        raise DataError(f"shard {url} is truncated or corrupt at byte {at}: {err}") from err
    except (KeyError, ValueError, EOFError) as err:  # a member that is not a sample's .npy
        reason = f"a sample lacks {err}" if isinstance(err, KeyError) else str(err).split(" @ ")[0]
        raise DataError(f"shard {url} is corrupt at byte {where}: {reason}") from err
    finally:
        stream.close()
    if expected_bytes is not None and stream.offset != expected_bytes:
        raise DataError(
            f"shard {url} is truncated or corrupt at byte {stream.offset}: the manifest says it has "
            f"{expected_bytes} bytes; re-run `electra-scale prepare`"
        )
    if expected_samples is not None and len(out) != expected_samples:
        raise DataError(
            f"shard {url} holds {len(out)} samples but the manifest says {expected_samples}: it is truncated or "
            f"corrupt at byte {tar_end}, where its tar stops (a damaged header, or overwritten by another "
            "prepare run); re-run `electra-scale prepare`"
        )
    return out
