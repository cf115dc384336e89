"""prepare split over workers and tasks (issue 27): real processes, real tar shards, real SeaweedFS. The same
shards and manifest however the work is split; a failed task re-run alone; finalize and its refusals."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from electra_scale.data import load_manifest, prepare
from electra_scale.data.parts import assign, finalize
from electra_scale.data.units import input_sizes, iter_corpus, plan_units, unit_documents
from electra_scale.infra import storage
from tests.cli import PATIENCE, run_cli, start_cli
from tests.corpus import WORDS, write_corpus
from tests.test_train import metrics, pretrain_args

SPLIT = ["--seq-len", "128", "--samples-per-block", "16", "--samples-per-shard", "32", "--eval-fraction", "0.1"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a prepared output but the parts, and the manifests without their creation time."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "parts" not in p.relative_to(root).parts:
            data = p.read_bytes()
            if p.name == "manifest.json":
                d = json.loads(data)
                d.pop("created")
                data = json.dumps(d).encode()
            out[str(p.relative_to(root))] = data
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Three inputs of ~60 kB: two .jsonl and a .txt whose documents are separated by runs of blank and
    whitespace-only lines, with CRLF and lone-CR line ends."""
    root = tmp_path_factory.mktemp("inputs")
    a = write_corpus(root / "a.jsonl", documents=300, seed=1)
    b = write_corpus(root / "b.jsonl", documents=300, seed=2)
    rng = random.Random(3)
    lines = []
    for _ in range(250):
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choices(WORDS, k=rng.randint(3, 15))).capitalize() + ". " + rng.choice(WORDS))
        lines.append(rng.choice(["", "", "   ", "\t", "\n"]))
    text = "\n".join(lines)
    text = text.replace("\n", "\r\n", 40).replace("river", "river\r", 5)
    (root / "c.txt").write_bytes(text.encode())
    return [str(a), str(b), str(root / "c.txt")]


@pytest.fixture(scope="module")
def vocab(inputs, tmp_path_factory) -> str:
    """The vocabulary step of its own (--tokenizer-only), learnt from a bounded sample of the inputs."""
    out = tmp_path_factory.mktemp("vocab") / "v"
    proc = run_cli(["prepare", "--input", *inputs, "--output", str(out), "--tokenizer", "train:300"]
                   + ["--tokenizer-only", "--tokenizer-sample", "60KB"])  # fmt: skip
    assert "vocabulary train:300 learnt from a sample of 0.1 MB" in proc.stdout, proc.stdout
    assert sorted(os.listdir(out)) == ["tokenizer.json", "vocab.txt"]
    return str(out / "tokenizer.json")


@pytest.fixture(scope="module")
def reference(inputs, vocab, tmp_path_factory) -> tuple[Path, int]:
    """One process (--workers 1), units of 20 kB: what every split must write byte for byte; (its output, the
    chunk size)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    run_cli(["prepare", "--input", *inputs, "--output", str(out), "--tokenizer", vocab, *SPLIT]
            + ["--chunk-bytes", "20000", "--workers", "1"])  # fmt: skip
    return out, 20000


def test_units_hold_the_documents_of_a_single_pass(inputs):
    """However the inputs are cut, the units' documents, in unit order, are the whole files' in order."""
    sizes = [os.path.getsize(f) for f in inputs]
    whole = list(iter_corpus(inputs))
    for chunk in (1, 7, 333, 5000, 20000, sum(sizes)):
        units = plan_units(inputs, sizes, chunk)
        assert len(units) == -(-sum(sizes) // chunk)
        assert [d for u in units for d in unit_documents(u)] == whole, chunk
    assert len(whole) == 850


def test_workers_and_tasks_write_the_same_shards(inputs, vocab, reference, tmp_path):
    """--workers 2, and 3 tasks (two as SLURM array tasks, one as a Kubernetes Indexed Job pod) then finalize:
    the reference's shards, held-out set and manifest, byte for byte. pretrain trains from the merged set."""
    ref, chunk = reference
    args = ["prepare", "--input", *inputs, "--tokenizer", vocab, *SPLIT, "--chunk-bytes", str(chunk)]
    proc = run_cli([*args, "--output", str(tmp_path / "two"), "--workers", "2"])
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]  # the progress bar, in bytes of input
    assert "prepare: 100%|" in last and "B/s]" in last, last
    assert _files(tmp_path / "two") == _files(ref)

    out = tmp_path / "three"
    envs = [{"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"},
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"},
            {"JOB_COMPLETION_INDEX": "2", "ELECTRA_PREPARE_NUM_TASKS": "3"}]  # fmt: skip
    runs = [start_cli([*args, "--output", str(out), "--workers", "1"], env=env) for env in envs]
    for run in runs:
        stdout, stderr = run.communicate(timeout=PATIENCE)
        assert run.returncode == 0, stderr[-3000:]
        run.close()
    proc = run_cli(["prepare", "--finalize", "--output", str(out), "--input", *inputs, "--seq-len", "128"])
    assert "850 documents" in proc.stdout and "task seconds: 0: " in proc.stdout, proc.stdout
    assert _files(out) == _files(ref)
    assert len(load_manifest(str(out)).shards) > 6  # several units, each with its own short last shard

    run_dir = str(tmp_path / "run")
    manifest = load_manifest(str(out))
    run_cli(pretrain_args((str(out), manifest.vocab_size), run_dir, "train.max_steps=2", "checkpoint.every_steps=100"))
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]


