"""The comparison's report: one row per checkpoint and few-label size K, the paired differences (eval/stats.py:
ELECTRA - random init, MLM - random init, ELECTRA - MLM at every point, paired over seeds that drew the same
labelled examples), markdown and the plot of those differences against pretraining FLOPs."""

from __future__ import annotations

from pathlib import Path

from electra_scale.eval import stats
from electra_scale.eval.stats import fmt_mean_se, one_class_seeds, paired
from electra_scale.tools.compare.spec import KINDS

MODES = ("finetune", "probe")
NAMES = {"electra": "ELECTRA", "mlm": "MLM", "random": "random init"}


def report_row(kind: str, step: int, flops: float, tokens: int, result: dict, health: dict) -> dict:
    split = result["report_split"]
    row = {"model": kind, "step": step, "flops": flops, "tokens": tokens, "split": split}
    for mode in MODES:
        if mode in result:
            summ = result[mode]["summary"][split][result["main_metric"]]
            row[mode] = {"mean": summ["mean"], "std": summ["std"], "n": summ["n"]}
            row[f"{mode}_per_seed"] = [r[split][result["main_metric"]] for r in result[mode]["runs"]]
            row[f"{mode}_one_class"] = one_class_seeds(result[mode]["runs"])
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


def _at(rows: list[dict], kind: str, point: int, k) -> dict | None:
    return next((r for r in rows if r["model"] == kind and r.get("point") == point and r.get("per_class") == k), None)


def paired_rows(report: dict) -> list[dict]:
    """At every point and K, per mode: ELECTRA - random init, MLM - random init, ELECTRA - MLM, each a paired
    mean with its SE (points of the metric), over the seeds (every model drew the same examples at a seed)."""
    rows, out = report["rows"], []
    points = sorted({r["point"] for r in rows if r.get("point")})
    for k in report.get("per_class") or [None]:
        for point in points:
            at = {kind: _at(rows, kind, point, k) for kind in KINDS}
            at["random"] = _at(rows, "random", 0, k)
            for mode in MODES:
                have = {kind: r for kind, r in at.items() if r is not None and mode in r}
                entry = {"per_class": k, "point": point, "mode": mode}
                entry["flops"] = {kind: r["flops"] for kind, r in have.items()}
                for a, b in (("electra", "random"), ("mlm", "random"), ("electra", "mlm")):
                    if a in have and b in have:
                        entry[f"{a}-{b}"] = paired(have[a][f"{mode}_per_seed"], have[b][f"{mode}_per_seed"]).to_dict()
                if len(entry) > 4:
                    out.append(entry)
    return out


def _pair_text(d: dict | None) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.1f}" + ("" if d["se"] is None else f" ± {d['se']:.1f}")


def verdict(report: dict) -> str:
    """At the last point, per K and mode: each objective against random init and ELECTRA against MLM, in words,
    and what is flagged."""
    pairs = paired_rows(report)
    last = max((p["point"] for p in pairs), default=None)
    lines = []
    for p in (p for p in pairs if p["point"] == last):
        k = "" if p["per_class"] is None else f"K={p['per_class']} "
        head = f"{k}{p['mode']} at {p['flops'].get('electra', p['flops'].get('mlm', 0)):.2e} FLOPs: "
        words = []
        for key, a, b in (("electra-random", "ELECTRA", "random init"), ("mlm-random", "MLM", "random init"),
                          ("electra-mlm", "ELECTRA", "MLM")):  # fmt: skip
            if key in p:
                d = p[key]
                words.append(stats.verdict(stats.Paired(d["mean"], d["se"], d["n"], tuple(d["diffs"])), a, b))
        text = head + "; ".join(words)
        electra = _at(report["rows"], "electra", last, p["per_class"])
        if electra is not None and electra["flagged"]:
            text += "; FLAGGED: ELECTRA's discriminator showed little sign of learning (AUC ~0.5), so this is not a "
            text += "fair test of ELECTRA"
        lines.append(text)
    return "\n".join(lines)


def _cell(r: dict, mode: str) -> str:
    if mode not in r:
        return ""
    return fmt_mean_se(r[f"{mode}_per_seed"]) if r.get(f"{mode}_per_seed") else f"{100 * r[mode]['mean']:.1f}"


