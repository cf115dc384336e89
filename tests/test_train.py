"""Pretraining end to end with real DeepSpeed (gloo, 1 and 2 ranks), real shards, a real S3 server.

Each run is the real CLI in a process of its own, its ranks with the environment torchrun gives them
(tests/cli.py); the launcher tests start real torchrun, mpirun and srun-like tasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from electra_scale.infra import storage
from electra_scale.infra.launch import free_port
from tests.cli import PATIENCE, ROOT, run_cli, start_cli


def pretrain_args(shards: tuple[str, int], output: str, *overrides: str) -> list[str]:
    prefix, vocab = shards
    return [
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        f"data.shards={prefix}",
        f"run.output_dir={output}",
        f"model.vocab_size={vocab}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
        # A few steps must move the loss: the preset's 2e-4 (chosen for its 300-step demo) barely does in 4.
        "optim.lr=2e-3",
        "optim.warmup_steps=2",
        "data.num_workers=1",
        *overrides,
    ]


def metrics(output: str, split: str = "train") -> list[dict]:
    """A run's records of one split: training's (which have no "split") or a held-out evaluation's ("eval")."""
    lines = storage.read_text(storage.join(output, "metrics.jsonl")).splitlines()
    return [rec for rec in map(json.loads, lines) if rec.get("split", "train") == split]


NO_DROPOUT = ("model.dropout=0", "model.attention_dropout=0")
# Keys of a training record that an evaluation's record has no use for (it has no update, no data stream).
TRAIN_ONLY = ("lr", "grad_norm", "step_time_s", "tokens_per_s", "pad_frac", "tflops", "mfu", "samples_seen",
              "data_wait", "skipped_blocks", "slowest_rank", "slowest_step_s", "slowest_data_wait_s",
              "slowest_vs_median", "startup")  # fmt: skip


@pytest.fixture(scope="module")
def zero2_baseline(shards, tmp_path_factory) -> str:
    """1 rank x micro-batch 4 x accumulation 2, ZeRO-2, dropout off, 3 steps: what other runs must equal."""
    out = str(tmp_path_factory.mktemp("zero2") / "run")
    run_cli(pretrain_args(shards, out, "train.max_steps=3", "checkpoint.every_steps=100", *NO_DROPOUT))
    return out


