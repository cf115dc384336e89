"""The comparison's report: one row per checkpoint, the paired verdict, markdown and the plot."""

from __future__ import annotations

from pathlib import Path

from electra_scale.tools.compare.spec import KINDS


def report_row(kind: str, step: int, flops: float, tokens: int, result: dict, health: dict) -> dict:
    split = result["report_split"]
    row = {"model": kind, "step": step, "flops": flops, "tokens": tokens, "split": split}
    for mode in ("finetune", "probe"):
        if mode in result:
            summ = result[mode]["summary"][split][result["main_metric"]]
            row[mode] = {"mean": summ["mean"], "std": summ["std"], "n": summ["n"]}
            row[f"{mode}_per_seed"] = [r[split][result["main_metric"]] for r in result[mode]["runs"]]
    row["disc_auc"] = health.get("auc")
    row["disc_recall"] = health.get("recall")
    row["flagged"] = bool(health.get("stuck"))
    return row


def held_out_scores(record: dict | None) -> dict | None:
    """What the table shows of a held-out evaluation at a row's step (``eval.*``): the MLM loss and accuracy on
    the eval set (ELECTRA's generator, or the MLM baseline itself) and ELECTRA's discriminator AUC. None when
    the run did not evaluate there."""
    if record is None:
        return None
    return {key: record.get(key) for key in ("gen_loss", "gen_acc", "disc_loss", "disc_auc")}


def majority(task, split: str) -> float | None:
    from electra_scale.eval.tasks import majority_baseline

    return majority_baseline(task, split)


def cost_ratio(runs: dict) -> dict:
    """ELECTRA's wall time per token over MLM's (from the runs' tokens/s) next to its FLOPs-per-token ratio."""
    e, m = runs.get("electra", {}), runs.get("mlm", {})
    out = {"flops_per_token": e["flops_per_token"] / m["flops_per_token"]}
    if e.get("tokens_per_s") and m.get("tokens_per_s"):
        out["wall_per_token"] = m["tokens_per_s"] / e["tokens_per_s"]
    return out


def _paired(a: list[float], b: list[float]) -> dict:
    from electra_scale.eval.finetune import mean_std

    return mean_std([x - y for x, y in zip(a, b)])


def verdict(report: dict) -> str:
    """Who wins at the full budget and by how much (paired over seeds: seed s used the same training subset and
    data order for every model), and what is flagged."""
    rows, lines = report["rows"], []
    for mode in ("finetune", "probe"):
        have = [r for r in rows if mode in r]
        last = {k: max((r for r in have if r["model"] == k), key=lambda r: r["step"], default=None) for k in KINDS}
        e, m = last["electra"], last["mlm"]
        if e is None or m is None:
            continue
        text = f"{mode}: at {e['flops']:.2e} FLOPs ELECTRA {_pct(e[mode])} vs MLM {_pct(m[mode])}" + "".join(
            f" vs random init {_pct(r[mode])}" for r in have if r["model"] == "random"
        )
        diff = _paired(e[f"{mode}_per_seed"], m[f"{mode}_per_seed"])
        text += f"; ELECTRA - MLM, paired over seeds: {100 * diff['mean']:+.1f} +- {100 * diff['std']:.1f} points"
        if diff["n"] > 1:
            sem = diff["std"] / diff["n"] ** 0.5
            call = "ELECTRA ahead" if diff["mean"] > 2 * sem else "MLM ahead" if diff["mean"] < -2 * sem else None
            text += f" ({call or 'no clear difference'} at 2 standard errors)"
        if e["flagged"]:
            text += "; FLAGGED: ELECTRA's discriminator showed little sign of learning (AUC ~0.5)"
            text += ", so this is not a fair test of ELECTRA"
        lines.append(text)
    return "\n".join(lines)


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"


