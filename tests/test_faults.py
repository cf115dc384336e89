"""Object-store faults and corrupt shards, against the real SeaweedFS behind our own fault-injecting proxy
(tests/faultproxy.py): resets mid-body, resets on connect, 503 SlowDown, a silent server, the server killed and
restarted mid-object, and truncated / damaged tar shards under data.on_corrupt_shard=error|skip.

The retry budget is made small here (backoff in tens of milliseconds) so that giving up is quick; what is
asserted is the outcome and how many requests the server saw, never a duration.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from electra_scale import storage
from electra_scale.data import DataError, PretrainStream, load_manifest, read_shard
from electra_scale.data.stream import StreamLayout
from electra_scale.metrics import read_samples
from tests.faultproxy import FaultProxy
from tests.test_train import metrics, pretrain_args, run_cli

FAST_RETRIES = {
    "ELECTRA_S3_MAX_ATTEMPTS": "5",
    "ELECTRA_S3_BACKOFF_BASE": "0.02",
    "ELECTRA_S3_BACKOFF_MAX": "0.2",
    "ELECTRA_S3_READ_TIMEOUT": "5",
}
SEED = 12345  # configs/tiny.yaml's train.seed: decides which shard the stream visits when


@pytest.fixture
def proxy(s3_bucket, s3_server, monkeypatch):
    """Our proxy in front of the session's SeaweedFS; this process's boto3 talks to the proxy."""
    fp = FaultProxy(s3_server.endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", fp.endpoint)
    for key, value in FAST_RETRIES.items():
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    yield fp
    fp.stop()
    storage.s3_client.cache_clear()


def _object(bucket: str, size: int = 1 << 20) -> tuple[str, bytes]:
    url = f"{bucket}/blob-{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    storage.write_bytes(url, data)
    return url, data


def _path(url: str) -> str:
    return "/" + url[len("s3://") :]


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

    # A shard through the streaming reader: same samples as the local file, resumed mid-tar.
    local, _ = shards
    prefix = _upload_shards(local, f"{s3_bucket}/shards")
    info = load_manifest(local).shards[0]
    shard_url = storage.join(prefix, info.name)
    proxy.clear()
    proxy.reset_after(20_000, times=2, match=f"GET {_path(shard_url)}")
    got = read_shard(shard_url, expected_samples=info.samples, expected_bytes=info.bytes)
    want = read_shard(os.path.join(local, info.name))
    assert [a.tolist() for a in got] == [b.tolist() for b in want]
    assert proxy.count("reset_after") == 2 and len(_ranges(proxy, shard_url)) == 2


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
    storage.s3_client.cache_clear()  # timeouts are the client's
    proxy.clear()
    proxy.blackhole(times=100)  # accepts, reads the request, never answers
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    message = str(err.value)
    assert message.startswith("timed out: the S3 endpoint") and f"to read {url}" in message
    assert "ELECTRA_S3_READ_TIMEOUT" in message and "gave up after 2 failed tries" in message
    assert len(proxy.requests) == 2

    # A body that goes silent half-way times out and resumes where it stopped.
    proxy.clear()
    proxy.stall_after(100_000, match=f"GET {_path(url)}")  # never released
    assert storage.read_bytes(url) == data
    assert _ranges(proxy, url)[0] > 0


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
    storage.s3_client.cache_clear()
    with pytest.raises(storage.StorageError, match=r"rejected the credentials .* check AWS_ACCESS_KEY_ID"):
        storage.write_bytes(f"{s3_bucket}/x", b"x")
    assert len(proxy.requests) == 1


def test_server_killed_and_restarted_in_the_middle_of_an_object(proxy, s3_bucket, s3_server, monkeypatch):
    monkeypatch.setenv("ELECTRA_S3_MAX_ATTEMPTS", "40")  # enough to outlast a restart
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
def test_transfers_retry_parts_and_ranges(proxy, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "DOWNLOAD_PART_SIZE", 8 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 17 << 20, dtype=np.uint8).tobytes())
    url = f"{s3_bucket}/big.bin"
    proxy.clear()
    proxy.reset_after(0, times=2, match="partNumber=")  # the part was sent, the answer is lost
    proxy.slowdown(times=1, match="partNumber=")
    storage.upload_file(src, url)
    parts = [r for r in proxy.requests if "partNumber=" in r.path]
    assert proxy.count("reset_after") == 2 and proxy.count("slowdown") == 1
    assert len(parts) == 3 + 3  # 3 parts (8 + 8 + 1 MiB), 3 of them sent twice

    proxy.clear()
    proxy.reset_after(1_000_000, times=3, match=f"GET {_path(url)}")
    storage.download_file(url, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    assert proxy.count("reset_after") == 3 and len(_ranges(proxy, url)) == 3 + 3  # 3 ranges + 3 resumes


# --------------------------------------------------------------------------------------------- corrupt shards
def _stream_order(local: str) -> list[str]:
    """Shard names in the order epoch 0 of the tiny preset's stream visits them."""
    manifest = load_manifest(local)
    order, _ = StreamLayout(manifest, SEED).epoch(0)
    return [manifest.shards[j].name for j in order]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: 5 * 1024 + 600])  # inside the 6th member's data (512-byte header + data blocks)


