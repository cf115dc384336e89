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