def test_two_ranks_match_one_rank(shards, zero2_baseline, tmp_path):
    """2 ranks x micro-batch 4 == 1 rank x micro-batch 8 == 1 rank x 4 x accumulation 2 (dropout off): losses,
    accuracies and the discriminator's AUC."""
    common = ("train.max_steps=3", "checkpoint.every_steps=100", *NO_DROPOUT)
    logged = run_cli(pretrain_args(shards, str(tmp_path / "w2"), *common), ranks=2)
    run_cli(pretrain_args(shards, str(tmp_path / "w1"), *common, "train.micro_batch_size=8"))
    two, one, acc = metrics(str(tmp_path / "w2")), metrics(str(tmp_path / "w1")), metrics(zero2_baseline)
    assert [m["step"] for m in two] == [m["step"] for m in acc] == [1, 2, 3]
    for a, b, c in zip(two, one, acc):
        for key in ("loss", "gen_loss", "disc_loss", "disc_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
            assert c[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (c["step"], key)
    assert two[-1]["loss"] < two[0]["loss"]  # and it learns
    # The discriminator's AUC (engine/auc.py) is logged, and its histograms are whole counts summed exactly over
    # micro-batches and ranks: the three runs agreed to the last digit where this was written (1e-3 leaves room
    # for a token on a bin edge to round into its neighbour on another CPU; half the tokens would be ~0.02 off).
    for a, b, c in zip(two, one, acc):
        assert 0.0 <= a["disc_auc"] <= 1.0
        assert a["disc_auc"] == pytest.approx(b["disc_auc"], abs=1e-3), a["step"]
        assert a["disc_auc"] == pytest.approx(c["disc_auc"], abs=1e-3), a["step"]
    assert f"| auc {two[-1]['disc_auc']:.3f} |" in logged.stderr
    for m in two:  # the share of the step each rank spent waiting for its next batch, and no bad block
        assert 0 <= m["data_wait"] < 1 and m["skipped_blocks"] == 0


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory) -> str:
    """8 steps on 2 ranks with dropout on, checkpoints every 4 steps."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    run_cli(pretrain_args(shards, out, "train.max_steps=8", "checkpoint.every_steps=4"), ranks=2)
    return out


def test_resume_is_exact_on_local_disk(shards, eval_shards, straight_run, tmp_path):
    """Stopped at step 4 and resumed, with a held-out evaluation every 3 steps (engine/evaluate.py), the run logs
    the very losses of the straight run, which evaluates nothing: resuming is exact, and evaluating (dropout off,
    then on again; its own keyed masks; torch's RNG restored) changes nothing in training."""
    out = str(tmp_path / "resumed")
    evaluation = (f"eval.shards={eval_shards}", "eval.every_steps=3", "eval.examples=24")
    args = pretrain_args(shards, out, "train.max_steps=8", "checkpoint.every_steps=4", *evaluation)
    run_cli([*args, "train.stop_at_step=4"], ranks=2)
    assert storage.read_text(f"{out}/checkpoints/latest").strip() == "step_0000004"
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    second = run_cli(args, ranks=2)
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    straight, resumed = metrics(straight_run), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 9))  # no step logged twice
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']} != {b['loss']}"
        assert a["lr"] == b["lr"] and a["disc_auc"] == b["disc_auc"]
    # One record per evaluation (steps 3, 6 and the last, 8), none repeated by the resume, with the training
    # records' metrics; the log line says it.
    evals = metrics(out, "eval")
    assert [m["step"] for m in evals] == [3, 6, 8] and all(m["examples"] == 24 for m in evals)
    assert all(set(straight[0]) - set(TRAIN_ONLY) <= set(m) for m in evals)  # gen_*, disc_* (auc too), loss
    assert all(0.0 < m["disc_auc"] < 1.0 and m["loss"] > 0 for m in evals)
    assert "eval at step 8 | loss" in second.stderr
    state = json.loads(Path(out, "checkpoints", "step_0000008", "trainer_state.json").read_text())
    assert state["step"] == 8 and state["data_position"]["samples_seen"] == 64 and state["world_size"] == 2
    marker = json.loads(Path(out, "checkpoints", "step_0000008", "COMPLETE").read_text())
    assert {"rng/rank_0.pt", "rng/rank_1.pt", "trainer_state.json", "mp_rank_00_model_states.pt"} <= set(
        marker["files"]
    )
    assert any("zero_pp_rank_1_" in name for name in marker["files"])


def test_resume_is_exact_on_s3(shards, s3_bucket, tmp_path):
    local_prefix, vocab = shards
    s3_shards = f"{s3_bucket}/shards"
    for name in storage.list_files(local_prefix):
        storage.upload_file(Path(local_prefix, name), storage.join(s3_shards, name))
    s3 = (s3_shards, vocab)
    common = ("train.max_steps=6", "checkpoint.every_steps=3")
    run_cli(pretrain_args(s3, f"{s3_bucket}/straight", *common, f"run.cache_dir={tmp_path / 'cache0'}"))
    resumed_args = pretrain_args(s3, f"{s3_bucket}/resumed", *common, f"run.cache_dir={tmp_path / 'cache'}")
    run_cli([*resumed_args, "train.stop_at_step=3"])
    assert storage.read_text(f"{s3_bucket}/resumed/checkpoints/latest").strip() == "step_0000003"
    run_cli(resumed_args)
    straight, resumed = metrics(f"{s3_bucket}/straight"), metrics(f"{s3_bucket}/resumed")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
    files = storage.list_files(f"{s3_bucket}/resumed/checkpoints")
    assert "step_0000006/COMPLETE" in files and "latest" in files
    # The node's uploader (engine/uploader.py) wrote one part, which lists every file of the marker.
    assert [rel for rel in files if rel.startswith("step_0000006/parts/")] == ["step_0000006/parts/node_0.json"]
    part = json.loads(storage.read_text(f"{s3_bucket}/resumed/checkpoints/step_0000006/parts/node_0.json"))
    marker = json.loads(storage.read_text(f"{s3_bucket}/resumed/checkpoints/step_0000006/COMPLETE"))
    assert part["ranks"] == [0] and part["files"] == marker["files"]
    assert not any(Path(tmp_path, "cache", "checkpoints").glob("step_*")), "staging is cleaned after upload"