def markdown(report: dict) -> str:
    metric, split = report["metric"], report["report_split"]
    rows = report["rows"]
    modes = [m for m in MODES if any(m in r for r in rows)]
    held_out = any(r.get("eval") for r in rows)  # .get: a report made before evaluations
    head = "| model | step | pretrain FLOPs | tokens | " + " | ".join(f"{m} {split} {metric}" for m in modes)
    head += " | one-class seeds | disc AUC | disc recall |"
    head += (" eval MLM loss | eval disc AUC |" if held_out else "") + " note |"
    seeds = max((len(r.get(f"{m}_per_seed") or []) for r in rows for m in modes), default=0)
    lines = [
        f"# ELECTRA vs MLM at equal pretraining FLOPs: {report['task']}",
        "",
        f"Budget {report['budget_flops']:.3g} training FLOPs per objective. {report['flop_convention']}.",
        f"Scores: {split} {metric} in points, mean ± standard error over {seeds} seeds; at a seed every model learns "
        "from the same labelled examples, so differences are paired by seed (mean ± paired SE; 'no measurable "
        "difference' below 2 SE). One-class seeds: seeds at which a model predicts a single class.",
    ]
    refs = report.get("references") or {}
    for k in report.get("per_class") or [None]:
        at_k = [r for r in rows if r.get("per_class") == k]
        lines += ["", f"## {'all labelled examples' if k is None else f'K = {k} labelled examples per class'}", ""]
        ref = refs.get(str(k))
        if ref is not None:
            text = f"Reference lines: majority class {100 * ref['majority']:.1f}" if ref.get("majority") else ""
            if ref.get("bow_per_seed"):
                text += f"; bag-of-words logistic regression {fmt_mean_se(ref['bow_per_seed'])} (the same labels)"
            lines += [text.lstrip("; ") + ".", ""]
        elif report.get("majority") is not None:
            lines += [f"Majority class {100 * report['majority']:.1f}.", ""]
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in at_k:
            cells = [r["model"], str(r["step"]), f"{r['flops']:.3g}", f"{r['tokens']:,}"]
            cells += [_cell(r, m) for m in modes]
            cells.append(", ".join(f"{m} {r[f'{m}_one_class']}" for m in modes if r.get(f"{m}_one_class")))
            cells.append("" if r.get("disc_auc") is None else f"{r['disc_auc']:.3f}")  # .get: a report made before it
            cells.append("" if r["disc_recall"] is None else f"{r['disc_recall']:.3f}")
            if held_out:
                e = r.get("eval") or {}
                cells.append("" if e.get("gen_loss") is None else f"{e['gen_loss']:.3f}")
                cells.append("" if e.get("disc_auc") is None else f"{e['disc_auc']:.3f}")
            cells.append("FLAGGED: disc AUC ~0.5" if r["flagged"] else "")
            lines.append("| " + " | ".join(cells) + " |")
        pairs = [p for p in paired_rows(report) if p["per_class"] == k]
        if pairs:
            lines += [
                "",
                "| point | mode | ELECTRA − random init | MLM − random init | ELECTRA − MLM |",
                "|---|---|---|---|---|",
            ]
            for p in pairs:
                cells = [str(p["point"]), p["mode"]] + [
                    _pair_text(p.get(key)) for key in ("electra-random", "mlm-random", "electra-mlm")
                ]
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
    """compare.png: each objective's score minus random init's (paired over seeds, ± paired SE) against
    pretraining FLOPs, random init at 0; one row of panels per mode, one column per K. Without a random-init
    row, the scores themselves (± SE). The runs' curves go under curves/."""
    from matplotlib.figure import Figure

    rows = report["rows"]
    modes = [m for m in MODES if any(m in r for r in rows)]
    sizes = report.get("per_class") or [None]
    fig = Figure(figsize=(5.5 * len(sizes), 4.0 * len(modes)), layout="constrained")
    grid = fig.subplots(len(modes), len(sizes), squeeze=False)
    colors = {"electra": "tab:blue", "mlm": "tab:orange"}
    for i, mode in enumerate(modes):
        for j, k in enumerate(sizes):
            ax = grid[i][j]
            random = next((r for r in rows if r["model"] == "random" and r.get("per_class") == k and mode in r), None)
            for kind in KINDS:
                pts = sorted(
                    (r for r in rows if r["model"] == kind and r.get("per_class") == k and mode in r),
                    key=lambda r: r["flops"],
                )
                if not pts:
                    continue
                if random is not None:
                    diffs = [paired(r[f"{mode}_per_seed"], random[f"{mode}_per_seed"]) for r in pts]
                    ys, errs = [0.0, *(d.mean for d in diffs)], [0.0, *(d.se or 0.0 for d in diffs)]
                    xs = [0.0, *(r["flops"] for r in pts)]  # random init: 0 FLOPs, 0 difference
                else:
                    from electra_scale.eval.stats import mean_se

                    stats_ = [mean_se(r[f"{mode}_per_seed"]) for r in pts]
                    xs, ys, errs = [r["flops"] for r in pts], [m for m, _ in stats_], [se or 0.0 for _, se in stats_]
                ax.errorbar(xs, ys, yerr=errs, label=NAMES[kind], color=colors[kind], marker="o", capsize=3)
                bad = [(x, y) for x, y, r in zip(xs[-len(pts) :], ys[-len(pts) :], pts) if r["flagged"]]
                if bad:
                    ax.scatter(*zip(*bad), marker="x", s=90, color="red", zorder=5, label="flagged: disc AUC ~0.5")
            if random is not None:
                ax.axhline(0.0, color="tab:gray", linewidth=1, label="random init")
            ax.set_xlabel("pretraining FLOPs")
            what = f"{report['report_split']} {report['metric']}"
            ax.set_ylabel(f"{what} − random init (points, ± paired SE)" if random is not None else f"{what} (points)")
            seeds = len(next((r[f"{mode}_per_seed"] for r in rows if mode in r), []))
            ax.set_title(
                f"{report['task']}: {mode}" + ("" if k is None else f", K={k} per class") + f" ({seeds} seeds)"
            )
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
