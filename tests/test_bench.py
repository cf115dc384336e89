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
    """The check's ablation step: no other path (--skip), a compile row with the CPU's aot_eager backend (and a
    micro-batch of its own: a row of two keys), a row that diverges, each row appended to --rows-out as it
    finishes after a "started" line, naming unpad, compile (and its backend) and the ZeRO stage."""
    rows_out = tmp_path / "rows.jsonl"
    args = ["bench", *TINY, "train.unpad=true", "train.compile_backend=aot_eager", "--steps", "2", "--warmup", "1"]
    args += ["--data-samples", "256", "--block-samples", "8", "--skip", "data", "bare", "engine", "pretrain"]
    ablate = ["train.compile=true train.micro_batch_size=8", "optim.lr=1e30 optim.warmup_steps=1"]
    ablate += ["train.deepspeed_config=ds_configs/zero0.json"]
    args += [arg for row in ablate for arg in ("--ablate", row)]
    proc = run_cli([*args, "--rows-out", str(rows_out), "--json-out", str(tmp_path / "bench.json")])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"] == {} and "cut" not in report  # the skipped paths: not built
    lines = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert [r.get("status") for r in lines] == ["started", None] * 3  # each row announced, then its figures
    rows = lines[1::2]
    assert rows == report["ablation"] and [r["index"] for r in rows] == [0, 1, 2]
    compiled, diverged, zero0 = rows
    assert compiled["error"] is None and compiled["compile"] == "aot_eager" and compiled["unpad"] is True
    assert compiled["zero_stage"] == 2 and zero0["zero_stage"] == 0 and zero0["compile"] == "off"
    assert "caveat" not in zero0  # fp32: DeepSpeed's bf16/fp16 wrappers (and their host sync) are not in play
    assert all(r["step_time_s"] > 0 and r["first_window_s"] > 0 for r in rows[::2])
    assert compiled["micro_batch_size"] == 8 and zero0["micro_batch_size"] == 4  # the row's own micro-batch
    # A non-finite loss is that row's outcome (Diverged is a ConfigError to the CLI), and the next row still runs.
    assert diverged["diverged"] is True and "training diverged at step" in diverged["error"]
    assert (
        diverged["lever"] == "optim.lr+optim.warmup_steps"
        and diverged["setting"] == "optim.lr=1e30 optim.warmup_steps=1"
    )
    assert "ablation train.compile=true train.micro_batch_size=8:" in proc.stdout
    assert "optim.warmup_steps=1: diverged:" in proc.stdout


