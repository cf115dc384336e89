"""``electra-scale plot``: PNGs from a real run's metrics.jsonl on S3, overlaid with another run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from electra_scale import cli
from electra_scale.engine.objective import summarize
from electra_scale.tools.plot import FIGURES, plot_runs
from tests.cli import run_cli
from tests.test_train import pretrain_args

ALL = {f"{stem}.png" for stem in FIGURES}


def assert_valid_png(path: Path) -> np.ndarray:
    """A readable PNG with a real picture: several colours, and a few percent of the pixels not background."""
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    assert (pixels.min(axis=-1) < 200).mean() > 0.01
    return pixels


def mlm_run(directory: Path, steps: int = 5) -> str:
    """An MLM run's metrics.jsonl, its records built by the objective's own summarize() as train.py does."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        sums = {"gen_loss": 100.0 * (9 - step), "gen_correct": 2.0 * step, "n_masked": 100.0, "n_tokens": 700.0}
        record = summarize(sums, 50.0) | {"lr": 1e-3 * step / steps, "tokens_per_s": 900.0 + step, "mfu": None}
        lines.append(json.dumps({"step": step, **record}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return str(directory)


def test_plot_a_real_run_on_s3_and_overlay_a_second(shards, s3_bucket, tmp_path):
    run = f"{s3_bucket}/electra"
    run_cli(pretrain_args(shards, run, "train.max_steps=4", "checkpoint.every_steps=100"))

    one = plot_runs([run], str(tmp_path / "one"))
    assert {p.name for p in one} == ALL  # ELECTRA has every figure
    single = {p.name: assert_valid_png(p) for p in one}
    # The discriminator's figure has its three panels, AUC among them: 5 inches each at 100 dpi.
    assert single["disc_precision_recall.png"].shape[1] == 3 * 500

    mlm = mlm_run(tmp_path / "mlm")
    two = plot_runs([run, mlm], str(tmp_path / "two"), labels=["ELECTRA (S3)", "MLM (local)"])
    assert {p.name for p in two} == ALL
    for path in two:
        overlaid = assert_valid_png(path)
        assert overlaid.shape != single[path.name].shape or (overlaid != single[path.name]).any()


def test_mlm_runs_have_no_discriminator_figure(tmp_path):
    written = plot_runs([mlm_run(tmp_path / "a"), mlm_run(tmp_path / "b", steps=8)], str(tmp_path / "out"))
    assert {p.name for p in written} == ALL - {"disc_precision_recall.png"}
    for path in written:
        assert_valid_png(path)


def test_eval_records_are_drawn_on_the_same_panels(tmp_path):
    """A run's held-out evaluations ("split": "eval") join the panels of the metrics they have (loss, accuracy),
    and leave the others as they were: they are not mixed into the training curves."""
    plain = mlm_run(tmp_path / "plain")
    evaluated = mlm_run(tmp_path / "evaluated")
    with open(Path(evaluated, "metrics.jsonl"), "a") as f:
        for step in (2, 4):
            sums = {"gen_loss": 120.0 * (9 - step), "gen_correct": 1.5 * step, "n_masked": 100.0, "n_tokens": 700.0}
            f.write(json.dumps({"step": step, "split": "eval", **summarize(sums, 50.0), "examples": 64}) + "\n")
    without = {p.name: assert_valid_png(p) for p in plot_runs([plain], str(tmp_path / "a"), labels=["run"])}
    with_eval = {p.name: assert_valid_png(p) for p in plot_runs([evaluated], str(tmp_path / "b"), labels=["run"])}
    for name in ("loss.png", "accuracy.png"):
        assert (with_eval[name] != without[name]).any(), name
    for name in ("throughput.png", "lr.png"):
        assert (with_eval[name] == without[name]).all(), name


def test_plot_cli(tmp_path, capsys):
    run = mlm_run(tmp_path / "run")
    proc = run_cli(["plot", run])
    written = proc.stdout.split()
    assert written and all(Path(p).parent == Path(run, "plots") for p in written)
    for p in written:
        assert_valid_png(Path(p))

    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no metrics at" in err and "run.output_dir" in err
    assert cli.main(["plot", run, run, "--labels", "only-one", "--out", str(tmp_path / "x")]) == 2
    assert "1 labels for 2 runs" in capsys.readouterr().err
