"""``electra-scale bench`` end to end, tiny: its own SeaweedFS, synthetic shards, all three training paths."""

from __future__ import annotations

import json

import pytest

from electra_scale import cli
from electra_scale.config import load_config
from electra_scale.engine.model import flops_per_token
from tests.cli import run_cli

TINY = ["--config", "configs/tiny.yaml", "train.micro_batch_size=4", "data.num_workers=1"]


def test_bench_reports_every_path(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--steps", "2", "--warmup", "1", "--data-samples", "256", "--block-samples", "8"]
    args += ["--json-out", str(out), "--ablate", "train.unpad=true"]
    proc = run_cli(args)
    report = json.loads(out.read_text())

    cfg = load_config("configs/tiny.yaml", ["train.micro_batch_size=4"])
    assert report["flops_per_token"] == pytest.approx(flops_per_token(cfg))
    assert report["tokens_per_step"] == 4 * 128 and report["threads"] >= 1
    assert report["peak_source"].startswith("measured fp32 matmul") and report["peak_tflops"] > 0
    for name in ("bare", "engine", "pretrain"):
        r = report["results"][name]
        assert r["error"] is None, r["error"]
        assert r["steps"] == 2 and r["step_time_s"] > 0
        # Real tokens: the synthetic shards' 10% of shorter examples are not counted as work.
        real = r["real_tokens_per_step"] if name == "pretrain" else report["real_tokens_per_step"]
        assert r["tokens_per_s"] == pytest.approx(real / r["step_time_s"])
        assert 0 < real <= report["tokens_per_step"]
        assert 0 < r["mfu"] < 1
        assert r["peak_memory_bytes"] > 0  # what the path adds to the process: model, optimizer, activations
    # Each path against bare steps interleaved with it: pretrain ran bare steps between its logging windows.
    pretrain, engine, bare = (report["results"][name] for name in ("pretrain", "engine", "bare"))
    overhead = report["overhead"]
    assert overhead["pretrain_vs_bare"] == pytest.approx(pretrain["step_time_s"] / pretrain["bare_step_time_s"])
    assert overhead["engine_vs_bare"] == pytest.approx(engine["step_time_s"] / bare["step_time_s"])
    assert overhead["pretrain_vs_bare_cpu_time"] == pytest.approx(pretrain["cpu_time_s"] / pretrain["bare_cpu_time_s"])
    data = report["results"]["data"]
    assert data == report["data"] and data["world_size"] == 1
    assert data["source"].startswith("s3://") and data["shards"] == 2 and data["samples"] == 256
    assert data["tokens_per_s"] > 0 and 0 < data["real_tokens_per_s"] <= data["tokens_per_s"]
    assert data["samples_per_s"] == pytest.approx(data["tokens_per_s"] / 128)
    assert data["gets"] == 32 and data["bytes_share"] == pytest.approx(1.0, abs=0.01)  # each block once

    texts = ("bare PyTorch loop", "DeepSpeed engine", "electra-scale pretrain", "framework overhead", "data path")
    for text in (*texts, "ablation train.unpad=true:"):
        assert text in proc.stdout
    # The ablation: the real pretrain path once per lever setting, a row each, in real tokens.
    (row,) = report["ablation"]
    assert row["lever"] == "train.unpad" and row["value"] == "true" and row["error"] is None
    assert row["step_time_s"] > 0 and 0 < row["mfu"] < 1 and 0 <= row["pad_frac"] < 0.5
    assert row["tokens_per_s"] == pytest.approx(row["examples_per_s"] * 128 * (1 - row["pad_frac"]), rel=1e-6)


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert cli.main(["bench", *TINY, "--data", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *TINY, "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps: must be >= 1" in capsys.readouterr().err


def test_bench_data_path_plays_one_rank_of_many(tmp_path):
    """Rank 0 of W against the real SeaweedFS: it fetches about 1/W of the epoch, in about 1/W of the GETs."""
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--skip", "bare", "engine", "pretrain", "--data-samples", "1024", "--block-samples", "8"]
    args += ["--data-world-size", "1,4,16", "--data-partitions", "16", "--json-out", str(out)]
    proc = run_cli(args)
    report = json.loads(out.read_text())
    sweep = report["data_sweep"]
    assert [r["world_size"] for r in sweep] == [1, 4, 16] and report["data"] == sweep[0]
    for r in sweep:
        w = r["world_size"]
        assert r["partitions"] == 16 and r["samples"] == 1024 // w
        assert 1 / w <= r["bytes_fetched"] / r["bytes_total"] <= 1.25 / w  # edge blocks shared by 2 partitions
        assert r["gets"] <= 1.25 * 128 / w and r["cpu_s_per_sample"] > 0
    assert "W=  16" in proc.stdout and "GETs" in proc.stdout


def test_bench_without_seaweedfs_uses_local_shards(tmp_path):
    """A package installed without the test extra has no `weed`: the bench says so in one line and measures the
    data path on local synthetic shards instead of stopping."""
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--skip", "bare", "engine", "pretrain", "--data-samples", "256", "--block-samples", "8"]
    proc = run_cli([*args, "--json-out", str(out)], env={"ELECTRA_WEED": str(tmp_path / "no-weed")})
    assert "SeaweedFS (`weed`) is not installed, so the synthetic shards are local files" in proc.stderr
    data = json.loads(out.read_text())["data"]
    assert not data["source"].startswith("s3://") and data["samples"] == 256 and data["gets"] == 32


def test_bench_ablation_alone_streams_rows_with_every_lever_named(tmp_path):
    """The check's ablation step: no other path (--skip), a compile row with the CPU's aot_eager backend, each
    row appended to --rows-out as it finishes, naming unpad, compile (and its backend) and the ZeRO stage."""
    rows_out = tmp_path / "rows.jsonl"
    args = ["bench", *TINY, "train.unpad=true", "train.compile_backend=aot_eager", "--steps", "2", "--warmup", "1"]
    args += ["--data-samples", "256", "--block-samples", "8", "--skip", "data", "bare", "engine", "pretrain"]
    args += ["--ablate", "train.compile=true", "--ablate", "train.deepspeed_config=ds_configs/zero0.json"]
    proc = run_cli([*args, "--rows-out", str(rows_out), "--json-out", str(tmp_path / "bench.json")])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"] == {}  # the skipped paths: not built
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert rows == report["ablation"] and len(rows) == 2
    compiled, zero0 = rows
    assert compiled["error"] is None and compiled["compile"] == "aot_eager" and compiled["unpad"] is True
    assert compiled["zero_stage"] == 2 and zero0["zero_stage"] == 0 and zero0["compile"] == "off"
    assert "caveat" not in zero0  # fp32: DeepSpeed's bf16/fp16 wrappers (and their host sync) are not in play
    assert all(r["step_time_s"] > 0 and r["micro_batch_size"] == 4 and r["first_window_s"] > 0 for r in rows)
    assert "ablation train.compile=true:" in proc.stdout


def test_bench_pretrain_writes_no_checkpoint_and_restores_signals(tmp_path, monkeypatch):
    """bench's pretrain path (each ablation row runs it in-process): no checkpoint at its last step (GBs at
    Large, per row), and the process's signal handlers as they were, so a SIGTERM still reaches bench."""
    import signal

    import torch.distributed as dist

    from electra_scale.infra import launch
    from electra_scale.tools.bench.data import synthetic_shards
    from electra_scale.tools.bench.paths import bench_pretrain

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(launch.free_port()))
    cfg = load_config("configs/tiny.yaml", ["train.micro_batch_size=4", "train.global_batch_size=4"])
    shards = synthetic_shards(str(tmp_path / "shards"), cfg.model.vocab_size, cfg.data.seq_len, 64)
    before = signal.getsignal(signal.SIGTERM)
    try:
        device = launch.init_distributed(launch.detect())
        result = bench_pretrain(cfg, shards, tmp_path / "work", device, steps=2, warmup=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert result.step_time_s > 0 and result.steps == 2
    assert signal.getsignal(signal.SIGTERM) is before
    run = tmp_path / "work" / "pretrain-run"
    assert (run / "metrics.jsonl").exists() and not list(run.glob("checkpoints/step_*"))


def test_the_gpu_checks_summary_keeps_what_a_killed_run_left(tmp_path):
    """scripts/gpu_summary.py runs after every step of the check: from a run killed mid-step (an ablation row cut
    mid-line, a pytest XML never written, a step that timed out) it still makes summary.json and summary.md with
    every finished figure, and exits 1 for the failed step."""
    import subprocess
    import sys

    (tmp_path / "steps.jsonl").write_text(
        '{"step": "gpu-varlen", "status": 0, "seconds": 50, "limit": 120}\n'
        '{"step": "ablation-small", "status": 124, "seconds": 150, "limit": 150}\n'
    )
    row = {"lever": "train.compile", "value": "true", "micro_batch_size": 128, "unpad": True, "compile": "inductor"}
    row.update(zero_stage=1, step_time_s=0.08, tokens_per_s=1e5, mfu=0.2, peak_memory_bytes=2**30, pad_frac=0.78)
    row.update(caveat="host sync per step", data_wait=0.01, first_window_s=41.0, error=None)
    (tmp_path / "ablation-small.jsonl").write_text(json.dumps(row) + '\n{"lever": "train.deepsp')
    (tmp_path / "pytest-varlen.xml").write_text('<testsuite><testcase name="test_x" time="1.5"/></testsuite>')
    (tmp_path / "pytest-rest.xml").write_text("<testsuite><testcase")  # killed while writing
    proc = subprocess.run([sys.executable, "scripts/gpu_summary.py", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    (kept,) = summary["ablation"]
    assert kept["shape"] == "small" and kept["compile"] == "inductor" and kept["zero_stage"] == 1
    assert summary["pytest"] == [{"test": "test_x", "outcome": "passed", "seconds": 1.5}]
    md = (tmp_path / "summary.md").read_text()
    assert "| small | 128 | 78% | compile = true | True | inductor | 1 (host sync) | 80.0 ms |" in md
    assert "| 1.00 GiB | 1.0% | 41.0 s |" in md  # the warm-up window: a compile row's compilation
    assert "| ablation-small | 124 | 150 | 150 |" in md
