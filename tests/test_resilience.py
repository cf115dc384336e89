"""Never lose work: resume on another world size (DeepSpeed universal checkpoints), retention, and the sample
accounting that proves every sample was trained on exactly once. kill -9 anywhere, many times, through S3 faults
and world-size changes, is the soak's (scripts/soak.py; its short version is tests/test_soak.py)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from electra_scale.data import load_manifest
from electra_scale.data.stream import StreamLayout
from electra_scale.engine.checkpoint import owner_rank, tag_for
from electra_scale.engine.metrics import read_samples
from electra_scale.infra import storage
from tests.cli import PATIENCE, run_cli, start_cli
from tests.test_train import NO_DROPOUT, metrics, pretrain_args

STEPS, EVERY, BATCH = 8, 4, 8  # pretrain_args uses a global batch of 8


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted run: 8 steps on 2 ranks at ZeRO-2, dropout off, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("reference") / "run"
    args = (f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "run.record_samples=true", *NO_DROPOUT)
    run_cli(pretrain_args(shards, str(out), *args, "checkpoint.keep_last=5"), ranks=2)
    return out


def rewind(run: Path, to: Path, step: int) -> None:
    """A copy of ``run`` as it was right after the checkpoint at ``step`` (later checkpoints removed)."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")


def assert_every_sample_once(run: Path, steps: int) -> None:
    per_step = read_samples(run)
    assert sorted(per_step) == list(range(1, steps + 1)), "a step is missing or was recorded twice"
    consumed = [p for positions in per_step.values() for p in positions]
    assert sorted(consumed) == list(range(steps * BATCH)), "samples skipped or duplicated"


def assert_continues(reference: Path, run: Path, from_step: int, rel: float = 1e-4) -> None:
    ref, got = metrics(str(reference)), metrics(str(run))
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref[from_step:], got[from_step:], strict=True):
        # Another world size sums the same gradients in another order: equal up to float reassociation.
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), f"step {a['step']}"
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9), "the LR schedule continues where it was"


def test_reference_accounts_for_every_sample(reference):
    assert_every_sample_once(reference, STEPS)


def test_one_uploader_per_node_hashes_both_ranks_files(reference):
    """The two ranks share a node: its lowest rank's uploader (engine/uploader.py) hashed both ranks' files and
    wrote the node's one part, and the marker lists exactly those files."""
    step = reference / "checkpoints" / tag_for(STEPS)
    assert sorted(p.name for p in (step / "parts").iterdir()) == ["node_0.json"]
    part = json.loads((step / "parts" / "node_0.json").read_text())
    assert part["ranks"] == [0, 1] and {owner_rank(rel) for rel in part["files"]} == {0, 1}
    assert part["files"] == json.loads((step / "COMPLETE").read_text())["files"]