def _damage_header(path: Path) -> int:
    """Flip one byte in the name field of the 3rd member's header; returns the header's offset."""
    import tarfile

    with tarfile.open(path) as tf:
        offset = tf.getmembers()[2].offset
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x5A
    path.write_bytes(bytes(data))
    return offset


@pytest.fixture
def broken_shards(shards, tmp_path) -> tuple[str, list[str], int]:
    """A copy of the shards with the 2nd visited shard truncated and the 3rd's 3rd tar header damaged."""
    local, vocab = shards
    copy = tmp_path / "broken"
    shutil.copytree(local, copy)
    names = _stream_order(local)
    _truncate(copy / names[1])
    offset = _damage_header(copy / names[2])
    return str(copy), names, offset


def test_corrupt_shards_are_reported_with_the_byte(broken_shards):
    prefix, names, offset = broken_shards
    manifest = load_manifest(prefix)
    info = {s.name: s for s in manifest.shards}
    truncated, damaged = os.path.join(prefix, names[1]), os.path.join(prefix, names[2])
    with pytest.raises(DataError, match=rf"^shard {truncated} is truncated or corrupt at byte 5720: unexpected end"):
        read_shard(truncated, info[names[1]].samples, info[names[1]].bytes)
    # tar takes a damaged header for the end of the archive; the manifest's count catches it, at that byte.
    with pytest.raises(DataError, match=rf"^shard {damaged} holds 2 samples but the manifest says \d+: it is "):
        read_shard(damaged, info[names[2]].samples, info[names[2]].bytes)
    with pytest.raises(DataError, match=rf"truncated or corrupt at byte {offset}, where its tar stops"):
        read_shard(damaged, info[names[2]].samples, info[names[2]].bytes)


def _good_positions(prefix: str, bad: set[str], count: int) -> list[int]:
    """The first ``count`` stream positions that are not in a shard of ``bad``."""
    manifest = load_manifest(prefix)
    layout = StreamLayout(manifest, SEED)
    good: list[int] = []
    for epoch in range(count):  # more than enough: every epoch has a good shard
        order, starts = layout.epoch(epoch)
        for i, j in enumerate(order):
            if manifest.shards[j].name not in bad:
                first = epoch * layout.epoch_size + int(starts[i])
                good.extend(range(first, first + manifest.shards[j].samples))
        if len(good) >= count:
            return good[:count]
    raise AssertionError("unreachable")


def _stream(prefix: str, **kw) -> PretrainStream:
    args = dict(seed=SEED, global_batch_size=8, micro_batch_size=4, rank=0, world_size=1, num_workers=0)
    return PretrainStream(prefix, load_manifest(prefix), **{**args, **kw})


def _take(stream, steps: int) -> list[list[int]]:
    it = iter(stream)
    return [sorted(int(p) for mb in next(it) for p in mb.positions) for _ in range(steps)]


