"""The shard set on disk or S3: ``manifest.json`` and webdataset tar shards of *blocks* of examples.

Layout under a prefix (local dir or s3://bucket/prefix)::

    train-000000-000000.tar  webdataset samples, one per block of up to ``samples_per_block`` examples:
                             {"__key__": "000000042",
                              "lengths.npy": int32 [n]             each example's length,
                              "tokens.npy":  uint16/int32 [sum]    the examples' ids, unpadded, end to end}
    tokenizer.json, vocab.txt
    manifest.json          written last: its presence means the shard set is complete

Why blocks: one tar member (and one ``.npy`` header) per example made decoding cost ~100 us per example, so a
core decoded ~10k examples/s. A block of ~1 MiB decodes with two header parses and one ``frombuffer``, and it
is the unit a rank fetches with one ranged GET: the manifest records every block's byte range and CRC-32, so
a rank reads the blocks of its own partition and nothing else (data/stream.py).

``webdataset.WebDataset(url).decode()`` opens these shards as they are: each block is one sample dict.

Every rank reads the manifest first, so it knows the epoch size, can refuse a vocab/seq-len mismatch up front
and can compute where any example lives without touching the shards.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from electra_scale.infra import storage

FORMAT = "electra-scale-shards/2"
LEGACY_FORMAT = "electra-scale-shards/1"  # one example per tar member; converted by `convert-shards`
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 20  # default block size: ~1 MiB of ids, one ranged GET


class DataError(ValueError):
    """A problem with the data itself (missing/corrupt shards, a manifest that does not fit the model)."""


@dataclass
class BlockInfo:
    offset: int  # byte offset of the block's first tar header in its shard
    length: int  # bytes from there to the end of its last member (headers, data, padding)
    samples: int
    crc32: int  # zlib.crc32 of those bytes


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    blocks: list[BlockInfo] = field(default_factory=list)


def default_samples_per_block(seq_len: int, itemsize: int = 2) -> int:
    return max(1, BLOCK_BYTES // (seq_len * itemsize))


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
    samples_per_block: int
    shards: list[ShardInfo]
    created: str
    format: str = FORMAT
    # Where it was loaded from (for error messages); not part of the JSON.
    prefix: str = field(default="", compare=False, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("prefix")
        for s in d["shards"]:  # one short line per block: the index of a large set stays a few MB
            s["blocks"] = [[b["offset"], b["length"], b["samples"], b["crc32"]] for b in s["blocks"]]
        text = json.dumps({"format": d.pop("format"), **d}, indent=1)
        return text + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> Manifest:
        where = storage.join(prefix, MANIFEST) if prefix else MANIFEST
        if isinstance(d, dict) and d.get("format") == LEGACY_FORMAT:
            src = prefix or "SRC"
            raise DataError(
                f"{where} is an {LEGACY_FORMAT} shard set (one example per tar member), which this version no "
                f"longer streams; convert it, keeping every example and its order: `electra-scale "
                f"convert-shards {src} {src.rstrip('/')}-v2`, then point data.shards at the new prefix"
            )
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where} has format {got!r}, expected {FORMAT!r}; re-run `electra-scale prepare`")
        try:
            shards = [
                ShardInfo(
                    str(s["name"]),
                    int(s["samples"]),
                    int(s["bytes"]),
                    [BlockInfo(int(o), int(n), int(k), int(c)) for o, n, k, c in s["blocks"]],
                )
                for s in d["shards"]
            ]
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
                samples_per_block=int(d["samples_per_block"]),
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
        for s in shards:
            if sum(b.samples for b in s.blocks) != s.samples or any(b.samples < 1 for b in s.blocks):
                raise DataError(f"{where} is inconsistent: the blocks of {s.name} do not add up to its samples")
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

    def block_table(self) -> BlockTable:
        return BlockTable(self)


class BlockTable:
    """Every block of the set in corpus order, as arrays: which shard, where, how many examples, the CRC, and
    the corpus index of its first example (examples are numbered 0..num_samples-1 in prepare's order)."""

    def __init__(self, manifest: Manifest):
        blocks = [(i, b) for i, s in enumerate(manifest.shards) for b in s.blocks]
        self.names = [s.name for s in manifest.shards]
        self.shard = np.array([i for i, _ in blocks], dtype=np.int64)
        self.offset = np.array([b.offset for _, b in blocks], dtype=np.int64)
        self.length = np.array([b.length for _, b in blocks], dtype=np.int64)
        self.samples = np.array([b.samples for _, b in blocks], dtype=np.int64)
        self.crc32 = np.array([b.crc32 for _, b in blocks], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.samples)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.samples)


def load_manifest(prefix: str) -> Manifest:
    url = storage.join(prefix, MANIFEST)
    if not storage.exists(url):
        if any(n.startswith("part-") for n in storage.list_files(storage.join(prefix, "parts"))):
            raise DataError(
                f"{prefix} is not finalized: it holds the parts of a split prepare but no manifest.json; run "
                f"`electra-scale prepare --finalize --output {prefix}` once every task has finished"
            )
        raise DataError(f"no manifest.json at {prefix}: is this the output of `electra-scale prepare`?")
    try:
        d = json.loads(storage.read_text(url))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{url} is not valid JSON ({err}); re-run `electra-scale prepare`") from err
    return Manifest.from_dict(d, prefix=prefix)


