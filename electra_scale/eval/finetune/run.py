"""``electra-scale finetune``: fine-tune a pretrained (or randomly initialised) discriminator on a downstream
task with transformers' ``ElectraForSequenceClassification``, over several seeds, and report GLUE's metrics.

Optimisation follows google-research/electra's ``run_finetuning.py``: AdamW (weight decay 0.01, not on biases
and LayerNorm), linear warmup over the first 10% of steps then linear decay to 0, and layer-wise learning-rate
decay: the classifier head gets ``lr``, encoder layer ``i`` of ``L`` (0-based) gets ``lr * d**(L - i)``, so
the top layer gets ``lr * d`` and the embeddings ``lr * d**(L + 1)``. The reference puts the head at depth
L + 2 instead of L + 1 and so gives the top layer ``lr * d**2`` and the embeddings ``lr * d**(L + 2)``: its
known bug (google-research/electra#51), not reproduced here.

Deviations from the reference, and why:
- torch's AdamW with bias correction (the reference's AdamWeightDecay has none): with 10% warmup the two agree
  after the first few steps, and it runs everywhere without a compiled op.
- transformers' classification head (dense + GELU + dropout + projection on [CLS]) instead of the reference's
  single projection: the issue asks for ``ElectraForSequenceClassification``.
- Model selection: when the task has a labelled test split (rotten tomatoes), the epoch with the best dev score
  is picked and its *test* score reported; GLUE's test labels are hidden, so there the last epoch's dev score is
  reported, as the reference does (MNLI's mismatched dev set is scored with the same weights).

Besides full fine-tuning, ``--probe`` fits a linear probe (logistic regression, ridge for regression) on the
frozen encoder's mean-pooled last layer, with the L2 strength picked on dev: a low-variance measure of what
pretraining put into the representations, useful when fine-tuning small models on little data is too noisy.

Seeds: seed ``s`` fixes the classifier's initialisation, dropout, the data order and, with ``--train-limit N``
(a low-resource setting) or ``--per-class K`` (few labels: K of each class), which training examples are used
(eval/draw.py); every model sees the same subsets for the same seeds, so models can be compared seed by seed
(``--paired-with``, eval/stats.py). Scores are reported as mean +- sample std over seeds, next to two reference
lines: the majority class and a bag-of-words logistic regression on the same examples (eval/bow.py)."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from electra_scale.config import ConfigError
from electra_scale.data.shards import DataError
from electra_scale.eval.bow import bow_reference
from electra_scale.eval.draw import draw_digest, training_subset
from electra_scale.eval.finetune.probe import features, probe_seed
from electra_scale.eval.finetune.settings import DEFAULT_CACHE, FinetuneConfig
from electra_scale.eval.finetune.source import (
    ModelSource,
    encode,
    load_tokenizer_for,
    random_source,
    resolve_pretrained,
)
from electra_scale.eval.finetune.train import finetune_seed
from electra_scale.eval.stats import one_class_seeds, paired, verdict
from electra_scale.eval.tasks import GLUE, TaskData, glue_name, majority_baseline

log = logging.getLogger("electra_scale")


def subsets_of(task: TaskData, cfg: FinetuneConfig) -> dict[int, np.ndarray]:
    """Each seed's training examples (eval/draw.py): a function of the seed and the task only."""
    labels = None if task.regression else task.label_ids(task.splits["train"])
    n = len(task.splits["train"])
    return {seed: training_subset(labels, n, seed, cfg.train_limit, cfg.per_class) for seed in cfg.seeds}


