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

Discriminator health: an ELECTRA checkpoint whose discriminator shows no sign of learning over the last quarter
of the logged steps up to it (best AUC below ``health.min_auc``; for logs without AUC, a loss never below the base
rate: the rule of pretraining's own warning) is flagged (``disc AUC ~0.5``) in the table and the plot, and the
verdict says so instead of scoring it silently.

Re-running the same command reuses what is done: the shards, finished runs (``pretrain`` resumes or says
"nothing to do"), exports, and fine-tuning results whose settings have not changed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from electra_scale.engine.metrics import of_split, read_metrics
from electra_scale.tools.compare.plan import (
    disc_health,
    evaluate,
    load_compare_task,
    prepare_data,
    pretrain_run,
    references,
    throughput,
)
from electra_scale.tools.compare.report import (
    cost_ratio,
    held_out_scores,
    majority,
    markdown,
    plot_compare,
    report_row,
    verdict,
)
from electra_scale.tools.compare.spec import KINDS, CompareError, CompareSpec, load_spec, run_config

log = logging.getLogger("electra_scale")


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
    task = load_compare_task(spec, cache_dir, work)
    tokenizer = load_tokenizer_for(ModelSource("shards", None, shards, lowercase=manifest.lowercase))

    runs: dict[str, dict] = {}
    rows: list[dict] = []
    for kind in KINDS:
        run_dir = work / "runs" / kind
        cfg = run_config(spec, kind, shards, str(run_dir), manifest.vocab_size)
        fpt = flops_per_token(cfg)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        info = pretrain_run(spec, cfg, run_dir)
        logged = read_metrics(str(run_dir / "metrics.jsonl"))
        records, evaluations = of_split(logged), {r["step"]: r for r in of_split(logged, "eval")}
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
            health = disc_health(records, step, spec.health.min_auc) if kind == "electra" else {}
            if health.get("stuck"):
                best_auc = health["auc_tail_max"]
                log.warning(
                    "compare: %s at step %d: the discriminator shows little sign of learning (best AUC %s over the "
                    "last quarter of its logs, flagged below %.2f; best loss margin below the base rate %.4f). "
                    "Flagged, not a fair score. Levers: optim.lr, the generator curriculum, "
                    "objective.embedding_sharing=gdes, more steps (docs/compare.md measures them).",
                    kind,
                    step,
                    "n/a" if best_auc is None else f"{best_auc:.3f}",
                    spec.health.min_auc,
                    health["margin_tail_max"],
                )
            for per_class in spec.finetune.sizes:
                result = evaluate(
                    spec, source, task, tokenizer, results_path(work, f"{kind}_{tag}", per_class), per_class
                )
                row = report_row(kind, step, fpt * tokens_per_step * step, step * tokens_per_step, result, health)
                rows.append(row | {"point": k, "per_class": per_class, "eval": held_out_scores(evaluations.get(step))})

    if spec.include_random:
        cfg = run_config(spec, "electra", shards, str(work / "runs" / "electra"), manifest.vocab_size)
        source = ModelSource("random init", None, shards, config=cfg, lowercase=manifest.lowercase)
        for i, per_class in enumerate(spec.finetune.sizes):
            result = evaluate(spec, source, task, tokenizer, results_path(work, "random", per_class), per_class)
            rows.insert(i, report_row("random", 0, 0.0, 0, result, {}) | {"point": 0, "per_class": per_class})
    refs = {str(k): references(spec, task, results_path(work, "references", k), k) for k in spec.finetune.sizes}

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
        "majority": majority(task, rows[0]["split"]),
        "references": refs,  # per K: majority class, bag-of-words per seed
        "per_class": spec.finetune.sizes,
        "cost_ratio": cost_ratio(runs),
        "spec": asdict(spec),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report["verdict"] = verdict(report)
    (work / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "compare.md").write_text(markdown(report))
    report["plots"] = [str(p) for p in plot_compare(report, work)]
    (work / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def results_path(work: Path, name: str, per_class: int | None) -> Path:
    """Where one model's (or the references') results at one K are cached."""
    return work / "finetune" / (f"{name}.json" if per_class is None else f"{name}_k{per_class}.json")


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
