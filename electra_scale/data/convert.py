"""``electra-scale convert-shards SRC DST``: an ``electra-scale-shards/1`` set (one example per tar member) into
the current block format, keeping every example and its order, so a corpus need not be tokenized again.

The result is what ``prepare`` would have written from the same examples: the same manifest fields (seq_len,
vocab, tokenizer hash, seed...), the tokenizer files copied, ``manifest.json`` written last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator

import numpy as np

from electra_scale.data.shards import LEGACY_FORMAT, MANIFEST, DataError, Manifest, default_samples_per_block
from electra_scale.infra import storage


def _legacy_examples(url: str, expected: int) -> Iterator[np.ndarray]:
    """The ``ids.npy`` of every member of a version-1 shard, in tar order."""
    count = 0
    with storage.open_read(url) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as archive:
                for info in archive:
                    if info.isreg() and info.name.endswith(".ids.npy"):
                        yield np.load(io.BytesIO(archive.extractfile(info).read()), allow_pickle=False)
                        count += 1
        except (tarfile.TarError, ValueError, EOFError) as err:
            raise DataError(f"shard {url} is truncated or corrupt ({err}); it cannot be converted") from err
    if count != expected:
        raise DataError(f"shard {url} holds {count} examples but its manifest says {expected}; it cannot be converted")


def convert(src: str, dst: str, samples_per_block: int | None = None, samples_per_shard: int | None = None) -> Manifest:
    from tqdm import tqdm

    from electra_scale.data.prepare import ShardWriter

    src, dst = str(src), str(dst)
    url = storage.join(src, MANIFEST)
    if not storage.exists(url):
        raise DataError(f"no manifest.json at {src}: is this the output of `electra-scale prepare`?")
    old = json.loads(storage.read_text(url))
    if old.get("format") != LEGACY_FORMAT:
        raise DataError(f"{url} has format {old.get('format')!r}; convert-shards reads {LEGACY_FORMAT!r} sets only")
    if storage.exists(storage.join(dst, MANIFEST)):
        raise DataError(f"{dst} already holds a prepared shard set (manifest.json); choose a new output")
    dtype = np.dtype(old["dtype"])
    per_block = samples_per_block or default_samples_per_block(int(old["seq_len"]), dtype.itemsize)
    if not storage.is_s3(dst):
        os.makedirs(dst, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="electra-convert-") as workdir:
        writer = ShardWriter(dst, samples_per_shard or 64 * per_block, per_block, dtype, workdir)
        try:
            for shard in tqdm(old["shards"], desc="convert-shards", unit="shard"):
                for example in _legacy_examples(storage.join(src, shard["name"]), int(shard["samples"])):
                    writer.write(example)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    if writer.num_samples != int(old["num_samples"]):
        raise DataError(f"{src} yielded {writer.num_samples} examples but its manifest says {old['num_samples']}")
    for name in ("tokenizer.json", "vocab.txt"):
        if storage.exists(storage.join(src, name)):
            storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return writer.publish(
        seq_len=int(old["seq_len"]),
        vocab_size=int(old["vocab_size"]),
        special_ids={str(k): int(v) for k, v in old["special_ids"].items()},
        tokenizer_sha256=str(old["tokenizer_sha256"]),
        lowercase=bool(old["lowercase"]),
        seed=int(old["seed"]),
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=f"an {LEGACY_FORMAT} shard set (local dir or s3://)")
    p.add_argument("dst", help="where to write the converted set (local dir or s3://)")
    p.add_argument("--samples-per-block", type=int, default=None, help="default: ~1 MiB of ids per block")
    p.add_argument("--samples-per-shard", type=int, default=None, help="default: 64 blocks per shard")


def run(args: argparse.Namespace) -> int:
    m = convert(args.src, args.dst, args.samples_per_block, args.samples_per_shard)
    print(f"converted {m.num_samples} examples into {len(m.shards)} shards at {args.dst}")
    return 0
