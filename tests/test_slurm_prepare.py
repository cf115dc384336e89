"""slurm/prepare.sh and slurm/prepare_finalize.sh on the suite's real SLURM cluster (tests/test_slurm.py's `slurm`
fixture: slurmctld and two slurmd on this machine), submitted as docs/data.md ("On a cluster") says: the vocabulary
step, a 3-task job array after it and the finalize step after the array (`--dependency=afterok`) give, byte for
byte, the shards of one local 1-worker prepare; a task that fails on a corrupt input leaves the finalize step
pending and finalize refusing, naming it, and a re-run of that task alone
completes the set, identical, without redoing what had finished: `sbatch --array=K ... --num-tasks N`."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests import test_slurm
from tests.corpus import write_corpus
from tests.test_slurm import NODES, PATIENCE, ROOT, Cluster, _run, job_env

cluster = test_slurm.slurm  # the suite's SLURM cluster fixture, here started for this module

TASKS = 3
FILES = 5  # inputs: several per task, so that each task has a slice of its own
# 3 of a node's 4 CPUs per task: a node runs one task at a time, so the array spreads over both nodes.
CPUS = 3
CHUNK = "4096"  # --chunk-bytes: each input file (read whole, being gzipped) is a work unit of its own
ERROR = "electra-scale prepare: error:"  # the entry point's one line for a bad input
ELECTRA = str(Path(sys.prefix) / "bin" / "electra-scale")


def write_inputs(d: Path) -> list[Path]:
    """FILES gzipped JSON-lines files of the test corpus (different documents in each)."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(FILES):
        plain = write_corpus(d / f"part-{i}.jsonl", documents=120, seed=100 + i)
        path = d / f"part-{i}.jsonl.gz"
        path.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
        paths.append(path)
    return paths


def submit(c: Cluster, script: str, *args: str, sbatch: tuple[str, ...] = ()) -> str:
    out = _run("sbatch", "--parsable", f"--chdir={ROOT}", *sbatch, str(ROOT / "slurm" / script), *args, env=job_env(c))
    return out.strip().split(";")[0]


def records(c: Cluster, job: str) -> list[dict[str, str]]:
    """`scontrol show job` of a job or an array: one dict per job (per array task)."""
    text = _run("scontrol", "show", "job", "--oneliner", job, env=c.env, check=False)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]


