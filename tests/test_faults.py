"""Object-store faults and corrupt shards, against the real SeaweedFS behind our own fault-injecting proxy
(tests/faultproxy.py): resets mid-body, resets on connect, 503 SlowDown, a silent server, the server killed and
restarted mid-object, and truncated / damaged tar shards under data.on_corrupt_shard=error|skip.

The retry budget is made small here (backoff in tens of milliseconds) so that giving up is quick; what is
asserted is the outcome and how many requests the server saw, never a duration. Those counts are of causes: the
faults the proxy injected, plus any read timeout that a loaded machine adds (counted from the retry log), so
that a slow machine changes no assertion.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from electra_scale.data import DataError, PretrainStream, load_manifest, read_block
from electra_scale.data.stream import StreamLayout
from electra_scale.engine.metrics import read_samples
from electra_scale.infra import storage
from tests.cli import run_cli
from tests.faultproxy import FaultProxy
from tests.test_train import metrics, pretrain_args

FAST_RETRIES = {
    "ELECTRA_S3_MAX_ATTEMPTS": "5",
    "ELECTRA_S3_BACKOFF_BASE": "0.02",
    "ELECTRA_S3_BACKOFF_MAX": "0.2",
    # Long: a timeout is a fault of its own, which only the tests that make one (a silent server) should see.
    # Two test files at once on 2 loaded cores took more than 5 s to answer an 8 MiB part.
    "ELECTRA_S3_READ_TIMEOUT": "60",
}
SEED = 12345  # configs/tiny.yaml's train.seed: decides which shard the stream visits when


@pytest.fixture
def proxy(s3_bucket, s3_server, monkeypatch):
    """Our proxy in front of the session's SeaweedFS; this process's boto3 talks to the proxy."""
    fp = FaultProxy(s3_server.endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fp.endpoint)
    for key, value in FAST_RETRIES.items():
        monkeypatch.setenv(key, value)
    storage.reset_client()
    yield fp
    fp.stop()
    storage.reset_client()


def _object(bucket: str, size: int = 1 << 20) -> tuple[str, bytes]:
    url = f"{bucket}/blob-{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    storage.write_bytes(url, data)
    return url, data


def _path(url: str) -> str:
    return "/" + url[len("s3://") :]


def _timeouts(caplog, action: str) -> int:
    """Retries that read timeouts caused for ``action`` (a slow machine, not the proxy), from the retry loop's
    warnings: each one re-sends a request that no injected fault accounts for."""
    messages = [r.getMessage() for r in caplog.records if r.name == "electra_scale"]
    return sum(m.startswith(f"S3 {action} ") and "(ReadTimeoutError" in m for m in messages)


def _ranges(fp: FaultProxy, url: str) -> list[int]:
    """Start offsets of the ranged GETs of ``url`` the server was asked for."""
    path = _path(url)
    return [
        int(r.headers["range"].split("=")[1].split("-")[0])
        for r in fp.requests
        if r.method == "GET" and r.path.split("?")[0] == path and "range" in r.headers
    ]


def _upload_shards(local: str, prefix: str) -> str:
    for name in storage.list_files(local):
        storage.upload_file(Path(local, name), storage.join(prefix, name))
    return prefix


# --------------------------------------------------------------------------------------------- reads
def test_reset_mid_body_resumes_with_a_range_get(proxy, s3_bucket, shards):
    url, data = _object(s3_bucket)
    proxy.reset_after(300_000, times=3, match=f"GET {_path(url)}")
    assert storage.read_bytes(url) == data
    assert proxy.count("reset_after") == 3
    resumed_at = _ranges(proxy, url)
    assert len(resumed_at) == 3 and resumed_at == sorted(resumed_at) and resumed_at[0] > 0, resumed_at

    # A block, as the stream reads it (one ranged GET): the same bytes through broken bodies.
    local, _ = shards
    prefix = _upload_shards(local, f"{s3_bucket}/shards")
    manifest = load_manifest(prefix)
    block = manifest.shards[0].blocks[1]
    shard_url = storage.join(prefix, manifest.shards[0].name)
    proxy.clear()
    proxy.reset_after(2_000, times=2, match=f"GET {_path(shard_url)}")
    got = read_block(prefix, manifest, 0, block)
    want = read_block(local, load_manifest(local), 0, block)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # The whole-range GET breaks; the resumable reader asks for the block again, breaks, resumes mid-block.
    ranges = _ranges(proxy, shard_url)
    assert proxy.count("reset_after") == 2 and ranges[:2] == [block.offset] * 2
    assert block.offset < ranges[2] < block.offset + block.length


def test_object_overwritten_while_resuming_is_refused(proxy, s3_bucket):
    """The resumed GET must continue the same object version: a changed ETag is an error, not spliced bytes."""
    url, data = _object(s3_bucket)
    proxy.reset_after(300_000, match=f"GET {_path(url)}")
    reader = storage.open_read(url)
    assert reader.read(100_000) == data[:100_000]
    storage.write_bytes(url, data[::-1])  # someone rewrites it while we read
    with pytest.raises(storage.StorageError, match=rf"^{url} changed while it was being read \(ETag .+ -> .+\)"):
        while reader.read(1 << 16):
            pass
    reader.close()


def test_slowdown_is_retried_within_the_budget_then_reported(proxy, s3_bucket):
    url, data = _object(s3_bucket)
    proxy.clear()
    proxy.slowdown(times=4)  # budget is 5 tries
    assert storage.read_bytes(url) == data
    assert proxy.count("slowdown") == 4 and len(proxy.requests) == 5

    proxy.clear()
    proxy.slowdown(times=100)
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    message = str(err.value)
    assert message.startswith(f"S3 answered SlowDown (HTTP 503) to read {url}") and "\n" not in message
    assert "gave up after 5 failed tries" in message and "ELECTRA_S3_MAX_ATTEMPTS=5" in message
    assert len(proxy.requests) == 5  # exactly the budget: botocore's own retries do not multiply it

    proxy.clear()
    proxy.slowdown(times=3, match="PUT")
    storage.write_bytes(f"{s3_bucket}/written", b"payload")
    assert proxy.count("slowdown") == 3 and storage.read_bytes(f"{s3_bucket}/written") == b"payload"


def test_reset_on_connect_and_a_silent_server(proxy, s3_bucket, monkeypatch):
    url, data = _object(s3_bucket, 200_000)
    proxy.clear()
    proxy.reset_on_connect(times=3)
    assert storage.exists(url) and storage.read_bytes(url) == data
    assert proxy.count("reset_on_connect") == 3

    monkeypatch.setenv("ELECTRA_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("ELECTRA_S3_MAX_ATTEMPTS", "2")
    storage.reset_client()  # timeouts are the client's
    proxy.clear()
    proxy.blackhole(times=100)  # accepts, reads the request, never answers
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    message = str(err.value)
    assert message.startswith("timed out: the S3 endpoint") and f"to read {url}" in message
    assert "ELECTRA_S3_READ_TIMEOUT" in message and "gave up after 2 failed tries" in message
    assert len(proxy.requests) == 2

    # A body that goes silent half-way times out and resumes where it stopped. Its timeout is the one that
    # must fire; the budget and the timeout leave room for a slow answer to the resumed GET.
    monkeypatch.setenv("ELECTRA_S3_READ_TIMEOUT", "3")
    monkeypatch.setenv("ELECTRA_S3_MAX_ATTEMPTS", "5")
    storage.reset_client()
    proxy.clear()
    proxy.stall_after(100_000, match=f"GET {_path(url)}")  # never released
    assert storage.read_bytes(url) == data
    assert _ranges(proxy, url)[0] > 0


def test_faults_drawn_at_rates_are_counted_when_they_happen(proxy, s3_bucket):
    """The soak's faults (scripts/soak.py): drawn per request, logged only when they took effect. A HEAD has no
    body to truncate, so a truncation drawn for it is no fault; a cut body is resumed, and the bytes are whole."""
    url, data = _object(s3_bucket, 300_000)
    proxy.clear()
    proxy.at_rates({"truncate": 1.0}, seed=0, match="HEAD")
    assert storage.exists(url) and proxy.count("truncate") == 0
    proxy.at_rates({"reset": 0.3, "slowdown": 0.2, "truncate": 0.3}, seed=1, match=f"GET {_path(url)}")
    for _ in range(4):
        assert storage.read_bytes(url) == data
    counts = {kind: proxy.count(kind) for kind in ("reset", "slowdown", "truncate")}
    assert all(counts.values()), counts
    assert {line.split(" ")[0] for _, line in proxy.applied} == {"GET"}
    # Each fault made its GET fail and be asked again (ranged, to resume a cut body): 4 reads, plus one per fault.
    gets = [r for r in proxy.requests if r.method == "GET" and r.path.split("?")[0] == _path(url)]
    assert len(gets) == 4 + sum(counts.values())


def test_permanent_errors_are_not_retried(proxy, s3_bucket, s3_server, monkeypatch):
    proxy.clear()
    with pytest.raises(storage.StorageError, match=rf"^{s3_bucket}/missing does not exist \(read\)\.$"):
        storage.read_bytes(f"{s3_bucket}/missing")
    assert len(proxy.requests) == 1
    proxy.clear()
    with pytest.raises(storage.StorageError, match=r"^S3 bucket 'no-such-bucket-x' does not exist at "):
        storage.read_bytes("s3://no-such-bucket-x/key")
    assert len(proxy.requests) == 1
    proxy.clear()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_client()
    with pytest.raises(storage.StorageError, match=r"rejected the credentials .* check AWS_ACCESS_KEY_ID"):
        storage.write_bytes(f"{s3_bucket}/x", b"x")
    assert len(proxy.requests) == 1


def test_server_killed_and_restarted_in_the_middle_of_an_object(proxy, s3_bucket, s3_server, monkeypatch):
    # Enough to outlast a restart on a loaded machine (each try fails fast while the server is down: backoff of
    # at most 0.5 s, so some minutes of tries); the assertion below is the outcome, not how long it took.
    monkeypatch.setenv("ELECTRA_S3_MAX_ATTEMPTS", "1000")
    monkeypatch.setenv("ELECTRA_S3_BACKOFF_MAX", "0.5")
    url, data = _object(s3_bucket, 16 << 20)  # more than the server's socket buffers hold
    proxy.clear()
    proxy.stall_after(500_000, match=f"GET {_path(url)}")
    result: dict = {}

    def read() -> None:
        try:
            result["data"] = storage.read_bytes(url)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert proxy.stalled.wait(60), "the GET never got going"
        s3_server.kill()  # mid-body: the proxy holds the rest of the response
        proxy.release()
    finally:
        s3_server.restart()
    reader.join(120)
    assert not reader.is_alive()
    assert "error" not in result, result.get("error")
    assert result["data"] == data
    assert max(_ranges(proxy, url)) >= 500_000 - 65536  # resumed near where the body broke


# --------------------------------------------------------------------------------------------- writes
def test_transfers_retry_parts_and_ranges(proxy, s3_bucket, tmp_path, monkeypatch, caplog):
    from electra_scale.infra.storage import ops

    caplog.set_level(logging.WARNING, logger="electra_scale")
    monkeypatch.setattr(ops, "DOWNLOAD_PART_SIZE", 8 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 17 << 20, dtype=np.uint8).tobytes())
    url = f"{s3_bucket}/big.bin"
    proxy.clear()
    proxy.reset_after(0, times=2, match="partNumber=")  # the part was sent, the answer is lost
    proxy.slowdown(times=1, match="partNumber=")
    storage.upload_file(src, url)
    assert storage.read_bytes(url) == src.read_bytes()
    parts = [r for r in proxy.requests if "partNumber=" in r.path]
    assert proxy.count("reset_after") == 2 and proxy.count("slowdown") == 1
    # 3 parts (8 + 8 + 1 MiB), sent once more for each injected fault (and for each timeout, if any).
    assert sorted({_part_number(r.path) for r in parts}) == [1, 2, 3]
    assert len(parts) == 3 + 3 + _timeouts(caplog, "upload part"), [r.path for r in parts]
    for _, line in proxy.applied:  # every part that was hit was sent again after the hit
        assert sum(_part_number(r.path) == _part_number(line) for r in parts) >= 2, line

    proxy.clear()
    caplog.clear()
    proxy.reset_after(1_000_000, times=3, match=f"GET {_path(url)}")
    storage.download_file(url, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    # The ranges are fetched in parallel, so which requests the 3 resets land on depends on timing. On a loaded
    # machine one can land on a resume of the last range (1 MiB in all, so its resume is shorter than the 1 MB
    # a reset waits for) and cut nothing: count the resets that cut a response, each costs exactly one resume.
    cut = proxy.count("reset_after")
    assert cut >= 2, proxy.applied  # only that one short resume can escape its reset
    assert len(_ranges(proxy, url)) == 3 + cut + _timeouts(caplog, "read")  # 3 ranges + a resume per cut


def test_deletes_go_1000_keys_a_request_and_are_retried_whole(proxy, s3_bucket, monkeypatch):
    """Pruning a checkpoint is one listing and one DeleteObjects per 1,000 keys (here 10: 25 keys, 3 requests),
    each retried as a whole after a 503; what was deleted twice is no error."""
    from electra_scale.infra.storage import ops

    monkeypatch.setattr(ops, "DELETE_BATCH", 10)
    names = [f"f{i:02d}" for i in range(25)]
    for name in names:
        storage.write_bytes(f"{s3_bucket}/ckpt/{name}", b"x")
    storage.write_bytes(f"{s3_bucket}/kept", b"x")
    proxy.clear()
    proxy.slowdown(times=1, match="?delete")
    storage.delete_prefix(f"{s3_bucket}/ckpt")
    deletes = [r for r in proxy.requests if r.method == "POST" and "?delete" in r.path]
    assert len(deletes) == 3 + 1 and proxy.count("slowdown") == 1  # 3 batches, one of them sent twice
    assert not [r for r in proxy.requests if r.method == "DELETE"]
    assert storage.list_files(s3_bucket) == ["kept"]


def _part_number(line: str) -> int:
    return int(line.split("partNumber=")[1].split("&")[0].split(" ")[0])


# --------------------------------------------------------------------------------------------- corrupt shards
def _partition_blocks(prefix: str, partitions: int, p: int) -> list[int]:
    """The blocks (ids in the manifest's order) partition ``p`` reads in epoch 0 of the tiny preset's stream,
    in the order it reads them."""
    layout = StreamLayout(load_manifest(prefix), SEED, partitions)
    return [b for w in layout.windows(0, p) for b, _, _ in w.blocks]


def _damage(prefix: str, block: int) -> tuple[Path, int]:
    """Flip one byte in the middle of block ``block``; returns its shard's path and the block's offset."""
    manifest = load_manifest(prefix)
    table = manifest.block_table()
    path = Path(prefix, manifest.shards[table.shard[block]].name)
    data = bytearray(path.read_bytes())
    data[int(table.offset[block] + table.length[block] // 2)] ^= 0x5A
    path.write_bytes(bytes(data))
    return path, int(table.offset[block])


@pytest.fixture
def broken_shards(shards, tmp_path) -> tuple[str, list[int]]:
    """A copy of the shards with two blocks damaged, both inside partition 1 of 2 (rank 1's, on 2 ranks),
    neither straddling into partition 0, both read within its first 80 examples (20 steps of 8)."""
    local, vocab = shards
    copy = tmp_path / "broken"
    shutil.copytree(local, copy)
    p1 = _partition_blocks(str(copy), 2, 1)
    bad = [p1[1], p1[3]]
    assert not set(bad) & set(_partition_blocks(str(copy), 2, 0))
    for b in bad:
        _damage(str(copy), b)
    return str(copy), bad


def _stream(prefix: str, **kw) -> PretrainStream:
    args = dict(seed=SEED, global_batch_size=8, micro_batch_size=4, rank=0, world_size=1, partitions=2, num_workers=0)
    return PretrainStream(prefix, load_manifest(prefix), **{**args, **kw})


def _take(stream, steps: int) -> list[list[int]]:
    """Per step, the examples (indices in the shard set) the stream hands out, sorted by stream position."""
    it = iter(stream)
    out = []
    for _ in range(steps):
        mbs = next(it)
        pos = np.concatenate([mb.positions.numpy() for mb in mbs])
        out.append(np.concatenate([mb.samples.numpy() for mb in mbs])[np.argsort(pos)].tolist())
    return out


def test_corrupt_blocks_are_reported_with_the_byte(broken_shards):
    prefix, bad = broken_shards
    manifest = load_manifest(prefix)
    table = manifest.block_table()
    shard = int(table.shard[bad[0]])
    block = manifest.shards[shard].blocks[bad[0] - int(np.flatnonzero(table.shard == shard)[0])]
    path = os.path.join(prefix, manifest.shards[shard].name)
    with pytest.raises(DataError, match=rf"^shard {path} is corrupt in its block at bytes {block.offset}-"):
        read_block(prefix, manifest, shard, block)


def test_skip_policy_in_the_stream(broken_shards, shards):
    """Under skip a bad block's examples are left out and their slots filled from the same partition: every
    step keeps its size, 1 and 2 ranks hand out the same examples, and the other partition is untouched.
    Under error the first bad block stops the stream."""
    prefix, bad = broken_shards
    clean_prefix, _ = shards
    table = load_manifest(prefix).block_table()
    bad_examples = {int(table.first[b]) + i for b in bad for i in range(int(table.samples[b]))}
    epoch = _stream(prefix).layout.epoch_size
    steps = epoch // 8
    one = _take(_stream(prefix, on_corrupt_shard="skip", micro_batch_size=8), steps)
    clean = _take(_stream(clean_prefix, micro_batch_size=8), steps)
    assert all(len(s) == 8 for s in one) and not bad_examples & {x for s in one for x in s}
    # Partition 0 (even positions) is exactly the clean run's; partition 1 differs only where it had to.
    assert [s[0::2] for s in one] == [s[0::2] for s in clean]
    changed = [(a, b) for s1, s2 in zip(one, clean) for a, b in zip(s1[1::2], s2[1::2]) if a != b]
    assert {b for _, b in changed} <= bad_examples
    assert len(changed) == sum(x in bad_examples for s in clean for x in s) > 0

    ranks = [
        _stream(prefix, on_corrupt_shard="skip", rank=r, world_size=2, micro_batch_size=2, num_workers=w)
        for r, w in ((0, 1), (1, 0))
    ]
    per_rank = [_take(s, steps) for s in ranks]
    assert [sorted(a + b) for a, b in zip(*per_rank)] == [sorted(s) for s in one]
    assert ranks[0].skipped == [] and len(ranks[1].skipped) == 2  # only the rank that owns them saw them

    resumed = _stream(prefix, on_corrupt_shard="skip", micro_batch_size=8, start_step=12)
    assert _take(resumed, steps - 12) == one[12:]

    with pytest.raises(DataError, match=r"is corrupt in its block at bytes"):
        _take(_stream(prefix, micro_batch_size=8), steps)

    for b in set(_partition_blocks(prefix, 2, 1)) - set(bad):  # nothing left to train on: an error, not a loop
        _damage(prefix, b)
    with pytest.raises(DataError, match="every block of partition 1 in epoch 0 .* is corrupt"):
        _take(_stream(prefix, on_corrupt_shard="skip", micro_batch_size=8), steps)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_shard_error_policy_exits_2(shards, tmp_path, damage):
    """A shard that cannot be read in a new run's first step: one line naming the shard and the byte, exit 2, and
    nothing left behind (no output dir, so no empty metrics.jsonl or tensorboard/)."""
    local, vocab = shards
    copy = tmp_path / "broken"
    shutil.copytree(local, copy)
    first = _partition_blocks(str(copy), 64, 0)[0]  # the first block rank 0 reads, on 1 rank
    if damage == "flipped byte":
        path, offset = _damage(str(copy), first)
        needle = f"shard {path} is corrupt in its block at bytes {offset}-"
    else:
        manifest = load_manifest(str(copy))
        table = manifest.block_table()
        path = copy / manifest.shards[table.shard[first]].name
        cut = int(table.offset[first] + table.length[first] // 2)
        path.write_bytes(path.read_bytes()[:cut])
        needle = f"shard {path} is truncated at byte {cut}: its block at "
    out = tmp_path / "run"
    proc = run_cli(pretrain_args((str(copy), vocab), str(out), "train.max_steps=4"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert needle in errors[0] and "re-run `electra-scale prepare`" in errors[0], errors[0]
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_corrupt_blocks_skipped_by_two_ranks(broken_shards, tmp_path):
    """Two bad blocks inside rank 1's partition: both ranks run every step, rank 1 alone reports them, and
    the run trains on the same examples as one rank does."""
    prefix, bad = broken_shards
    vocab = load_manifest(prefix).vocab_size
    steps = 20
    common = (
        f"train.max_steps={steps}",
        "checkpoint.every_steps=10",
        "data.on_corrupt_shard=skip",
        "data.partitions=2",
        "run.record_samples=true",
    )
    two, one = tmp_path / "two", tmp_path / "one"
    proc = run_cli(pretrain_args((prefix, vocab), str(two), *common), ranks=2)
    warnings = [line for line in proc.stderr.splitlines() if "data.on_corrupt_shard=skip: rank" in line]
    assert len(warnings) == 2 and all("[rank 1]" in w for w in warnings), proc.stderr[-3000:]
    assert all("is corrupt in its block at bytes" in w for w in warnings)
    run_cli(pretrain_args((prefix, vocab), str(one), *common))

    assert read_samples(two, "samples") == read_samples(one, "samples")
    assert read_samples(two) == {s + 1: list(range(s * 8, (s + 1) * 8)) for s in range(steps)}
    table = load_manifest(prefix).block_table()
    bad_examples = {int(table.first[b]) + i for b in bad for i in range(int(table.samples[b]))}
    assert not bad_examples & {x for xs in read_samples(two, "samples").values() for x in xs}
    for rank in (0, 1):  # both ranks ran every step
        lines = Path(two, "samples", f"rank_{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    assert sum(m["skipped_blocks"] for m in metrics(str(two))) == 2
    state = json.loads(Path(two, "checkpoints", f"step_{steps:07d}", "trainer_state.json").read_text())
    assert state["data_position"]["partitions"] == 2 and state["data_position"]["samples_seen"] == steps * 8


# --------------------------------------------------------------------------------------------- end to end
def test_training_through_faults_matches_a_clean_run(shards, s3_bucket, s3_server, tmp_path):
    """2 ranks read their shards from S3 through resets mid-body, resets on connect and 503s: the same samples
    at every step and the same losses as the same run without faults."""
    local, vocab = shards
    prefix = _upload_shards(local, f"{s3_bucket}/shards")
    common = ("train.max_steps=16", "checkpoint.every_steps=100", "run.record_samples=true")
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    run_cli(pretrain_args((prefix, vocab), str(clean), *common), ranks=2)

    with FaultProxy(s3_server.endpoint) as fp:
        fp.reset_after(2_000, times=4, match="GET /" + prefix[len("s3://") :] + "/train-")
        fp.slowdown(times=3, match="/train-")
        fp.reset_on_connect(times=2)
        fp.slowdown(times=2)  # any request: the manifest, the tokenizer
        env = {**FAST_RETRIES, "AWS_ENDPOINT_URL": fp.endpoint}
        proc = run_cli(pretrain_args((prefix, vocab), str(faulty), *common), ranks=2, env=env)
        assert fp.pending() == 0, fp.faults  # every fault was injected
        shard_gets = [
            (r.path, r.headers.get("range")) for r in fp.requests if r.method == "GET" and "/train-" in r.path
        ]
        assert len(set(shard_gets)) < len(shard_gets), "no block was asked for again"
    assert "with the resumable reader" in proc.stderr and "resuming at byte" in proc.stderr

    assert read_samples(faulty) == read_samples(clean)
    assert len(read_samples(clean)) == 16
    assert [m["loss"] for m in metrics(str(faulty))] == [m["loss"] for m in metrics(str(clean))]


def test_seaweedfs_ports_are_chosen_together():
    """No chosen port may be another's gRPC port (P + 10000), or weed refuses to start."""
    from electra_scale.infra.s3server import free_ports

    for _ in range(300):
        ports = set(free_ports(("s3", "master", "volume", "filer")).values())
        assert len(ports) == 4 and not ports & {p + 10000 for p in ports}