def test_skip_policy_in_the_stream(broken_shards):
    """Under skip every rank leaves out the same shards, batches fill from the samples that follow, and a
    resume from the saved position continues exactly; under error the first bad shard stops the stream."""
    prefix, names, _ = broken_shards
    steps = 20
    expected = _good_positions(prefix, {names[1], names[2]}, steps * 8)
    one = _take(_stream(prefix, on_corrupt_shard="skip", micro_batch_size=8), steps)
    assert one == [sorted(expected[s * 8 : (s + 1) * 8]) for s in range(steps)]
    ranks = [_stream(prefix, on_corrupt_shard="skip", rank=r, world_size=2, num_workers=w) for r, w in ((0, 1), (1, 0))]
    per_rank = [_take(s, steps) for s in ranks]
    assert [sorted(a + b) for a, b in zip(*per_rank)] == one
    assert ranks[0].skipped_shards[:2] == ranks[1].skipped_shards[:2] == [names[1], names[2]]

    full = _stream(prefix, on_corrupt_shard="skip")
    taken = _take(full, 12)
    saved = full.position(12)
    n_skipped = sum(s.samples for s in load_manifest(prefix).shards if s.name in names[1:3])
    assert saved["stream_position"] == 12 * 8 + n_skipped and saved["skipped_shards"] == [names[1], names[2]]
    resumed = _stream(prefix, on_corrupt_shard="skip", start_step=12, resume_position=saved)
    assert taken + _take(resumed, steps - 12) == one

    with pytest.raises(DataError, match=rf"^shard {os.path.join(prefix, names[1])} is truncated or corrupt at"):
        _take(_stream(prefix), steps)

    for name in names:  # nothing left to train on: an error, not an endless search
        _truncate(Path(prefix, name))
    with pytest.raises(DataError, match="every shard of .* is corrupt"):
        _take(_stream(prefix, on_corrupt_shard="skip"), 1)


def test_corrupt_shard_error_policy_exits_2(shards, tmp_path):
    local, vocab = shards
    copy = tmp_path / "broken"
    shutil.copytree(local, copy)
    first = _stream_order(local)[0]
    offset = _damage_header(copy / first)
    proc = run_cli(pretrain_args((str(copy), vocab), str(tmp_path / "run"), "train.max_steps=4"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"shard {copy / first} holds 2 samples" in errors[0] and f"corrupt at byte {offset}" in errors[0]


def test_corrupt_shards_skipped_by_two_ranks(broken_shards, tmp_path):
    prefix, names, _ = broken_shards
    vocab = load_manifest(prefix).vocab_size
    out = tmp_path / "run"
    steps = 20
    args = pretrain_args(
        (prefix, vocab),
        str(out),
        f"train.max_steps={steps}",
        "checkpoint.every_steps=10",
        "data.on_corrupt_shard=skip",
        "run.record_samples=true",
    )
    proc = run_cli(args, ranks=2)
    warnings = [line for line in proc.stderr.splitlines() if "data.on_corrupt_shard=skip: leaving out" in line]
    assert len(warnings) == 2 and names[1] in warnings[0] and names[2] in warnings[1], proc.stderr[-3000:]
    assert "truncated or corrupt at byte 5720" in warnings[0]

    expected = _good_positions(prefix, {names[1], names[2]}, steps * 8)
    assert read_samples(out) == {s + 1: sorted(expected[s * 8 : (s + 1) * 8]) for s in range(steps)}
    for rank in (0, 1):  # both ranks ran every step
        lines = Path(out, "samples", f"rank_{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))
    state = json.loads(Path(out, "checkpoints", f"step_{steps:07d}", "trainer_state.json").read_text())
    position = state["data_position"]
    assert position["skipped_shards"] == [names[1], names[2]] and position["samples_seen"] == steps * 8
    assert position["stream_position"] == expected[steps * 8 - 1] + 1


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
        fp.reset_after(20_000, times=4, match="GET /" + prefix[len("s3://") :] + "/train-")
        fp.slowdown(times=3, match="/train-")
        fp.reset_on_connect(times=2)
        fp.slowdown(times=2)  # any request: the manifest, the tokenizer
        env = {**FAST_RETRIES, "AWS_ENDPOINT_URL": fp.endpoint}
        proc = run_cli(pretrain_args((prefix, vocab), str(faulty), *common), ranks=2, env=env)
        assert fp.pending() == 0, fp.faults  # every fault was injected
        shard_gets = [r for r in fp.requests if r.method == "GET" and "/train-" in r.path]
        assert any("range" in r.headers for r in shard_gets), "no GET was resumed"
    assert "resuming at byte" in proc.stderr

    assert read_samples(faulty) == read_samples(clean)
    assert len(read_samples(clean)) == 16
    assert [m["loss"] for m in metrics(str(faulty))] == [m["loss"] for m in metrics(str(clean))]
