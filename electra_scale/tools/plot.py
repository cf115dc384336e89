"""``electra-scale plot RUN_DIR [RUN_DIR...]``: PNG curves from runs' ``metrics.jsonl``, several runs overlaid.

Figures (one PNG each, x = optimizer step):

    loss.png                    total, generator (MLM) and discriminator loss
    accuracy.png                generator MLM accuracy and discriminator accuracy
    disc_precision_recall.png   discriminator AUC (the reference's metric), precision and recall on replaced tokens
    throughput.png              tokens/s (and MFU when the run knew its device's peak)
    lr.png                      learning rate

A run's held-out evaluations (``eval.*``: records with ``"split": "eval"``) are drawn on the same panels, in
the run's colour, dashed with square markers and labelled "(eval)".

A run dir is a local path or ``s3://`` prefix (the run's ``run.output_dir``), or the ``metrics.jsonl`` itself.
MLM runs have no discriminator: its panels show the ELECTRA runs only, and a figure no run has data for is
not drawn. Drawn with matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the
caller's matplotlib state alone.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.engine.metrics import of_split, read_metrics
from electra_scale.infra import storage

# figure file stem -> (title, [(metric key, panel title)])
FIGURES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "loss": (
        "Loss",
        [("loss", "total loss"), ("gen_loss", "generator (MLM) loss"), ("disc_loss", "discriminator loss")],
    ),
    "accuracy": (
        "Accuracy",
        [("gen_acc", "generator MLM accuracy"), ("disc_acc", "discriminator accuracy")],
    ),
    "disc_precision_recall": (
        "Discriminator on replaced tokens",
        [("disc_auc", "AUC (0.5 = chance)"), ("disc_precision", "precision"), ("disc_recall", "recall")],
    ),
    "throughput": ("Throughput", [("tokens_per_s", "tokens/s"), ("mfu", "MFU")]),
    "lr": ("Learning rate", [("lr", "learning rate")]),
}


def metrics_url(run_dir: str) -> str:
    return run_dir if run_dir.endswith(".jsonl") else storage.join(run_dir, "metrics.jsonl")


def load_metrics(run_dir: str) -> list[dict]:
    """A run's records, sorted by step. A missing or empty file is a ConfigError naming the path."""
    url = metrics_url(run_dir)
    if not storage.exists(url):
        raise ConfigError(f"no metrics at {url}: pass a run's output dir (its run.output_dir) or a metrics.jsonl")
    records = read_metrics(url)
    if not records:
        raise ConfigError(f"{url} has no records yet: the run logs every train.log_every steps")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(rec["step"])
            ys.append(float(value))
    return xs, ys


def default_labels(run_dirs: list[str]) -> list[str]:
    """The shortest path tails that tell the runs apart (``a/run`` and ``b/run`` -> ``a/run``, ``b/run``)."""
    parts = [metrics_url(d).rstrip("/").split("/")[:-1] or [d] for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i})" for i, label in enumerate(labels)]


def plot_runs(run_dirs: list[str], outdir: str, labels: list[str] | None = None) -> list[Path]:
    """Draw the figures for one or more runs into the local dir ``outdir``; returns the PNGs written."""
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ConfigError("plot needs at least one run dir")
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run")
    if storage.is_s3(outdir):
        raise ConfigError(f"plot writes PNGs to a local dir, not {outdir}; pass e.g. --out plots")
    runs = [load_metrics(d) for d in run_dirs]
    labels = labels or default_labels(run_dirs)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, panels) in FIGURES.items():
        # Keep the panels some run has data for (no disc_* for MLM, no MFU on CPU).
        panels = [p for p in panels if any(_series(records, p[0])[0] for records in runs)]
        if not panels:
            continue
        fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, panel_title) in zip(axes, panels):
            for n, (records, label) in enumerate(zip(runs, labels)):
                color = f"C{n % 10}"  # a run's training and eval curves share its colour
                xs, ys = _series(of_split(records), key)
                if xs:
                    ax.plot(xs, ys, label=label, color=color, linewidth=1.4, marker="o" if len(xs) < 12 else None,
                            markersize=3)  # fmt: skip
                xs, ys = _series(of_split(records, "eval"), key)
                if xs:
                    ax.plot(xs, ys, label=f"{label} (eval)", color=color, linestyle="--", marker="s", markersize=4)
            ax.set_title(panel_title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(title)
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output dir (local or s3://) or metrics.jsonl")
    p.add_argument("--out", help="local dir for the PNGs (default: RUN_DIR/plots for one local run, else ./plots)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: the dir names)")


def run(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        single_local = len(args.run_dirs) == 1 and not storage.is_s3(args.run_dirs[0])
        out = str(Path(args.run_dirs[0], "plots")) if single_local and Path(args.run_dirs[0]).is_dir() else "plots"
    for path in plot_runs(args.run_dirs, out, args.labels):
        print(path)
    return 0