def test_export_round_trip(straight_run, tmp_path):
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    from electra_scale.config import load_config
    from electra_scale.engine.objective import build_objective

    run_cli(["export", straight_run, str(tmp_path / "hf")])
    disc = ElectraForPreTraining.from_pretrained(tmp_path / "hf" / "discriminator").eval()
    gen = ElectraForMaskedLM.from_pretrained(tmp_path / "hf" / "generator").eval()
    assert (tmp_path / "hf" / "discriminator" / "model.safetensors").exists()

    # Independently of DeepSpeed's consolidation: the module weights rank 0 saved (fp32 run) in the checkpoint.
    ckpt = Path(straight_run, "checkpoints", "step_0000008")
    cfg = load_config(ckpt / "config.yaml")
    special = json.loads((ckpt / "data_manifest.json").read_text())["special_ids"]
    reference = build_objective(cfg, special).eval()
    module_state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    reference.load_state_dict(module_state)

    ids = torch.randint(5, cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        expected = reference.discriminator(input_ids=ids).logits
        assert torch.allclose(disc(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(gen(input_ids=ids).logits, reference.generator(input_ids=ids).logits, atol=1e-5)
    # The exported tokenizer encodes text to the ids the model was trained on.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf" / "discriminator")
    encoded = tok("the river city", "north road")["input_ids"]
    assert encoded[0] == special["cls"] and encoded.count(special["sep"]) == 2


def test_corrupted_checkpoint_falls_back_to_the_previous_one(shards, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(shards, str(out), "train.max_steps=6", "checkpoint.every_steps=2")
    run_cli([*args, "train.stop_at_step=4"])
    before = {m["step"]: m["loss"] for m in metrics(str(out))}
    optim = next((out / "checkpoints" / "step_0000004").glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged
    optim.write_bytes(bytes(data))
    proc = run_cli(args)
    assert "step_0000004 fails verification" in proc.stderr and "does not match its sha256" in proc.stderr
    assert "at step 2" in proc.stderr  # resumed from the previous complete checkpoint
    after = metrics(str(out))
    assert [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in after[:4]] == [before[s] for s in (1, 2, 3, 4)]  # steps 3-4 redone exactly


@pytest.mark.parametrize("stage", ["zero1", "zero3", "zero3_offload"])
def test_other_zero_stages_train_the_same_model(shards, zero2_baseline, tmp_path, stage):
    out = str(tmp_path / stage)
    common = ("train.max_steps=3", "checkpoint.every_steps=100", *NO_DROPOUT)
    run_cli(pretrain_args(shards, out, *common, f"train.deepspeed_config=ds_configs/{stage}.json"))
    for a, b in zip(metrics(zero2_baseline), metrics(out), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert Path(out, "checkpoints", "step_0000003", "COMPLETE").exists()


def start_processes(args: list[str], envs: list[dict]) -> list:
    """One CLI process per environment, as a launcher (srun, the Job controller) starts them."""
    return [start_cli(args, env=env) for env in envs]


def start_slurm_tasks(args: list[str], tasks: int = 2) -> list:
    """Start the CLI as srun would: one process per task, each with its SLURM task environment."""
    port = str(free_port())
    envs = [
        {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(tasks), "SLURM_NODEID": "0",
         "SLURM_JOB_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": str(tasks), "SLURM_JOB_ID": "4242",
         "SLURM_STEP_ID": "0", "MASTER_PORT": port}
        for rank in range(tasks)
    ]  # fmt: skip
    return start_processes(args, envs)


def test_two_processes_started_as_slurm_tasks(shards, tmp_path):
    """What srun gives each task: the run must detect SLURM, agree on a master and train as 2 ranks."""
    out = str(tmp_path / "slurm")
    procs = start_slurm_tasks(pretrain_args(shards, out, "train.max_steps=2", "checkpoint.every_steps=100"))
    errs = [p.communicate(timeout=PATIENCE)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "launch: SLURM, world size 2 (1 node(s) x 2)" in errs[0]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    marker = json.loads(Path(out, "checkpoints", "step_0000002", "COMPLETE").read_text())
    assert marker["world_size"] == 2 and "rng/rank_1.pt" in marker["files"]


@pytest.mark.parametrize(("signum", "to_rank"), [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_checkpoints_on_every_rank_and_resume_continues(shards, tmp_path, signum, to_rank):
    out = tmp_path / "run"
    args = pretrain_args(shards, str(out), "train.max_steps=400", "checkpoint.every_steps=1000")
    procs = start_slurm_tasks(args)
    deadline = time.monotonic() + PATIENCE
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "run did not get going"
        time.sleep(0.2)
    procs[to_rank].send_signal(signum)  # only one rank is told: both must still stop at the same step
    errs = [p.communicate(timeout=PATIENCE)[1] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], errs[0][-2000:] + errs[1][-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step_"))
    assert 3 <= stopped < 400 and (out / "checkpoints" / latest / "COMPLETE").exists()
    assert f"stopped at step {stopped} by a signal" in errs[0]
    assert [m["step"] for m in metrics(str(out))] == list(range(1, stopped + 1))

    # Re-running the same command resumes there (stop a few steps later to keep the test short).
    procs = start_slurm_tasks([*args, f"train.stop_at_step={stopped + 2}"])
    errs = [p.communicate(timeout=PATIENCE)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:]
    assert f"at step {stopped}" in errs[0]
    assert [m["step"] for m in metrics(str(out))] == list(range(1, stopped + 3))


def test_kubernetes_pod_with_two_gpus_spawns_two_ranks_and_stops_on_sigterm(shards, tmp_path):
    """The env an Indexed Job pod gets (ELECTRA_NPROC_PER_NODE=2): the CLI supervises torchrun with 2 ranks.
    Kubernetes' SIGTERM reaches only the pod's main process: the ranks must still checkpoint, and the pod
    must exit 75 (which the podFailurePolicy restarts on), although torchrun reports any failure as 1."""
    out = tmp_path / "k8s"
    env = {
        "JOB_COMPLETION_INDEX": "0",
        "ELECTRA_NNODES": "1",
        "ELECTRA_NPROC_PER_NODE": "2",
        "HOSTNAME": "electra-small-0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    args = pretrain_args(shards, str(out), "train.max_steps=400", "checkpoint.every_steps=1000")
    (pod,) = start_processes(args, [env])
    deadline = time.monotonic() + PATIENCE
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.monotonic() < deadline and pod.poll() is None, "run did not get going"
        time.sleep(0.2)
    pod.send_signal(signal.SIGTERM)
    err = pod.communicate(timeout=PATIENCE)[1]
    assert pod.returncode == 75, err[-3000:]
    assert "launch: torchrun/deepspeed, world size 2 (1 node(s) x 2)" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    marker = json.loads((out / "checkpoints" / latest / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["step"] >= 2


def test_two_kubernetes_pods_train_together(shards, tmp_path):
    """2 "pods" of an Indexed Job (one process each), with the env the Job controller and the manifest give
    them; MASTER_ADDR stands in for the headless Service's DNS name <job>-0.<service> resolving to 127.0.0.1."""
    out = str(tmp_path / "pods")
    port = str(free_port())
    envs = [
        {"JOB_COMPLETION_INDEX": str(index), "ELECTRA_NNODES": "2", "ELECTRA_NPROC_PER_NODE": "1",
         "ELECTRA_K8S_SERVICE": "electra-small", "HOSTNAME": f"electra-{index}", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": port}
        for index in range(2)
    ]  # fmt: skip
    procs = start_processes(pretrain_args(shards, out, "train.max_steps=2", "checkpoint.every_steps=100"), envs)
    errs = [p.communicate(timeout=PATIENCE)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "launch: Kubernetes Indexed Job, world size 2 (2 node(s) x 1)" in errs[0]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_mpirun_two_ranks(shards, tmp_path):
    """mpirun starts the CLI twice; launch.py reads OMPI_COMM_WORLD_* and the master from MASTER_ADDR."""
    out = str(tmp_path / "mpi")
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        "2",
        "-x",
        "MASTER_ADDR=127.0.0.1",
        "-x",
        f"MASTER_PORT={free_port()}",
        "-x",
        "OMP_NUM_THREADS=1",
        "-x",
        "PATH",
        "-x",
        "DS_ACCELERATOR",
        sys.executable,
        "-m",
        "electra_scale",
        *pretrain_args(shards, out, "train.max_steps=2", "checkpoint.every_steps=100"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launch: OpenMPI, world size 2 (1 node(s) x 2)" in proc.stderr + proc.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------ bad input
def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def assert_nothing_complete(output: Path) -> None:
    assert not list(output.rglob("COMPLETE")) and not (output / "checkpoints" / "latest").exists()


def test_a_mix_of_two_sources_on_two_ranks(shards, corpus, tmp_path):
    """data.sources on 2 ranks: metrics.jsonl counts each source's examples and epochs, the sample log names
    each example's source, both as the mix defines them; a resume with other weights is refused in one line."""
    import numpy as np

    from electra_scale.data import prepare
    from electra_scale.data.mix import SourceMix
    from electra_scale.engine.metrics import read_samples

    prefix, _ = shards
    small_docs = tmp_path / "contracts.jsonl"
    small_docs.write_text("".join(Path(corpus).read_text().splitlines(keepends=True)[:20]))
    small = str(tmp_path / "contracts")
    tokenizer = os.path.join(prefix, "tokenizer.json")
    manifest = prepare([str(small_docs)], small, tokenizer, seq_len=128, samples_per_block=4, progress=False)
    out = str(tmp_path / "run")

    def mix(w: float) -> str:
        return f"data.sources=[{{shards: {prefix}, weight: {w}, name: general}}, {{shards: {small}, weight: 0.75}}]"

    common = ("data.shards=", "train.max_steps=6", "train.log_every=3", "run.record_samples=true", "data.partitions=4")
    logged = run_cli(pretrain_args(shards, out, *common, mix(0.25)), ranks=2)
    assert "data mixed from 2 sources: general 0.25" in logged.stderr and "contracts 0.75" in logged.stderr
    expected = SourceMix([0.25, 0.75], 4, seed=12345)  # tiny.yaml's train.seed
    records = metrics(out)
    assert [m["step"] for m in records] == [3, 6]
    for m in records:
        general, contracts = expected.totals(m["step"] * 8)
        assert m["source_examples"] == {"general": general, "contracts": contracts}
        epoch = 4 * -(-manifest.num_samples // 4)  # the small source's epoch: P spans of ceil(N / P)
        assert m["source_epochs"]["contracts"] == pytest.approx(contracts / epoch, abs=1e-4)
    assert "contracts 36 (ep " in logged.stderr  # the log line: 48 examples x 0.75
    sources = read_samples(out, "sources")
    for step, positions in read_samples(out).items():
        assert positions == list(range((step - 1) * 8, step * 8))
        names = np.array(["general", "contracts"])[expected.sources(np.array(positions))]
        assert sources[step] == sorted(names.tolist())
    for path in Path(out, "samples").glob("rank_*.jsonl"):  # each rank's line pairs an example with its source
        for rec in map(json.loads, path.read_text().splitlines()):
            assert all(i < manifest.num_samples for i, k in zip(rec["samples"], rec["sources"]) if k == "contracts")
    proc = run_cli(pretrain_args(shards, out, *common, "train.max_steps=8", mix(0.5)), check=False)
    assert proc.returncode == 2
    assert_one_line_error(proc, "trained on general (weight 0.25), contracts (weight 0.75)", "set data.sources back")


def test_shards_without_manifest(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    proc = run_cli(pretrain_args((str(tmp_path / "empty"), shards[1]), str(out)), check=False)
    assert_one_line_error(proc, "manifest.json", str(tmp_path / "empty"))
    assert_nothing_complete(out)


def test_vocab_mismatch(shards, tmp_path):
    out = tmp_path / "run"
    proc = run_cli([*pretrain_args(shards, str(out)), "model.vocab_size=30522"], check=False)
    assert_one_line_error(proc, "vocab", "30522", str(shards[1]))
    assert_nothing_complete(out)


def test_unreachable_s3_endpoint(shards, tmp_path):
    out = tmp_path / "run"
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    env["ELECTRA_S3_MAX_ATTEMPTS"] = "2"
    proc = run_cli(pretrain_args(("s3://nowhere/shards", shards[1]), str(out)), env=env, check=False)
    assert_one_line_error(proc, "cannot reach the S3 endpoint http://127.0.0.1:9", "AWS_ENDPOINT_URL")
    assert_nothing_complete(out)


def test_wrong_s3_credentials(shards, s3_bucket, s3_server, tmp_path):
    out = f"{s3_bucket}/run"
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = run_cli(pretrain_args((f"{s3_bucket}/shards", shards[1]), out), env=env, check=False)
    assert_one_line_error(proc, "rejected the credentials", "AWS_SECRET_ACCESS_KEY")
    assert storage.list_files(out) == []


def test_output_dir_that_is_a_file(shards, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    proc = run_cli(pretrain_args(shards, str(taken)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_one_line_error(proc, f"run.output_dir={taken} cannot be a directory: {taken} is a file", "set run.output")
    assert taken.read_text() == "mine\n"
    proc = run_cli(pretrain_args(shards, str(taken / "run")), check=False)  # a file above it: the same
    assert proc.returncode == 2 and f"cannot be a directory: {taken} is a file" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_export_of_a_directory_without_a_checkpoint(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["export", str(tmp_path / "empty"), str(tmp_path / "hf")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_one_line_error(proc, f"no complete checkpoint at {tmp_path / 'empty'}", "checkpoints/latest")
    assert not (tmp_path / "hf").exists()


def test_malformed_config_file(shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 10\n model: {}\n")
    proc = run_cli(["pretrain", "--config", str(bad)], check=False)
    assert proc.returncode == 2
    assert_one_line_error(proc, "not valid YAML", "line 3")


def test_activation_checkpointing_trains_the_same_model(shards, tmp_path):
    """Recomputing the encoders' activations in the backward pass changes memory, not the model: the same
    losses, dropout included (its RNG state is replayed)."""
    common = ("train.max_steps=3", "checkpoint.every_steps=100")
    run_cli(pretrain_args(shards, str(tmp_path / "plain"), *common))
    run_cli(pretrain_args(shards, str(tmp_path / "recompute"), *common, "train.activation_checkpointing=true"))
    plain, recompute = metrics(str(tmp_path / "plain")), metrics(str(tmp_path / "recompute"))
    assert [m["loss"] for m in recompute] == [m["loss"] for m in plain]


def test_the_tiny_presets_losses_are_pinned(tmp_path):
    """A refactor must not change what a run computes: the tiny preset's first 5 losses on a fixed synthetic
    shard set (no trained vocabulary, whose ties fall differently from run to run) are the recorded ones. They
    were bit-identical on the machine that recorded them; other CPUs may round differently in the last digits."""
    from electra_scale.tools.bench.data import synthetic_shards

    pinned = json.loads((ROOT / "tests" / "data" / "tiny_losses.json").read_text())["losses"]
    shards = synthetic_shards(str(tmp_path / "shards"), 4096, 128, 512, samples_per_block=16, seed=0)
    out = str(tmp_path / "run")
    run_cli(pretrain_args((shards, 4096), out, "train.max_steps=5", "checkpoint.every_steps=100"))
    assert [m["loss"] for m in metrics(out)] == pytest.approx(pinned, rel=1e-6)


def test_a_run_that_cannot_start_writes_nothing_and_says_why(shards, tmp_path):
    """Inputs are checked before anything is written; a checkpoint of another model shape is refused in one
    line, before loading, naming the key and the way to a fresh run."""
    out = tmp_path / "run"
    proc = run_cli(pretrain_args((str(tmp_path / "no-shards"), 186), str(out), "train.max_steps=2"), check=False)
    assert proc.returncode == 2 and "no manifest.json at" in proc.stderr
    assert not out.exists()

    run_cli(pretrain_args(shards, str(out), "train.max_steps=2", "checkpoint.every_steps=2"))
    proc = run_cli(pretrain_args(shards, str(out), "train.max_steps=4", "model.num_layers=1"), check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "was trained with another model (model.num_layers=2 there, 1 here)" in errors[0]
    assert "start a new run with a new run.output_dir" in errors[0] and "Traceback" not in proc.stderr


def test_the_cuda_arch_list_is_made_readable_to_deepspeeds_jit_builder(monkeypatch):
    # The H200 image sets suffixed architectures, on which DeepSpeed's FusedAdam build failed ("'0a'").
    from electra_scale.engine.optim import deepspeed_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a;10.0f+PTX;9.0")
    assert deepspeed_arch_list() == "8.0;9.0;10.0+PTX"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert deepspeed_arch_list() is None


def test_pretrain_gives_the_signal_handlers_back(monkeypatch):
    """A tool that runs pretrain several times in one process (bench's ablation) must get SIGTERM back: the
    handler pretrain installs for a graceful stop is removed when it returns or fails."""
    from electra_scale.config import load_config
    from electra_scale.engine import train

    def handlers():
        return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)

    before = handlers()
    seen = []

    def failing_setup(cfg, stop):
        seen.append(handlers())
        raise RuntimeError("set-up failed")

    monkeypatch.setattr(train, "setup", failing_setup)
    with pytest.raises(RuntimeError, match="set-up failed"):
        train.pretrain(load_config("configs/tiny.yaml"))
    assert seen and seen[0] != before  # pretrain's own handler was in place during the run
    assert handlers() == before