def wait_until_ended(c: Cluster, job: str, logs: Path) -> list[dict[str, str]]:
    deadline = time.monotonic() + PATIENCE
    while True:
        recs = records(c, job)
        if recs and all(r["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for r in recs):
            return recs
        assert time.monotonic() < deadline, (recs, tails(logs))
        time.sleep(1)


def tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.out")))


def files(root: Path) -> dict[str, bytes]:
    """Every file of a shard set but its parts/ (the tasks' records, which finalize leaves in place), and its
    manifests without their `created` time."""
    out = {}
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        if p.is_file() and not name.startswith("parts/"):
            out[name] = p.read_bytes()
            if p.name == "manifest.json":
                out[name] = json.dumps({**json.loads(out[name]), "created": None}).encode()
    return out


def local_prepare(inputs: list[Path], out: Path, tokenizer: str) -> dict[str, bytes]:
    """The reference: the same inputs through one local prepare, one worker, one task."""
    proc = subprocess.run(
        [ELECTRA, "prepare", "--input", *map(str, inputs), "--output", str(out), "--tokenizer", tokenizer,
         "--seq-len", "128", "--chunk-bytes", CHUNK, "--workers", "1", "--num-tasks", "1"],
        capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return files(out)


def assert_same_shards(array_out: Path, reference: dict[str, bytes]) -> None:
    got = files(array_out)
    assert sorted(got) == sorted(reference) and any(name.endswith(".tar") for name in got)
    for name, data in reference.items():
        assert got[name] == data, f"{name} differs from the 1-worker prepare's"


def shards_of_finished_units(out: Path) -> list[str]:
    """The shard files of the work units that have their done-marker (parts/units/unit-*.json)."""
    names = []
    for marker in sorted((out / "parts" / "units").glob("unit-*.json")):
        unit = json.loads(marker.read_text())
        names += [shard["name"] for shard in unit["train"]["shards"]]
    return names


def test_vocabulary_array_and_finalize_chained_with_dependencies(cluster, tmp_path):
    inputs, out, logs = write_inputs(tmp_path / "in"), tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    common = ["--input", *map(str, inputs), "--output", str(out), "--seq-len", "128", "--chunk-bytes", CHUNK]
    args = [*common, "--tokenizer", f"{out}/tokenizer.json"]
    # All three submitted at once, as docs/data.md shows; SLURM holds each step until the one before succeeded.
    vocab = submit(
        cluster, "prepare.sh", *common, "--tokenizer", "train:300", "--tokenizer-only",
        sbatch=(f"--cpus-per-task={CPUS}", f"--output={logs}/vocab.out"),
    )  # fmt: skip
    array = submit(
        cluster, "prepare.sh", *args,
        sbatch=(f"--array=0-{TASKS - 1}", f"--cpus-per-task={CPUS}", f"--dependency=afterok:{vocab}",
                f"--output={logs}/task-%a.out"),
    )  # fmt: skip
    final = submit(
        cluster, "prepare_finalize.sh", *args, sbatch=(f"--dependency=afterok:{array}", f"--output={logs}/final.out")
    )
    (fin,) = wait_until_ended(cluster, final, logs)
    assert fin["JobState"] == "COMPLETED", tails(logs)
    tasks = records(cluster, array)
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == list(range(TASKS))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert {t["NodeList"] for t in tasks} == set(NODES), "the array ran on both nodes"
    # Each task saw its place in the array (slurm/common.sh's line) and finalize ran after all of them.
    for k in range(TASKS):
        assert f"task {k} of {TASKS}" in (logs / f"task-{k}.out").read_text()
    assert (out / "manifest.json").exists()

    reference = local_prepare(inputs, tmp_path / "local", f"{out}/tokenizer.json")
    assert_same_shards(out, reference)
    print(f"\n{tails(logs)}")


def test_a_failed_task_is_named_by_finalize_and_rerun_alone(cluster, shards, tmp_path):
    inputs, out, logs = write_inputs(tmp_path / "in"), tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    args = ["--input", *map(str, inputs), "--output", str(out), "--seq-len", "128", "--chunk-bytes", CHUNK,
            "--tokenizer", f"{shards[0]}/tokenizer.json"]  # fmt: skip
    # One input's second half zeroed (a bad copy of the same size: the units, cut by byte offsets, stay the
    # same): gzip fails part-way through it, in whichever task's slice holds it.
    bad, good = inputs[3], inputs[3].read_bytes()
    bad.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    array = submit(
        cluster, "prepare.sh", *args,
        sbatch=(f"--array=0-{TASKS - 1}", f"--cpus-per-task={CPUS}", f"--output={logs}/task-%a.out"),
    )  # fmt: skip
    final = submit(
        cluster, "prepare_finalize.sh", *args, sbatch=(f"--dependency=afterok:{array}", f"--output={logs}/final.out")
    )
    tasks = wait_until_ended(cluster, array, logs)
    failed = [int(t["ArrayTaskId"]) for t in tasks if t["JobState"] != "COMPLETED"]
    assert len(failed) == 1, (tasks, tails(logs))
    k = failed[0]
    errors = [line for line in (logs / f"task-{k}.out").read_text().splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and bad.name in errors[0], tails(logs)
    # The finalize step after the array is never started: SLURM holds it (DependencyNeverSatisfied).
    deadline = time.monotonic() + PATIENCE  # slurmctld marks it at its next scheduling pass
    while (fin := records(cluster, final)[0])["Reason"] == "Dependency" and time.monotonic() < deadline:
        time.sleep(1)
    assert fin["JobState"] == "PENDING" and fin["Reason"] == "DependencyNeverSatisfied", fin
    _run("scancel", final, env=cluster.env)
    assert not (out / "manifest.json").exists()

    # Run by hand, finalize refuses in one line naming the failed task, and writes nothing.
    proc = subprocess.run(
        ["sbatch", "--wait", f"--chdir={ROOT}", f"--output={logs}/refused.out",
         str(ROOT / "slurm" / "prepare_finalize.sh"), *args],
        capture_output=True, text=True, env=job_env(cluster), timeout=PATIENCE,
    )  # fmt: skip
    assert proc.returncode != 0
    refusal = [line for line in (logs / "refused.out").read_text().splitlines() if line.startswith(ERROR)]
    assert len(refusal) == 1, refusal
    named = re.search(r"task\(s\) ([\d, ]+) of (\d+)", refusal[0])
    assert named and named.group(1) == str(k) and named.group(2) == str(TASKS), refusal
    assert not (out / "manifest.json").exists()

    # The input fixed, task k alone re-runs as docs/data.md says: an array of one, `--array=K`, told the task
    # count (without --num-tasks an array of one would be task 0 of 1).
    bad.write_bytes(good)
    finished = shards_of_finished_units(out)
    assert finished, "the tasks that succeeded left their units' markers"
    before = {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in finished}
    rerun = submit(
        cluster, "prepare.sh", *args, "--num-tasks", str(TASKS),
        sbatch=(f"--array={k}", f"--cpus-per-task={CPUS}", f"--output={logs}/rerun.out"),
    )  # fmt: skip
    (task,) = wait_until_ended(cluster, rerun, logs)
    assert task["JobState"] == "COMPLETED", tails(logs)
    assert (out / "parts" / f"part-{k:05d}-of-{TASKS:05d}.json").exists(), tails(logs)
    final = submit(cluster, "prepare_finalize.sh", *args, sbatch=(f"--output={logs}/final2.out",))
    (fin,) = wait_until_ended(cluster, final, logs)
    assert fin["JobState"] == "COMPLETED", tails(logs)
    # Nothing finished was redone: every shard of a unit done before the re-run is the same file, untouched.
    assert {name: ((out / name).stat().st_mtime_ns, (out / name).read_bytes()) for name in finished} == before

    reference = local_prepare(inputs, tmp_path / "local", f"{shards[0]}/tokenizer.json")
    assert_same_shards(out, reference)
    print(f"\n{tails(logs)}")