def markdown(report: dict) -> str:
    metric, split = report["metric"], report["report_split"]
    modes = [m for m in ("finetune", "probe") if any(m in r for r in report["rows"])]
    head = "| model | step | pretrain FLOPs | tokens | " + " | ".join(f"{m} {split} {metric}" for m in modes)
    held_out = any(r.get("eval") for r in report["rows"])  # .get: a report made before evaluations
    head += " | disc AUC | disc recall |" + (" eval MLM loss | eval disc AUC |" if held_out else "") + " note |"
    lines = [
        f"# ELECTRA vs MLM at equal pretraining FLOPs: {report['task']}",
        "",
        f"Budget {report['budget_flops']:.3g} training FLOPs per objective. {report['flop_convention']}.",
        "Scores: mean +- sample std over fine-tuning seeds, in %"
        + (f"; majority class {100 * report['majority']:.1f}%." if report.get("majority") is not None else "."),
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in report["rows"]:
        cells = [r["model"], str(r["step"]), f"{r['flops']:.3g}", f"{r['tokens']:,}"]
        for m in modes:
            cells.append(f"{100 * r[m]['mean']:.1f} +- {100 * r[m]['std']:.1f}" if m in r else "")
        cells.append("" if r.get("disc_auc") is None else f"{r['disc_auc']:.3f}")  # .get: a report made before it
        cells.append("" if r["disc_recall"] is None else f"{r['disc_recall']:.3f}")
        if held_out:
            e = r.get("eval") or {}
            cells.append("" if e.get("gen_loss") is None else f"{e['gen_loss']:.3f}")
            cells.append("" if e.get("disc_auc") is None else f"{e['disc_auc']:.3f}")
        cells.append("FLAGGED: disc AUC ~0.5" if r["flagged"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    runs, cost = report["runs"], report["cost_ratio"]
    lines += ["", "| run | steps | FLOPs/token | tokens/s | wall time |", "|---|---|---|---|---|"]
    for kind, info in runs.items():
        tps = f"{info['tokens_per_s']:,.0f}" if info.get("tokens_per_s") else "?"
        lines.append(f"| {kind} | {info['steps']} | {info['flops_per_token']:.3g} | {tps} | {info['wall_s']:.0f} s |")
    lines += [
        "",
        f"ELECTRA / MLM cost per token: {cost['flops_per_token']:.2f}x by FLOPs"
        + (f", {cost['wall_per_token']:.2f}x by wall time." if "wall_per_token" in cost else "."),
        "",
        report["verdict"],
        "",
    ]
    return "\n".join(lines)


def plot_compare(report: dict, work: Path) -> list[Path]:
    """compare.png (score vs pretraining FLOPs, one panel per mode) and the runs' curves under curves/."""
    from matplotlib.figure import Figure

    rows = report["rows"]
    modes = [m for m in ("finetune", "probe") if any(m in r for r in rows)]
    fig = Figure(figsize=(6.0 * len(modes), 4.2), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    colors = {"electra": "tab:blue", "mlm": "tab:orange", "random": "tab:gray"}
    for ax, mode in zip(axes, modes):
        random = next((r for r in rows if r["model"] == "random" and mode in r), None)
        for kind in KINDS:
            pts = sorted((r for r in rows if r["model"] == kind and mode in r), key=lambda r: r["flops"])
            if random is not None:
                pts = [random, *pts]  # every curve starts from the untrained encoder at 0 FLOPs
            xs = [r["flops"] for r in pts]
            ax.errorbar(
                xs,
                [100 * r[mode]["mean"] for r in pts],
                yerr=[100 * r[mode]["std"] for r in pts],
                label=kind.upper(),
                color=colors[kind],
                marker="o",
                capsize=3,
            )
            bad = [r for r in pts if r["flagged"]]
            if bad:
                ax.scatter(
                    [r["flops"] for r in bad],
                    [100 * r[mode]["mean"] for r in bad],
                    marker="x",
                    s=90,
                    color="red",
                    zorder=5,
                    label="flagged: disc AUC ~0.5",
                )
        if report.get("majority") is not None:
            ax.axhline(100 * report["majority"], color="black", linestyle=":", linewidth=1, label="majority class")
        ax.set_xlabel("pretraining FLOPs")
        ax.set_ylabel(f"{report['report_split']} {report['metric']} (%)")
        ax.set_title(f"{report['task']}: {mode} ({rows[0][mode]['n'] if mode in rows[0] else ''} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("ELECTRA vs MLM at equal pretraining compute")
    path = work / "compare.png"
    fig.savefig(path, dpi=110)
    written = [path]
    try:
        from electra_scale.tools.plot import plot_runs
    except ImportError:  # the plot command is optional for compare: the table and compare.png stand alone
        return written
    run_dirs = [str(work / "runs" / k) for k in KINDS if (work / "runs" / k / "metrics.jsonl").exists()]
    written += plot_runs(run_dirs, str(work / "curves"), labels=[Path(d).name for d in run_dirs])
    return written