def test_a_failed_task_is_rerun_alone(inputs, vocab, reference, tmp_path):
    """Task 1 of 3 meets a corrupt line in its second unit: one line naming the file, exit 2, no part; finalize
    and pretrain refuse, naming it; the task re-run after the fix redoes only that unit, finished tasks' files
    are untouched, and the set is the reference's byte for byte."""
    ref, chunk = reference
    local = [str(tmp_path / Path(f).name) for f in inputs]
    for src, dst in zip(inputs, local):
        Path(dst).write_bytes(Path(src).read_bytes())
    units = plan_units(local, [os.path.getsize(f) for f in local], chunk)
    mine = assign(units, 1, 3)
    seg = next(s for s in mine[-1].segments if s.url.endswith(".jsonl"))  # task 1's last unit: after its first
    assert len(mine) >= 2 and seg.end - seg.start > 1000
    b = Path(seg.url)
    good = b.read_bytes()
    broken = bytearray(good)
    broken[good.index(b"\n", seg.start) + 1] = ord("X")  # a line of that unit is no JSON; no offset moves
    b.write_bytes(bytes(broken))
    out = tmp_path / "out"
    args = ["prepare", "--input", *local, "--tokenizer", vocab, *SPLIT, "--chunk-bytes", str(chunk), "--workers", "1"]
    for k in (0, 2):
        run_cli([*args, "--output", str(out), "--task-index", str(k), "--num-tasks", "3"])
    proc = run_cli([*args, "--output", str(out), "--task-index", "1", "--num-tasks", "3"], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert (
        proc.returncode == 2
        and len(errors) == 1
        and f"{b} the line at byte" in errors[0]
        and "not valid JSON" in errors[0]
    )
    units_planned, units = units, sorted(os.listdir(out / "parts" / "units"))
    assert not (out / "parts" / "part-00001-of-00003.json").exists() and len(units) == len(units_planned) - 1

    proc = run_cli(["prepare", "--finalize", "--output", str(out)], check=False)
    assert proc.returncode == 2 and "task(s) 1 of 3 have not finished" in proc.stderr
    proc = run_cli(pretrain_args((str(out), 300), str(tmp_path / "run"), "train.max_steps=1"), check=False)
    assert proc.returncode == 2 and f"electra-scale prepare --finalize --output {out}" in proc.stderr
    assert "is not finalized" in proc.stderr

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "train-" in p.name}
    b.write_bytes(good)
    proc = run_cli([*args, "--output", str(out), "--task-index", "1", "--num-tasks", "3"])
    assert "finalized" in proc.stdout  # the last task to finish merges the parts
    rewritten = {p for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert rewritten == set(), rewritten  # the broken unit wrote no shard; nothing finished was redone
    assert _files(out) == {k: v for k, v in _files(ref).items()}


def test_refusals(inputs, vocab, tmp_path):
    out = str(tmp_path / "out")
    base = ["prepare", "--input", *inputs, "--output", out, "--seq-len", "128"]
    cases = [
        ([*base, "--tokenizer", vocab, "--task-index", "1"], {}, "task index 1 without a task count"),
        ([*base, "--tokenizer", vocab], {"SLURM_ARRAY_TASK_ID": "4"}, "task index 4 without a task count"),
        ([*base, "--tokenizer", vocab], {"JOB_COMPLETION_INDEX": "1"}, "ELECTRA_PREPARE_NUM_TASKS is not set"),
        ([*base, "--tokenizer", vocab, "--task-index", "3", "--num-tasks", "3"], {}, "task index 3 is not one of"),
        ([*base, "--tokenizer", "train:300", "--num-tasks", "2", "--task-index", "0"], {}, "--tokenizer-only"),
        (["prepare", "--finalize", "--output", out], {}, "no parts at"),
        ([*base, "--tokenizer", vocab, "--seq-len", "0"], {}, "--seq-len 0 is too short"),
        ([*base, "--tokenizer", vocab, "--workers", "0"], {}, "--workers 0 must be at least 1"),
    ]
    for argv, env, message in cases:
        proc = run_cli(argv, env=env, check=False)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (argv, proc.stderr[-2000:])
    assert not Path(out, "parts").exists()

    # Finalize checks the arguments it is given against the tasks'.
    for k in range(2):
        run_cli([*base, "--tokenizer", vocab, "--task-index", str(k), "--num-tasks", "2", "--chunk-bytes", "50000"])
    Path(out, "manifest.json").unlink()
    proc = run_cli(["prepare", "--finalize", "--output", out, "--seq-len", "64"], check=False)
    assert proc.returncode == 2 and "were prepared with --seq-len 128, not 64" in proc.stderr
    proc = run_cli(["prepare", "--finalize", "--output", out, "--input", *inputs[:2]], check=False)
    assert proc.returncode == 2 and "were prepared with --input" in proc.stderr
    run_cli(["prepare", "--finalize", "--output", out, "--chunk-bytes", "50000"])
    assert load_manifest(out).num_samples > 0


def test_a_changed_input_invalidates_the_markers(inputs, vocab, tmp_path):
    """An input whose size changed (its unit count the same) moves the units' byte ranges: a task re-run after
    it must not reuse the markers of before, and finalize refuses the mixed parts naming the changed input."""
    local = [str(tmp_path / Path(f).name) for f in inputs]
    for src, dst in zip(inputs, local):
        Path(dst).write_bytes(Path(src).read_bytes())
    out = tmp_path / "out"
    args = ["prepare", "--input", *local, "--output", str(out), "--tokenizer", vocab, *SPLIT]
    args += ["--chunk-bytes", "20000", "--workers", "1"]
    for k in range(3):
        run_cli([*args, "--task-index", str(k), "--num-tasks", "3"])
    assert (out / "manifest.json").exists()
    (out / "manifest.json").unlink()
    (out / "eval" / "manifest.json").unlink()
    sizes = [os.path.getsize(f) for f in local]
    a = Path(local[0])
    a.write_bytes(a.read_bytes()[:-300] + a.read_bytes()[-150:])  # 150 bytes shorter, as many units
    assert len(plan_units(local, [os.path.getsize(f) for f in local], 20000)) == len(plan_units(local, sizes, 20000))
    markers = {p: p.read_bytes() for p in (out / "parts" / "units").iterdir()}
    proc = run_cli([*args, "--task-index", "0", "--num-tasks", "3"])
    mine = assign(plan_units(local, sizes, 20000), 0, 3)
    redone = {p for p, data in markers.items() if p.read_bytes() != data}
    assert {out / "parts" / "units" / f"unit-{u.index:06d}.json" for u in mine} == redone  # none reused
    assert not (out / "manifest.json").exists() and "the inputs changed between the tasks' runs" in proc.stdout
    proc = run_cli(["prepare", "--finalize", "--output", str(out)], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "the inputs changed" in errors[0] and f"{a} ({sizes[0] - 150:,} vs {sizes[0]:,} bytes)" in errors[0]
    assert local[1] not in errors[0] and "re-run the odd task" not in errors[0]
    assert not (out / "manifest.json").exists()

    # Every task run again with the inputs as they are: the set completes.
    for k in (1, 2):
        run_cli([*args, "--task-index", str(k), "--num-tasks", "3"])
    assert load_manifest(str(out)).num_samples > 0


def test_a_task_after_the_set_is_finalized(inputs, vocab, tmp_path):
    """A task started again after the set was finalized (a re-applied Indexed Job): with the same settings one
    line and exit 0, nothing rewritten; with others the refusal of an output that holds a shard set."""
    out = tmp_path / "out"
    args = ["prepare", "--input", *inputs, "--output", str(out), "--tokenizer", vocab, *SPLIT]
    args += ["--chunk-bytes", "20000", "--workers", "1"]
    for k in range(2):
        run_cli([*args, "--task-index", str(k), "--num-tasks", "2"])
    manifest = load_manifest(str(out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for env in ({"JOB_COMPLETION_INDEX": "1", "ELECTRA_PREPARE_NUM_TASKS": "2"}, {"JOB_COMPLETION_INDEX": "0"}):
        flags = [] if "ELECTRA_PREPARE_NUM_TASKS" in env else ["--num-tasks", "2"]
        proc = run_cli([*args, *flags], env=env)
        expected = (
            f"already finalized: {manifest.num_samples:,} examples in {len(manifest.shards)} shards; nothing to do"
        )
        assert proc.stdout.strip().splitlines() == [expected], proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    proc = run_cli([*args, "--task-index", "1", "--num-tasks", "2", "--seed", "7"], check=False)
    assert proc.returncode == 2 and "already holds a prepared shard set" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_the_vocabulary_sample_counts_compressed_inputs_by_their_compressed_bytes(tmp_path):
    """The sample's budget is in the inputs' own bytes, compressed for .gz and Parquet: a compressed corpus no
    larger than the sample is learnt from whole, and a sample that ends half-way through a compressed file's
    bytes reads about half its documents (not that many bytes of decompressed text)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from electra_scale.data.vocab import prepare_vocabulary

    files = []
    for i in range(2):
        plain = write_corpus(tmp_path / f"c{i}.jsonl", documents=1500, seed=40 + i)
        files.append(tmp_path / f"c{i}.jsonl.gz")
        files[-1].write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
    texts = [json.loads(line)["text"] for line in write_corpus(tmp_path / "p.jsonl", 1500, 42).read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=100)
    files.append(tmp_path / "p.parquet")
    everything = sum(1 for _ in iter_corpus([str(f) for f in files]))
    compressed = sum(os.path.getsize(f) for f in files)
    assert everything == 4500 and sum(len(t) for t in texts) > 2 * os.path.getsize(files[-1])

    def sampled(sample: int) -> int:
        said: list[str] = []
        out = tmp_path / f"vocab-{sample}"
        prepare_vocabulary([str(f) for f in files], str(out), "train:300", sample_bytes=sample, say=said.append)
        line = next(s for s in said if s.startswith("vocabulary train:300 learnt from a sample of"))
        return int(line.split(" MB (")[1].split(" documents")[0].replace(",", ""))

    assert sampled(compressed) == everything
    # Half of the second .gz file's bytes: about half its documents (gz is read 16 KiB at a time: ~10% of it).
    c0, c1, p = (os.path.getsize(f) for f in files)
    assert 1500 + 600 <= sampled(c0 + c1 // 2) <= 1500 + 900
    # Half of the Parquet file's bytes: about half its rows (its row groups' bytes x the share of rows read).
    assert 3000 + 700 <= sampled(c0 + c1 + p // 2) <= 3000 + 800


def test_the_task_of_an_array_job_or_a_pod():
    """Neither flag: the SLURM array is the whole prepare (ID - MIN of COUNT). --num-tasks N alone: the absolute
    index, so `sbatch --array=K ... --num-tasks N` re-runs task K of N, not "task 0 of 1"."""
    from argparse import Namespace

    from electra_scale.data.prepare_cli import task_of
    from electra_scale.data.shards import DataError

    def of(env, k=None, n=None):
        return task_of(Namespace(task_index=k, num_tasks=n), env)

    array = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert of(array) == (2, 4)
    one = {"SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_MIN": "17", "SLURM_ARRAY_TASK_COUNT": "1"}
    assert of(one) == (0, 1)  # an array of one without --num-tasks: a whole prepare, as before
    assert of(one, n=64) == (17, 64)
    assert of({"JOB_COMPLETION_INDEX": "5"}, n=8) == (5, 8)
    assert of(one, k=3, n=64) == (3, 64)  # the flags win
    assert of({}) == (0, 1) and of({}, n=1) == (0, 1)
    with pytest.raises(DataError, match="task index 17 is not one of the 8 tasks"):
        of(one, n=8)
    with pytest.raises(DataError, match="--num-tasks 3 without a task index"):
        of({}, n=3)


def test_s3_input_and_output_in_two_tasks(inputs, vocab, reference, s3_bucket):
    """Inputs and shards on SeaweedFS, units read by ranged GETs, two tasks of two workers: the reference's
    shards."""
    ref, chunk = reference
    urls = []
    for f in inputs:
        urls.append(f"{s3_bucket}/raw/{Path(f).name}")
        storage.upload_file(f, urls[-1])
    out = f"{s3_bucket}/shards"
    kwargs = dict(seq_len=128, samples_per_block=16, samples_per_shard=32, eval_fraction=0.1, chunk_bytes=chunk)
    for k in range(2):
        prepare(urls, out, vocab, **kwargs, workers=2, task_index=k, num_tasks=2, progress=False)
    manifest = finalize(out)
    ref_manifest = load_manifest(str(ref))
    assert manifest.shards == ref_manifest.shards and manifest.num_tokens == ref_manifest.num_tokens
    for s in manifest.shards:
        assert storage.read_bytes(f"{out}/{s.name}") == (ref / s.name).read_bytes()
    assert load_manifest(f"{out}/eval").shards == load_manifest(str(ref / "eval")).shards


def test_a_prefix_or_directory_with_a_trailing_slash(inputs, s3_bucket, tmp_path):
    """`--input s3://bucket/prefix/` is the prefix (SeaweedFS answers a HEAD of a "directory" key with 200, which
    must not make it one unsupported input), and a local directory with a trailing slash is the directory."""
    from electra_scale.data.units import resolve_inputs

    for f in inputs:
        storage.upload_file(f, f"{s3_bucket}/slash/{Path(f).name}")
    names = sorted(Path(f).name for f in inputs)
    want = [f"{s3_bucket}/slash/{n}" for n in names]
    assert resolve_inputs([f"{s3_bucket}/slash"]) == want
    assert resolve_inputs([f"{s3_bucket}/slash/"]) == want
    for f in inputs:
        Path(tmp_path, Path(f).name).write_bytes(Path(f).read_bytes())
    assert resolve_inputs([f"{tmp_path}/"]) == resolve_inputs([str(tmp_path)]) == [str(tmp_path / n) for n in names]


def test_parquet_is_cut_between_row_groups(inputs, vocab, tmp_path):
    """A Parquet file of 30 row groups in units of a few row groups each: the documents of a single pass, and the
    same shards from one process and from two tasks of two workers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in Path(inputs[0]).read_text().splitlines()]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "a.parquet", row_group_size=10)
    files = [str(tmp_path / "a.parquet"), inputs[2]]
    units = plan_units(files, input_sizes(files), 20000)
    groups = [g for u in units for s in u.segments if s.row_groups for g in s.row_groups]
    assert groups == list(range(30)) and sum(1 for u in units if any(s.row_groups for s in u.segments)) > 2
    assert [d for u in units for d in unit_documents(u)] == list(iter_corpus(files))

    kwargs = dict(seq_len=128, samples_per_block=16, eval_fraction=0.1, chunk_bytes=20000, progress=False)
    one = prepare(files, str(tmp_path / "one"), vocab, **kwargs)
    for k in range(2):
        prepare(files, str(tmp_path / "two"), vocab, **kwargs, workers=2, task_index=k, num_tasks=2)
    assert _files(tmp_path / "two") == _files(tmp_path / "one") and len(one.shards) > 3


def test_the_stream_over_many_units_follows_its_definition(reference):
    """A set of many units (each with its short last shard and block) streams as any set does: every position
    holds the example the documented order puts there, each epoch trains every example once plus the padding."""
    from tests.test_data import SEED, all_shard_samples, expected_examples, global_batches, make_stream, take

    out, _ = reference
    manifest = load_manifest(str(out))
    blocks = [b.samples for s in manifest.shards for b in s.blocks]
    assert len(manifest.shards) > 6 and min(blocks) < max(blocks)  # short blocks inside the set, not only last
    corpus = all_shard_samples(str(out), manifest)
    stream = make_stream(str(out), manifest, global_batch_size=16, micro_batch_size=8, partitions=4,
                         shuffle_blocks=2, num_workers=2)  # fmt: skip
    epoch = stream.layout.epoch_size
    batches = global_batches([take(stream, 2 * epoch // 16 + 1)])
    samples = np.concatenate([b[4] for b in batches])
    assert samples.tolist() == expected_examples(manifest, corpus, SEED, 4, 2, len(samples))
    for e in range(2):
        counts = np.bincount(samples[e * epoch : (e + 1) * epoch], minlength=manifest.num_samples)
        assert counts.min() == 1 and counts.sum() == epoch


def test_a_killed_task_is_rerun_alone(inputs, vocab, tmp_path):
    """Task 0 of 2 is SIGKILLed mid-slice, inside a unit (it blocks reading a named pipe, one of its inputs,
    after its earlier units are done): no part, that unit unmarked while its earlier ones are; finalize refuses
    naming task 0; re-run alone (the pipe now an empty file, as the reference has), it redoes that unit only,
    and the set is the reference's byte for byte."""
    import signal
    import time

    root = tmp_path / "in"
    root.mkdir()
    files = [str(root / n) for n in ("a.jsonl", "e.txt", "b.jsonl", "c.txt")]
    for src, dst in zip([inputs[0], None, inputs[1], inputs[2]], files):
        if src is not None:
            Path(dst).write_bytes(Path(src).read_bytes())
    os.mkfifo(files[1])
    chunk = 20000
    units = plan_units(files, [os.path.getsize(f) for f in files], chunk)  # the pipe's size is 0, as the file's
    stuck = next(u.index for u in units if any(s.url == files[1] for s in u.segments))
    assert stuck > 0 and stuck in [u.index for u in assign(units, 0, 2)]
    out = tmp_path / "out"
    args = ["prepare", "--input", *files, "--output", str(out), "--tokenizer", vocab, *SPLIT]
    args += ["--chunk-bytes", str(chunk), "--workers", "1", "--num-tasks", "2"]
    run = start_cli([*args, "--task-index", "0"])
    markers = [out / "parts" / "units" / f"unit-{i:06d}.json" for i in range(stuck)]
    deadline = time.monotonic() + PATIENCE
    while not all(m.exists() for m in markers):  # then the task is blocked opening the pipe, for good
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(PATIENCE)
    run.close()
    assert not (out / "parts" / "part-00000-of-00002.json").exists()
    assert not (out / "parts" / "units" / f"unit-{stuck:06d}.json").exists()

    run_cli([*args, "--task-index", "1"])
    proc = run_cli(["prepare", "--finalize", "--output", str(out)], check=False)
    assert proc.returncode == 2 and "task(s) 0 of 2 have not finished" in proc.stderr
    done = {p: p.stat().st_mtime_ns for p in out.glob("train-*.tar") if not p.name.startswith(f"train-{stuck:06d}-")}
    os.unlink(files[1])
    Path(files[1]).write_bytes(b"")
    proc = run_cli([*args, "--task-index", "0"])
    assert "finalized" in proc.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()) and done  # finished units were not redone

    ref = tmp_path / "ref"
    run_cli(["prepare", "--input", *files, "--output", str(ref), "--tokenizer", vocab, *SPLIT]
            + ["--chunk-bytes", str(chunk), "--workers", "1"])  # fmt: skip
    assert _files(out) == _files(ref)