@pytest.mark.parametrize("zero", ["zero2", "zero1"])
def test_two_ranks_resume_on_one(shards, reference, tmp_path, zero):
    """2 ranks at ZeRO-2 -> 1 rank at ZeRO-2 (and ZeRO-1: same group): converted, continued, nothing lost."""
    out = tmp_path / "run"
    rewind(reference, out, EVERY)
    args = pretrain_args(shards, str(out), f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}")
    args += ["run.record_samples=true", f"train.deepspeed_config=ds_configs/{zero}.json", *NO_DROPOUT]
    proc = run_cli(args)
    assert "converting it to a universal checkpoint for 1 rank(s)" in proc.stderr
    assert f"at step {EVERY} (converted from 2 rank(s), ZeRO-2)" in proc.stderr
    assert_continues(reference, out, EVERY)
    assert_every_sample_once(out, STEPS)
    state = json.loads((out / "checkpoints" / f"step_{STEPS:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["data_position"]["samples_seen"] == STEPS * BATCH
    # The converted copy is published next to its checkpoint, with a marker naming every file it holds.
    converted = out / "checkpoints" / f"step_{EVERY:07d}.universal"
    marker = json.loads((converted / "COMPLETE").read_text())
    assert marker["source"] == f"step_{EVERY:07d}" and (marker["world_size"], marker["zero_stage"]) == (2, 2)
    on_disk = {p.relative_to(converted).as_posix() for p in converted.rglob("*") if p.is_file()}
    assert on_disk - {"COMPLETE"} == set(marker["files"]) and "zero/optimizer_state.pt" in on_disk
    if zero == "zero1":
        return
    # A later start from the same checkpoint (here: step 8 lost) reuses it: no second conversion, the same
    # losses, and with keep_last=1 retention deletes the checkpoint and its converted copy together.
    first = metrics(str(out))
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:07d}")
    (out / "checkpoints" / "latest").write_text(f"step_{EVERY:07d}\n")
    proc = run_cli([*args, "checkpoint.keep_last=1"])
    assert "converting" not in proc.stderr and "step_0000004.universal (converted once, reused)" in proc.stderr
    assert [m["loss"] for m in metrics(str(out))] == [m["loss"] for m in first], "the same copy, the same run"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{STEPS:07d}"]


def stop_then_resume(shards, out: Path, zero: str, ranks: int, then_ranks: int) -> str:
    """Train to the first checkpoint on ``ranks``, then resume to the end on ``then_ranks``; the resumed
    run's log."""
    common = (
        f"train.max_steps={STEPS}",
        f"checkpoint.every_steps={EVERY}",
        "run.record_samples=true",
        f"train.deepspeed_config=ds_configs/{zero}.json",
        *NO_DROPOUT,
    )
    run_cli([*pretrain_args(shards, str(out), *common), f"train.stop_at_step={EVERY}"], ranks=ranks)
    return run_cli(pretrain_args(shards, str(out), *common), ranks=then_ranks).stderr


def test_one_rank_resumes_on_two(shards, reference, tmp_path):
    out = tmp_path / "run"
    log = stop_then_resume(shards, out, "zero2", ranks=1, then_ranks=2)
    assert f"at step {EVERY} (converted from 1 rank(s), ZeRO-2)" in log
    assert_continues(reference, out, EVERY)
    assert_every_sample_once(out, STEPS)


def test_zero3_two_ranks_resume_on_one(shards, reference, tmp_path):
    out = tmp_path / "run"
    log = stop_then_resume(shards, out, "zero3", ranks=2, then_ranks=1)
    assert f"at step {EVERY} (converted from 2 rank(s), ZeRO-3)" in log
    # The reference is ZeRO-2: ZeRO-3 reduces in another order (1e-4 apart after 3 steps, see test_train.py),
    # and the difference grows by a few 1e-4 over 8 steps.
    assert_continues(reference, out, EVERY, rel=2e-3)
    assert_every_sample_once(out, STEPS)


def test_zero0_loads_directly_on_another_world_size(shards, reference, tmp_path):
    """ZeRO-0 saves whole, unpartitioned states: no conversion, and the run continues on 1 rank."""
    out = tmp_path / "run"
    log = stop_then_resume(shards, out, "zero0", ranks=2, then_ranks=1)
    assert f"at step {EVERY}" in log and "universal" not in log
    assert_continues(reference, out, EVERY)
    assert_every_sample_once(out, STEPS)


@pytest.mark.parametrize("zero", ["zero3", "zero0"])
def test_conversion_across_zero_groups_is_refused_clearly(shards, reference, tmp_path, zero):
    out = tmp_path / "run"
    rewind(reference, out, EVERY)
    ds = f"train.deepspeed_config=ds_configs/{zero}.json"
    proc = run_cli([*pretrain_args(shards, str(out), f"train.max_steps={STEPS}"), ds], check=False)
    assert proc.returncode == 1
    stage = zero.removeprefix("zero")
    assert f"step_0000004 was saved by 2 rank(s) at ZeRO-2; this run has 1 rank(s) at ZeRO-{stage}" in proc.stderr
    assert "converts only within ZeRO-1/2 or within ZeRO-3" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004", "nothing was overwritten"


def test_a_world_size_that_does_not_divide_the_partitions_is_refused_first(shards, tmp_path):
    """A run cut into 3 partitions cannot continue on 2 ranks: one line naming the sizes that can, before
    any checkpoint is converted or overwritten."""
    out = tmp_path / "run"
    common = ("train.max_steps=8", "checkpoint.every_steps=4")
    run_cli([*pretrain_args(shards, str(out), *common), "data.partitions=3", "train.stop_at_step=4"])
    proc = run_cli(pretrain_args(shards, str(out), *common), ranks=2, check=False)
    assert proc.returncode != 0
    message = (
        "electra-scale pretrain: error: world size 2 does not divide the stream's 3 partitions, fixed when this run "
        "started (saved in its checkpoint); run on one of 1, 3 ranks"
    )
    assert message in proc.stderr, proc.stderr[-3000:]
    # Both ranks say it (their lines may interleave on stderr), and nothing else went wrong.
    assert not [line for line in proc.stderr.splitlines() if "error:" in line and message not in line]
    assert not list((out / "checkpoints").glob("*.universal"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004", "nothing was overwritten"


def test_every_example_once_an_epoch_on_1_2_and_4_ranks_and_from_4_to_2(shards, tmp_path):
    """The sample accounting over one whole epoch: every example of the set exactly once, plus the fewer than
    P repeats that pad the epoch, and the same examples at every step on 1, 2 and 4 ranks, and on 4 ranks
    stopped half-way and resumed on 2."""
    manifest = load_manifest(shards[0])
    epoch = StreamLayout(manifest, 12345, 64).epoch_size  # data.partitions defaults to 64 on 1, 2 and 4 ranks
    steps = epoch // BATCH
    common = (f"train.max_steps={steps}", f"checkpoint.every_steps={steps // 2}", "run.record_samples=true")
    common += ("train.log_every=8", "train.micro_batch_size=2")  # 4 ranks x 2 = the global batch of 8
    runs = {ranks: tmp_path / f"w{ranks}" for ranks in (1, 2)}
    for ranks, out in runs.items():
        run_cli(pretrain_args(shards, str(out), *common), ranks=ranks)
    four_then_two = tmp_path / "w4-then-2"
    run_cli([*pretrain_args(shards, str(four_then_two), *common), f"train.stop_at_step={steps // 2}"], ranks=4)
    log = run_cli(pretrain_args(shards, str(four_then_two), *common), ranks=2).stderr
    assert f"at step {steps // 2} (converted from 4 rank(s), ZeRO-2)" in log

    reference = read_samples(runs[1], "samples")
    counts = Counter(x for examples in reference.values() for x in examples)
    assert sorted(counts) == list(range(manifest.num_samples)), "an example was skipped"
    assert sum(counts.values()) == epoch and sum(c - 1 for c in counts.values()) == epoch - manifest.num_samples
    assert max(counts.values()) <= 2 and epoch - manifest.num_samples < 64
    for out in (runs[2], four_then_two):
        assert read_samples(out, "samples") == reference
        assert_every_sample_once(out, steps)  # stream positions: each of the epoch's exactly once


def test_retention_keeps_every_mth_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    run_cli(
        pretrain_args(
            shards,
            str(out),
            "train.max_steps=6",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.keep_every=4",
        )
    )
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_0000004", "step_0000006"]
    assert all((out / "checkpoints" / tag / "COMPLETE").exists() for tag in kept)


def test_upload_runs_in_the_background_and_the_next_save_waits_for_it(shards, s3_bucket, s3_server, tmp_path):
    """With step 1's upload held by the proxy, training goes on to step 2; step 2's save waits for the
    upload, says so, and every checkpoint ends complete once the upload is let go."""
    from tests.faultproxy import FaultProxy

    bucket = s3_bucket.removeprefix("s3://")
    run = f"{s3_bucket}/run"
    log = tmp_path / "run.log"
    with FaultProxy(s3_server.endpoint).start() as proxy:
        proxy.stall_after(0, match=f"PUT /{bucket}/run/checkpoints/step_0000001/parts/node_0.json")
        args = pretrain_args(
            shards, run, "train.max_steps=3", "checkpoint.every_steps=1", f"run.cache_dir={tmp_path / 'cache'}"
        )
        proc = start_cli(args, env={"AWS_ENDPOINT_URL": proxy.endpoint}, stderr=log)
        try:
            deadline = time.monotonic() + PATIENCE
            while "waiting for the upload of step_0000001" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            text = log.read_text()
            assert "step 2/3" in text, "training went on while step 1 was uploading"
            assert "checkpoint step_0000001 complete" not in text
            assert not storage.exists(f"{run}/checkpoints/step_0000001/COMPLETE")
            proxy.release()
            assert proc.wait(timeout=PATIENCE) == 0, log.read_text()[-3000:]
        finally:
            proc.kill()
    text = log.read_text()
    assert text.index("step 2/3") < text.index("checkpoint step_0000001 complete")
    assert storage.read_text(f"{run}/checkpoints/latest").strip() == "step_0000003"
    assert storage.exists(f"{run}/checkpoints/step_0000003/COMPLETE")


def test_a_checkpoint_is_marked_complete_only_after_the_metrics_of_its_steps_are_uploaded(
    shards, s3_bucket, s3_server, tmp_path
):
    """A resume drops metrics.jsonl's lines past its checkpoint but never adds missing ones, so the steps up to
    a checkpoint must be in the remote metrics.jsonl before that checkpoint can be marked COMPLETE; else a
    kill -9 in between loses them from the log for good (found by the soak). Here metrics.jsonl's first upload
    is swallowed by the proxy (the client times out and sends it again); the step-2 checkpoint must wait."""
    from tests.faultproxy import FaultProxy

    bucket = s3_bucket.removeprefix("s3://")
    run, log = f"{s3_bucket}/run", tmp_path / "run.log"
    with FaultProxy(s3_server.endpoint).start() as proxy:
        proxy.blackhole(times=1, match=f"PUT /{bucket}/run/metrics.jsonl")
        args = pretrain_args(
            shards, run, "train.max_steps=2", "checkpoint.every_steps=2", f"run.cache_dir={tmp_path / 'cache'}"
        )
        env = {"AWS_ENDPOINT_URL": proxy.endpoint}
        env["ELECTRA_S3_READ_TIMEOUT"] = "10"  # how long the swallowed upload holds the run: not a speed check
        proc = start_cli(args, env=env, stderr=log)
        try:
            deadline = time.monotonic() + PATIENCE
            while not storage.exists(f"{run}/checkpoints/step_0000002/COMPLETE"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            early = "step 2's checkpoint was complete before its metrics were uploaded"
            assert storage.exists(f"{run}/metrics.jsonl"), early
            logged = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
            assert logged == [1, 2], early
            assert proc.wait(timeout=PATIENCE) == 0, log.read_text()[-3000:]
        finally:
            proc.kill()
    assert proxy.count("blackhole") == 1 and "metrics.jsonl failed" in log.read_text()


def _as_nodes(args: list[str], ranks: int, env: dict, logs: Path, names: list[str] | None = None) -> list:
    """``ranks`` ranks, each its own node (LOCAL_WORLD_SIZE=1, a node name of its own: n0, n1..., or ``names``),
    so each stages in a directory of its own as separate machines do; rank r's stderr in ``logs/rank_r.log``."""
    from electra_scale.infra.launch import free_port

    world = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    world["MASTER_PORT"] = str(free_port())
    names = names or [f"n{r}" for r in range(ranks)]
    node = lambda r: {"RANK": str(r), "GROUP_RANK": str(r), "ELECTRA_NODE_NAME": names[r]}  # noqa: E731
    return [start_cli(args, env={**env, **world, **node(r)}, stderr=logs / f"rank_{r}.log") for r in range(ranks)]


def _load_then_kill(runs: list, logs: Path) -> None:
    """Wait until rank 0 has loaded its checkpoint (the runs would go on training), then kill every rank."""
    try:
        deadline = time.monotonic() + PATIENCE
        while "resumed from" not in (logs / "rank_0.log").read_text():
            assert all(r.poll() is None for r in runs), (logs / "rank_0.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for r in runs:
            r.kill()


def _wait_all(runs: list) -> list[int]:
    try:
        return [run.wait(timeout=PATIENCE) for run in runs]
    finally:
        for run in runs:
            run.kill()


def test_each_node_fetches_only_its_files_and_reuses_a_staged_copy(shards, s3_bucket, s3_server, tmp_path):
    """Two ranks, each its own node, resume a 2-rank checkpoint from S3 through the fault proxy: each node
    fetches only its own rank's files (and the shared ones), never a HEAD, never another rank's file, and the
    load succeeds without them (a file left unfetched is never opened). Killed after the load, the nodes keep
    what they staged: the next start GETs the marker and nothing of a staged file that matches it, except the
    one whose staged copy was damaged. And two nodes given one staging directory stop in one line."""
    from tests.faultproxy import FaultProxy

    bucket = s3_bucket.removeprefix("s3://")
    run = f"{s3_bucket}/run"
    common = ("train.max_steps=100", "checkpoint.every_steps=100", *NO_DROPOUT)
    run_cli(pretrain_args(shards, run, *common, "train.stop_at_step=2"), ranks=2)  # one node, 2 ranks
    files = json.loads(storage.read_text(f"{run}/checkpoints/step_0000002/COMPLETE"))["files"]
    home = tmp_path / "electra-scale-cache"  # the s3_bucket fixture's ELECTRA_SCALE_CACHE

    def staged(r: int) -> Path:
        return home / f"staging-n{r}" / f"{bucket}_run" / "checkpoints" / "step_0000002"

    def checkpoint_requests(proxy) -> list[tuple[str, str]]:
        """(method, file) of each request for step 2's files, in order."""
        step = "/step_0000002/"
        return [(r.method, r.path.split("?")[0].split(step)[1]) for r in proxy.requests if step in r.path]

    with FaultProxy(s3_server.endpoint).start() as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint}
        # Resume on 2 nodes; killed once both have loaded (the run would go on to step 100).
        logs = tmp_path / "b"
        logs.mkdir()
        _load_then_kill(_as_nodes(pretrain_args(shards, run, *common), 2, env, logs), logs)
        got = checkpoint_requests(proxy)
        assert all(method == "GET" for method, _ in got), got  # no HEAD: the marker has the sizes
        per_rank = {rel for rel in files if re.search(r"zero_pp_rank_\d+_|^rng/rank_\d+\.pt$", rel)}
        assert sorted(rel for _, rel in got if rel in per_rank) == sorted(per_rank), "each per-rank file once"
        for r in (0, 1):  # each node holds its own rank's files, none of the other's, and the shared ones
            on_disk = {p.relative_to(staged(r)).as_posix() for p in staged(r).rglob("*") if p.is_file()}
            mine = {rel for rel in per_rank if owner_rank(rel) == r}
            assert on_disk == (set(files) - per_rank) | mine, (r, sorted(on_disk))

        # The next start: everything staged matches but rank 1's optimizer shard, damaged.
        shard = next(p for p in staged(1).glob("*rank_1*optim_states.pt"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        proxy.requests.clear()
        logs = tmp_path / "c"
        logs.mkdir()
        assert _wait_all(_as_nodes(pretrain_args(shards, run, *common, "train.stop_at_step=4"), 2, env, logs)) == [0, 0]
        got = checkpoint_requests(proxy)
        assert got == [("GET", "COMPLETE"), ("GET", shard.name)], got  # the marker once (rank 0), the damaged file

    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    # One staging directory for two launch groups: refused at start, in one line, by every rank. The harder
    # case: both have one node name (two pods of a Kubernetes node on one hostPath volume), so only the
    # leaders' ranks tell them apart; a run.cache_dir given to nodes of different names is the same check.
    logs = tmp_path / "d"
    logs.mkdir()
    args = pretrain_args(shards, run, *common, "train.stop_at_step=6", f"run.cache_dir={tmp_path / 'shared'}")
    assert _wait_all(_as_nodes(args, 2, {}, logs, names=["n0", "n0"])) == [2, 2]
    for r in (0, 1):
        refused = [line for line in (logs / f"rank_{r}.log").read_text().splitlines() if "is shared by rank" in line]
        assert len(refused) == 1 and "unset run.cache_dir" in refused[0], refused
        assert "rank 0 on node n0" in refused[0] and "rank 1 on node n0" in refused[0], refused


def test_a_world_size_change_converts_once_and_each_node_fetches_its_part(shards, s3_bucket, s3_server, tmp_path):
    """A 1-rank checkpoint on S3 resumed by 2 ranks, each its own node, through the fault proxy: node n0 (rank 0)
    fetches the whole checkpoint, converts it and publishes ``step_0000002.universal`` with its marker; node n1
    fetches none of the checkpoint's DeepSpeed files and, of the converted copy, only what its rank's partition
    reads. A second start on fresh nodes converts nothing: each node fetches only its own part of the copy."""
    from tests.faultproxy import FaultProxy

    run = f"{s3_bucket}/run"
    common = ("train.max_steps=100", "checkpoint.every_steps=100", *NO_DROPOUT)
    run_cli(pretrain_args(shards, run, *common, "train.stop_at_step=2"))  # 1 rank
    home = tmp_path / "electra-scale-cache"  # the s3_bucket fixture's ELECTRA_SCALE_CACHE
    utag = "step_0000002.universal"

    def staged(r: int, tag: str) -> set[str]:
        root = home / f"staging-n{r}" / f"{s3_bucket.removeprefix('s3://')}_run" / "checkpoints" / tag
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def params(rels: set[str]) -> set[str]:
        return {rel.split("/")[1] for rel in rels if rel.startswith("zero/") and rel.count("/") == 2}

    def requests(proxy, method: str) -> list[str]:
        """The converted copy's files that ``method`` requests named (listings aside), in order."""
        paths = [r.path.split("?")[0] for r in proxy.requests if r.method == method]
        return [path.split(f"/{utag}/")[1] for path in paths if f"/{utag}/" in path]

    with FaultProxy(s3_server.endpoint).start() as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint}
        logs = tmp_path / "b"
        logs.mkdir()
        _load_then_kill(_as_nodes(pretrain_args(shards, run, *common), 2, env, logs), logs)
        assert "converting it to a universal checkpoint for 2 rank(s)" in (logs / "rank_0.log").read_text()
        marker = json.loads(storage.read_text(f"{run}/checkpoints/{utag}/COMPLETE"))
        assert marker["source"] == "step_0000002" and marker["world_size"] == 1
        every = set(marker["files"])
        # The parameters an optimizer holds. Tied weights (the generator's embeddings and output layer are the
        # discriminator's) have folders with only the fp32.pt that --inject_missing_state writes; none reads them.
        held = {name for name in params(every) if f"zero/{name}/exp_avg.pt" in every}
        assert sorted(requests(proxy, "PUT")) == sorted([*every, "COMPLETE"]), "published once, by n0"
        assert not [rel for rel in staged(1, "step_0000002") if rel.endswith("_states.pt")], "no DeepSpeed file"
        fetched = staged(1, utag)
        # Rank 0 looked for a converted copy first (none yet); then n1 fetched its part, each file once.
        assert sorted(requests(proxy, "GET")) == sorted(["COMPLETE", *fetched])
        assert "zero/optimizer_state.pt" in fetched and "mp_rank_00_model_states.pt" in fetched
        assert 0 < len(params(fetched)) < len(held), "n1's partition reads some parameters, not all"

        # Fresh nodes (empty staging) start again from the same checkpoint and train to step 4.
        shutil.rmtree(home)
        proxy.requests.clear()
        logs = tmp_path / "c"
        logs.mkdir()
        assert _wait_all(_as_nodes(pretrain_args(shards, run, *common, "train.stop_at_step=4"), 2, env, logs)) == [0, 0]
        text = (logs / "rank_0.log").read_text()
        assert "converting" not in text and f"{utag} (converted once, reused)" in text
        assert requests(proxy, "PUT") == [], "nothing converted or published again"
        # Rank 0 read the copy's marker once; each node fetched the files every rank reads, and between them
        # every parameter's files, fewer than twice over: a node fetched only its partition's.
        got = Counter(requests(proxy, "GET"))
        shared = ["zero/optimizer_state.pt", "mp_rank_00_model_states.pt"]
        assert got.pop("COMPLETE") == 1 and [got.pop(rel) for rel in shared] == [2, 2], got
        assert params(set(got)) == held, "every parameter an optimizer holds"
        assert sum(got.values()) < 2 * len(got), "not every node fetched every parameter"
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    # Step 4 was saved by the two nodes: each node's uploader wrote its node's part, with its rank's files.
    step4 = f"{run}/checkpoints/step_0000004"
    parts = [json.loads(storage.read_text(f"{step4}/parts/node_{n}.json")) for n in (0, 1)]
    assert [p["ranks"] for p in parts] == [[0], [1]] and {owner_rank(rel) for rel in parts[1]["files"]} == {1}
    marker = json.loads(storage.read_text(f"{step4}/COMPLETE"))
    assert parts[0]["files"] | parts[1]["files"] == marker["files"]