def evaluate_model(
    source: ModelSource, task: TaskData, cfg: FinetuneConfig, tokenizer=None, reference: bool = True
) -> dict:
    """Fine-tune (and/or probe) one model over cfg.seeds; results with per-seed scores and mean +- std, and
    (``reference``) the bag-of-words line on the same examples."""
    import torch

    cfg.check()
    tokenizer = tokenizer or load_tokenizer_for(source)
    from electra_scale.data.tokenizer import special_ids

    pad_id = special_ids(tokenizer)["pad"]
    if source.path is None and source.config.model.vocab_size < tokenizer.get_vocab_size():
        raise ConfigError(
            f"model.vocab_size={source.config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.get_vocab_size()} tokens; set model.vocab_size={tokenizer.get_vocab_size()}"
        )
    # Only the training examples some seed uses are encoded (and, for the probe, run through the encoder).
    n_train = len(task.splits["train"])
    subsets = subsets_of(task, cfg)
    draws = {seed: draw_digest(idx) for seed, idx in subsets.items()}
    bow = bow_reference(task, subsets) if reference else None
    used = np.unique(np.concatenate(list(subsets.values())))
    position = np.full(n_train, -1)
    position[used] = np.arange(len(used))
    subsets = {seed: position[idx] for seed, idx in subsets.items()}
    data = {"train": encode(tokenizer, task, "train", cfg.max_seq_len, [task.splits["train"][i] for i in used])}
    data.update({s: encode(tokenizer, task, s, cfg.max_seq_len) for s in task.splits if s != "train"})
    data.update({s: encode(tokenizer, task, s, cfg.max_seq_len, ex) for s, ex in task.extra_eval.items()})
    report = "test" if "test" in data else "dev"
    result: dict = {
        "task": task.name,
        "model": source.label,
        "init": "random" if source.path is None else "pretrained",
        "report_split": report,
        "main_metric": task.main_metric,
        "n_train": {seed: len(idx) for seed, idx in subsets.items()},
        "draw": draws,  # the same for every model at a seed
        "majority": {s: majority_baseline(task, s) for s in data if s != "train"},
        "bow": bow,
        "hparams": asdict(cfg),
        "torch_threads": torch.get_num_threads(),
    }
    if cfg.finetune:
        runs = []
        for seed in cfg.seeds:
            runs.append(finetune_seed(source, task, data, subsets[seed], cfg, seed, pad_id))
            log.info("finetune %s seed %d: %s", source.label, seed, _fmt(runs[-1], report))
        result["finetune"] = {"runs": runs, "summary": summarize(runs, report)}
    if cfg.probe:
        feats = features(source, task, data, pad_id, cfg.eval_batch_size)
        runs = [probe_seed(task, feats, data, subsets[seed], seed) for seed in cfg.seeds]
        for run in runs:
            log.info("probe %s seed %d: %s", source.label, run["seed"], _fmt(run, report))
        result["probe"] = {"runs": runs, "summary": summarize(runs, report)}
    return result


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and *sample* standard deviation (ddof=1; 0 for one value)."""
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def summarize(runs: list[dict], report: str) -> dict:
    out = {}
    for split in ("dev", report):
        out[split] = {m: mean_std([r[split][m] for r in runs]) for m in runs[0][split]}
    return out


def _fmt(run: dict, report: str) -> str:
    return ", ".join(f"{report} {k} {v:.4f}" for k, v in run[report].items())


def load_task(args) -> TaskData:
    from electra_scale.eval.tasks import build_rotten_tomatoes, load_glue, load_table

    if args.train or args.dev:
        if not (args.train and args.dev):
            raise DataError("give both --train and --dev (and optionally --test) for a CSV/TSV/JSONL task")
        return load_table(
            args.train,
            args.dev,
            args.test,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column,
            label_column=args.label_column,
            regression=args.regression,
            name=args.task or "custom",
        )
    if not args.task:
        raise DataError("name a --task (e.g. rotten_tomatoes, wiki_topic, sst2) or give --train/--dev files")
    if args.task.lower() == "wiki_topic":
        from electra_scale.eval.wiki_topic import load_wiki_topic

        return load_wiki_topic(args.cache_dir, args.eval_fraction)
    name = glue_name(args.task)
    if name == "rotten_tomatoes" and not args.data:
        return load_glue(name, build_rotten_tomatoes(args.cache_dir))
    if not args.data:
        raise DataError(f"--task {args.task} needs --data DIR (the GLUE task's directory, e.g. glue_data/SST-2)")
    return load_glue(name, args.data)


def parse_seeds(text: str) -> list[int]:
    """ "5" = seeds 0..4; "1,7,9" = those seeds."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return list(range(int(text)))
    except ValueError as err:
        raise ConfigError(f"--seeds {text!r}: give a count (5) or a comma-separated list (1,7,9)") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        help="exported model dir (from `electra-scale export`) or checkpoint (run dir / step dir, local or s3://)",
    )
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained", help="random: no pretraining")
    p.add_argument("--config", action="append", default=[], help="run config YAML for --init random (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override (random)")
    p.add_argument("--tokenizer", help="for --init random: vocab.txt, tokenizer.json, or a shards/export dir")
    p.add_argument("--task", help=f"{', '.join(GLUE)}, wiki_topic; or a name for --train/--dev files")
    p.add_argument("--data", help="the GLUE task's directory (rotten_tomatoes is built and cached when omitted)")
    p.add_argument("--train", help="CSV/TSV/JSONL training file (generic task)")
    p.add_argument("--dev", help="CSV/TSV/JSONL dev file")
    p.add_argument("--test", help="CSV/TSV/JSONL test file with labels (optional)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default="label")
    p.add_argument("--regression", action="store_true", help="the label is a number (MSE; Pearson/Spearman)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where built tasks are cached")
    d = FinetuneConfig()
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--layer-decay", type=float, default=d.layer_decay)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seeds", default=str(len(d.seeds)), help="a count (5 = seeds 0..4) or a list (1,7,9)")
    p.add_argument("--train-limit", type=int, default=None, help="low-resource: N training examples per seed")
    p.add_argument("--per-class", type=int, default=None, help="few-label: K training examples of each class per seed")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="wiki_topic: the --eval-fraction of the prepare the encoder was pretrained on; its held-out articles "
        "are the dev and test sets (default 0.05, the demo's)",
    )
    p.add_argument(
        "--paired-with",
        default=None,
        metavar="RESULTS.json",
        help="another model's results on the same task and seeds: print this model minus that one, paired by seed",
    )
    p.add_argument("--probe", action="store_true", help="also fit a linear probe on frozen features")
    p.add_argument("--probe-only", action="store_true", help="only the linear probe (no fine-tuning)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", default="finetune_results.json", help="JSON results file")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(
        lr=args.lr,
        layer_decay=args.layer_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        warmup_frac=args.warmup_frac,
        weight_decay=args.weight_decay,
        seeds=parse_seeds(args.seeds),
        train_limit=args.train_limit,
        per_class=args.per_class,
        finetune=not args.probe_only,
        probe=args.probe or args.probe_only,
    )
    cfg.check()
    if args.eval_fraction is None:
        from electra_scale.eval.wiki_topic import DEFAULT_EVAL_FRACTION

        args.eval_fraction = DEFAULT_EVAL_FRACTION
    other = _read_results(args.paired_with) if args.paired_with else None
    task = load_task(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.init == "random":
            if not args.config:
                raise ConfigError("--init random needs --config (the run config whose model shape to build)")
            source = random_source(args.config, args.override, args.tokenizer)
        else:
            if not args.model:
                raise ConfigError("give a MODEL (an exported dir or a checkpoint), or --init random --config ...")
            source = resolve_pretrained(args.model, Path(tmp))
        # The bag-of-words line depends on the task and the draw only: taken from --paired-with's results when
        # they drew the same examples, rather than fitted again.
        draws = {str(seed): draw_digest(idx) for seed, idx in subsets_of(task, cfg).items()}
        reuse = other is not None and other.get("bow") and other.get("draw") == draws
        result = evaluate_model(source, task, cfg, reference=not reuse)
        if reuse:
            result["bow"] = other["bow"]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(format_result(result))
    if other is not None:
        for line in paired_lines(result, other):
            print(f"  {line}")
    print(f"results: {args.output}")
    return 0


def format_result(result: dict) -> str:
    split = result["report_split"]
    lines = [f"{result['task']}  model: {result['model']}  ({split} split, mean +- std over seeds)"]
    if result["majority"].get(split) is not None:
        lines.append(f"  majority class     accuracy {result['majority'][split]:.4f}")
    if result.get("bow"):
        bow = mean_std([r[split][result["main_metric"]] for r in result["bow"]["runs"]])
        what = "tf-idf logistic regression, the same examples per seed"
        lines.append(f"  bag of words       {result['main_metric']} {bow['mean']:.4f} +- {bow['std']:.4f}  ({what})")
    for mode in ("finetune", "probe"):
        if mode in result:
            summ = result[mode]["summary"][split]
            scores = "  ".join(f"{m} {s['mean']:.4f} +- {s['std']:.4f}" for m, s in summ.items())
            one = one_class_seeds(result[mode]["runs"])
            lines.append(
                f"  {mode:<18} {scores}  (n={next(iter(summ.values()))['n']}"
                + (f"; {one} seed(s) predict one class only" if one else "")
                + ")"
            )
    return "\n".join(lines)


def per_seed(result: dict, mode: str) -> dict[int, float]:
    """The reported split's main metric by seed."""
    split, metric = result["report_split"], result["main_metric"]
    return {int(r["seed"]): r[split][metric] for r in result[mode]["runs"]}


def paired_lines(result: dict, other: dict) -> list[str]:
    """This model minus ``other``, per mode, paired over the seeds both have (eval/stats.py)."""
    if (result["task"], result["hparams"].get("per_class"), result["hparams"].get("train_limit")) != (
        other["task"],
        other["hparams"].get("per_class"),
        other["hparams"].get("train_limit"),
    ):
        raise DataError(
            "--paired-with: the results are of another task or another draw of labels (task, --per-class, "
            "--train-limit must match)"
        )
    lines = []
    for mode in ("finetune", "probe"):
        if mode in result and mode in other:
            a, b = per_seed(result, mode), per_seed(other, mode)
            seeds = sorted(a.keys() & b.keys())
            if seeds:
                p = paired([a[s] for s in seeds], [b[s] for s in seeds])
                lines.append(f"{mode}: {verdict(p, result['model'], other['model'])}")
    return lines


def _read_results(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"--paired-with {path}: not a finetune results file ({err})") from err