# --------------------------------------------------------------------------------------------- writing
def _webdataset():
    """webdataset, imported without torch where torch is not loaded yet: its tar writer needs none, and
    webdataset imports torch when it can (0.9 CPU-s and ~200 MB in every prepare process and worker)."""
    if "webdataset" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment] - how Python marks a module as unimportable
        try:
            import webdataset
        finally:
            del sys.modules["torch"]
    import webdataset

    return webdataset


class BlockWriter:
    """Writes blocks into one open tar shard through webdataset's ``TarWriter`` and records, for each, the
    byte range it took (the tar's own offset before and after) and its CRC-32."""

    def __init__(self, fileobj: Any, dtype: np.dtype):
        wds = _webdataset()
        self.fileobj, self.dtype = fileobj, np.dtype(dtype)
        # mtime fixed so re-running prepare gives byte-identical shards.
        self.writer = wds.TarWriter(fileobj, mtime=0)
        self.blocks: list[BlockInfo] = []
        self.samples = 0

    def write(self, key: str, examples: list[np.ndarray] | list[list[int]]) -> None:
        lengths = np.array([len(e) for e in examples], dtype=np.int32)
        tokens = np.concatenate([np.asarray(e, dtype=self.dtype) for e in examples]) if examples else np.zeros(0)
        self.write_arrays(key, tokens.astype(self.dtype, copy=False), lengths)

    def write_arrays(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tar = self.writer.tarstream
        start = tar.offset
        self.writer.write({"__key__": key, "lengths.npy": lengths.astype(np.int32), "tokens.npy": tokens})
        end = tar.offset
        self.blocks.append(BlockInfo(start, end - start, len(lengths), 0))
        self.samples += len(lengths)

    def close(self) -> int:
        """Finish the tar; fill in the CRCs from the written file; returns the shard's size in bytes."""
        self.writer.close()
        return self.fileobj.tell() if hasattr(self.fileobj, "tell") else 0

    def checksum(self, path: str) -> None:
        with open(path, "rb") as f:
            for b in self.blocks:
                f.seek(b.offset)
                b.crc32 = zlib.crc32(f.read(b.length))


# --------------------------------------------------------------------------------------------- reading
def _npy(member: memoryview, what: str) -> np.ndarray:
    """A .npy member as an array *viewing* the block's bytes (no copy): only the header is parsed."""
    head = io.BytesIO(member[:256].tobytes())
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    if fortran or len(shape) != 1:
        raise ValueError(f"{what} is not a flat array")
    count = int(shape[0])
    if head.tell() + count * dtype.itemsize > len(member):
        raise ValueError(f"{what} is shorter than its header says")
    return np.frombuffer(member, dtype=dtype, count=count, offset=head.tell())


def decode_block(data: bytes | bytearray, expect: BlockInfo, where: str, dtype: str, seq_len: int):
    """(tokens, lengths) of one block's bytes, verified against the manifest: size, CRC-32, tar headers, the
    two arrays and their sizes. Anything off raises ``DataError`` naming the shard and byte."""
    if not data and expect.length:
        raise DataError(
            f"shard {where} is truncated: it ends before byte {expect.offset}, where one of its blocks starts; "
            "re-run `electra-scale prepare`"
        )
    if len(data) != expect.length:
        raise DataError(
            f"shard {where} is truncated at byte {expect.offset + len(data)}: its block at byte {expect.offset} "
            f"needs {expect.length} bytes; re-run `electra-scale prepare`"
        )
    if zlib.crc32(data) != expect.crc32:
        raise DataError(
            f"shard {where} is corrupt in its block at bytes {expect.offset}-{expect.offset + expect.length} "
            "(CRC-32 mismatch): it was damaged or overwritten; re-run `electra-scale prepare`"
        )
    view, pos, arrays = memoryview(data), 0, {}
    try:
        while pos < len(view):
            info = tarfile.TarInfo.frombuf(view[pos : pos + 512].tobytes(), "utf-8", "surrogateescape")
            body = view[pos + 512 : pos + 512 + info.size]
            arrays[info.name.rpartition(".")[0].rpartition(".")[2]] = _npy(body, info.name)
            pos += 512 + -(-info.size // 512) * 512
        tokens, lengths = arrays["tokens"], arrays["lengths"]
    except (tarfile.TarError, ValueError, KeyError) as err:
        raise DataError(f"shard {where} is corrupt in its block at byte {expect.offset + pos}: {err}") from err
    if len(lengths) != expect.samples or int(lengths.sum()) != len(tokens) or tokens.dtype != np.dtype(dtype):
        raise DataError(
            f"shard {where}: the block at byte {expect.offset} holds {len(lengths)} examples of {tokens.dtype}, "
            f"the manifest says {expect.samples} of {dtype}; re-run `electra-scale prepare`"
        )
    if len(lengths) and int(lengths.max()) > seq_len:
        raise DataError(f"shard {where}: an example at byte {expect.offset} is longer than seq_len {seq_len}")
    return tokens, lengths


def read_block(prefix: str, manifest: Manifest, shard: int, block: BlockInfo):
    """One block's (tokens, lengths), fetched with one ranged GET."""
    url = storage.join(prefix, manifest.shards[shard].name)
    data = storage.read_range(url, block.offset, block.offset + block.length)
    return decode_block(data, block, url, manifest.dtype, manifest.seq_len)


def read_shard(prefix: str, manifest: Manifest, shard: int) -> list[np.ndarray]:
    """Every example of one shard, in order (for tools and tests; training reads blocks)."""
    out: list[np.ndarray] = []
    for block in manifest.shards[shard].blocks:
        tokens, lengths = read_block(prefix, manifest, shard, block)
        out.extend(np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else [])
    return out
