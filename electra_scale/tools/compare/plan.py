"""The steps of a comparison: the shards, the pretraining runs as subprocesses of the real CLI, their health,
and the downstream scores of their checkpoints."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.tools.compare.spec import CompareError, CompareSpec

log = logging.getLogger("electra_scale")


def prepare_data(spec: CompareSpec, work: Path) -> str:
    if spec.corpus.shards:
        return spec.corpus.shards
    from electra_scale.data.prepare import prepare
    from electra_scale.infra import storage

    out = str(work / "shards")
    if storage.exists(storage.join(out, "manifest.json")):
        if spec.corpus.eval_fraction > 0 and not storage.exists(storage.join(out, "eval", "manifest.json")):
            raise ConfigError(
                f"{out} was prepared without held-out documents, and corpus.eval_fraction asks for them: use a new "
                "--workdir, or delete its shards/ to prepare them again"
            )
        return out
    inputs = []
    for item in spec.corpus.inputs:
        if item == "wiki":
            from electra_scale.data.wiki import fetch_corpus

            inputs.append(str(fetch_corpus(work)))
        else:
            inputs.append(item)
    log.info("compare: preparing shards from %s", ", ".join(inputs))
    prepare(
        inputs,
        out,
        spec.corpus.tokenizer,
        seq_len=spec.corpus.seq_len,
        samples_per_shard=spec.corpus.samples_per_shard,
        eval_fraction=spec.corpus.eval_fraction,
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


def disc_health(records: list[dict], step: int, min_auc: float) -> dict:
    """Whether the discriminator shows a sign of learning by ``step``, by pretraining's own rule
    (engine/metrics.py): over the last quarter of the logged steps up to there (a fresh discriminator's first
    steps don't count), its best AUC and its best margin below the base rate. ``stuck``: the AUC stayed below
    ``min_auc`` (for logs without AUC: the loss never went below the base rate). The last recall and AUC are
    reported too (the AUC is None for runs logged before it was)."""
    from electra_scale.engine.metrics import base_rate, little_sign_of_learning

    upto = [r for r in records if r["step"] <= step and "disc_loss" in r]
    if not upto:
        return {"recall": None, "auc": None, "stuck": False}
    tail = upto[-max(1, len(upto) // 4) :]
    aucs = [r["disc_auc"] for r in tail if r.get("disc_auc") is not None]
    best_auc = max(aucs) if aucs else None
    margin = max(base_rate(r.get("replaced_frac", 0.0)) - r["disc_loss"] for r in tail)
    last = upto[-1]
    return {
        "recall": last.get("disc_recall"),
        "auc": last.get("disc_auc"),
        "auc_tail_max": best_auc,
        "margin_tail_max": margin,
        "stuck": little_sign_of_learning(best_auc, margin, min_auc),
    }


def throughput(records: list[dict]) -> float | None:
    """Mean tokens/s over the logged windows, the first (start-up) one left out when there are others."""
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates) if rates else None


def evaluate(spec: CompareSpec, source, task, tokenizer, out: Path, k: int | None) -> dict:
    """Fine-tuning/probe results of one model at one few-label size K, cached on disk by their settings."""
    from electra_scale.eval.finetune import evaluate_model

    cfg = spec.finetune.settings_at(k)
    settings = {"finetune": asdict(cfg), "task": asdict(spec.task), "model": source.label}
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("settings") == settings:
            return cached
    result = evaluate_model(source, task, cfg, tokenizer, reference=False)  # the references: once per K
    result["settings"] = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def references(spec: CompareSpec, task, out: Path, k: int | None) -> dict:
    """The reference lines at one K: the majority class and the bag-of-words model on each seed's examples
    (cached like the models' results)."""
    from electra_scale.eval.bow import bow_reference
    from electra_scale.eval.finetune.run import subsets_of
    from electra_scale.eval.tasks import majority_baseline

    cfg = spec.finetune.settings_at(k)
    settings = {"finetune": asdict(cfg), "task": asdict(spec.task)}
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("settings") == settings:
            return cached
    split = "test" if "test" in task.splits else "dev"
    bow = bow_reference(task, subsets_of(task, cfg))
    result = {"settings": settings, "majority": majority_baseline(task, split), "split": split}
    result["bow_per_seed"] = None if bow is None else [r[split][task.main_metric] for r in bow["runs"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_compare_task(spec: CompareSpec, cache_dir: Path, work: Path):
    from electra_scale.eval.tasks import build_rotten_tomatoes, glue_name, load_glue

    if spec.task.name.lower() == "wiki_topic":  # the very corpus file prepare_data read, in the work dir
        from electra_scale.eval.wiki_topic import load_wiki_topic

        task = load_wiki_topic(work, spec.corpus.eval_fraction)
    else:
        name = glue_name(spec.task.name)
        data = spec.task.data or (str(build_rotten_tomatoes(cache_dir)) if name == "rotten_tomatoes" else "")
        if not data:
            raise ConfigError(f"task.data: the {name} task needs its GLUE directory")
        task = load_glue(name, data)
    if spec.task.eval_limit:
        for split in [s for s in task.splits if s != "train"]:
            task.splits[split] = task.splits[split][: spec.task.eval_limit]
    return task