def test_sigterm_cuts_the_row_in_progress_and_starts_no_other(tmp_path):
    """The GPU check's time limit (timeout's SIGTERM to bench alone): the ablation row in progress stops after its
    step and is marked cut, not appended as a normal row; no later row starts; the JSON says so; exit 75."""
    import signal
    import subprocess
    import sys
    import time

    from electra_scale.tools.bench.data import synthetic_shards

    cfg = load_config("configs/tiny.yaml")
    shards = synthetic_shards(str(tmp_path / "shards"), cfg.model.vocab_size, cfg.data.seq_len, 256, 8)
    rows_out, json_out = tmp_path / "rows.jsonl", tmp_path / "bench.json"
    args = [*TINY, "--data", shards, "--skip", "data", "bare", "engine", "pretrain", "--steps", "400"]
    args += ["--warmup", "1", "--ablate", "train.unpad=true,false", "--rows-out", str(rows_out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "electra_scale", "bench", *args, "--json-out", str(json_out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while '"status": "started"' not in (rows_out.read_text() if rows_out.exists() else ""):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]
    started, cut = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert started["status"] == "started" and cut["index"] == 0 and cut["cut"] is True and cut["error"] is None
    assert cut.get("steps", 0) < 400  # a cut row: never read as a normal one
    report = json.loads(json_out.read_text())
    assert report["cut"] == "ablation" and report["ablation"] == [cut] and report["running"] is None
    assert "cut by SIGTERM during ablation" in out


def test_the_gpu_checks_micro_batches_follow_the_devices_memory():
    """128 fit ELECTRA-Large on an H200 (141 GB); an 80 GB H100 gets 64; the padding-free row at equal real tokens
    has 4x the examples at 78% padding; and the --ablate forms: a row per value, or one row of several keys."""
    from electra_scale.tools.bench.device import large_micro_batches
    from electra_scale.tools.bench.run import _lever

    assert large_micro_batches(143_771_254_784) == (128, 64, 256)  # H200, as torch reports it
    assert large_micro_batches(85_029_158_912) == (64, 64, 256)  # H100 80 GB
    assert large_micro_batches(42_298_834_944) == (32, 32, 128)  # A100 40 GB
    assert _lever("train.unpad=false,true") == [(("train.unpad", "false"),), (("train.unpad", "true"),)]
    assert _lever("train.compile=true train.micro_batch_size=256") == [
        (("train.compile", "true"), ("train.micro_batch_size", "256"))
    ]


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
    mid-line, a row started and never finished, a test started and never finished, a pytest XML never written, a
    step that timed out) it still makes summary.json and summary.md with every finished figure, the headline
    first, cut and diverged rows as such, and exits 1 for the failed step (not for the dry run's expected ones)."""
    import subprocess
    import sys

    (tmp_path / "steps.jsonl").write_text(
        '{"step": "gpu-varlen", "status": 0, "seconds": 50, "limit": 120}\n'
        '{"step": "out-dir", "status": 0, "note": "an earlier run\'s 2 files moved to previous-x/"}\n'
        '{"step": "fused-adam-build", "status": 124, "seconds": 3, "limit": 3, "expected": true}\n'
        '{"step": "ablation-small", "status": 124, "seconds": 150, "limit": 150}\n'
    )
    row = {"lever": "train.compile", "value": "true", "micro_batch_size": 128, "unpad": True, "compile": "inductor"}
    row.update(zero_stage=1, step_time_s=0.08, tokens_per_s=1e5, mfu=0.2, peak_memory_bytes=2**30, pad_frac=0.78)
    row.update(caveat="host sync per step", data_wait=0.01, first_window_s=41.0, error=None, index=0)
    row.update(setting="compile=true")
    diverged = {"index": 1, "lever": "optim.lr", "value": "1e30", "setting": "optim.lr=1e30", "micro_batch_size": 128}
    diverged.update(diverged=True, error="Diverged: training diverged at step 2")
    started = {"index": 2, "lever": "train.unpad", "value": "false", "micro_batch_size": 128, "status": "started"}
    lines = [{**row, "status": "started"}, row, diverged, started]
    (tmp_path / "ablation-small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"lever": "t')
    large = {**row, "lever": "train.compile+train.micro_batch_size", "value": "true+256", "micro_batch_size": 256}
    large.update(setting="compile=true micro_batch_size=256", mfu=0.42, zero_stage=2, caveat=None)
    (tmp_path / "ablation-large.jsonl").write_text(json.dumps(large) + "\n")
    bench = {"micro_batch_size": 256, "seq_len": 512, "peak_tflops": 989, "running": "pretrain"}
    bench.update(overrides=["train.unpad=true", "train.compile=true"], overhead={}, pad_frac=0.78)
    bench["results"] = {"bare": {"step_time_s": 0.5, "tokens_per_s": 6e4, "mfu": 0.45, "peak_memory_bytes": 2**34}}
    (tmp_path / "bench-large-unpad-compile.json").write_text(json.dumps(bench))
    (tmp_path / "pytest-varlen.jsonl").write_text(
        '{"test": "test_x", "outcome": "started"}\n{"test": "test_x", "outcome": "passed", "seconds": 1.5}\n'
        '{"test": "test_compiled", "outcome": "started"}\n'
    )
    (tmp_path / "pytest-varlen.xml").write_text('<testsuite><testcase name="test_old" time="1"/></testsuite>')
    (tmp_path / "pytest-rest.xml").write_text("<testsuite><testcase")  # killed while writing
    proc = subprocess.run([sys.executable, "scripts/gpu_summary.py", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    kept, div, cut = [r for r in summary["ablation"] if r["shape"] == "small"]
    assert kept["compile"] == "inductor" and kept["zero_stage"] == 1 and not kept["cut"]
    assert div["diverged"] and cut["cut"] and cut["step_time_s"] is None
    assert summary["pytest"] == [
        {"test": "test_x", "outcome": "passed", "seconds": 1.5},
        {"test": "test_compiled", "outcome": "cut", "seconds": 0.0},  # the one the limit cut; the XML is older
    ]
    assert summary["bench"]["large-unpad-compile"]["paths"]["pretrain"] == {"cut": True, "error": None}
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Headline") < md.index("| step | status |")
    assert "- Large, padding-free, compiled (inductor), micro-batch 256: MFU 42.0%" in md
    assert "pretrain MFU -, bare loop 45.0%; pretrain / bare - (goals: MFU >= 40%, ratio <= 1.10)" in md
    assert "| small | 128 | 78% | compile=true | True | inductor | 1 (host sync) | 80.0 ms |" in md
    assert "| 1.00 GiB | 1.0% | 41.0 s |" in md  # the warm-up window: a compile row's compilation
    assert "| optim.lr=1e30 | None | None | None | diverged: Diverged: training diverged at step 2 |" in md
    assert "| unpad=false | None | None | None | cut: no timed steps |" in md
    assert "| ablation-small | 124 (cut at its limit) | 150 | 150 |  |" in md
    assert "| fused-adam-build | 124 (cut at its limit), as the dry run means it | 3 | 3 |  |" in md
    assert "moved to previous-x/ |" in md
    assert "| large-unpad-compile | 256 | pretrain | cut: no timed steps |" in md
    assert "large-unpad-compile: cut by SIGTERM during pretrain" in md
