"""What is fine-tuned: a pretrained export or checkpoint, or the same shape from random init, with its tokenizer;
and the task's examples encoded into id arrays and batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from electra_scale.config import ConfigError
from electra_scale.data.shards import DataError
from electra_scale.eval.tasks import TaskData


@dataclass
class ModelSource:
    """Where the encoder comes from: an exported model dir, or random init from a run config's shape."""

    label: str
    path: Path | None  # exported HF dir (discriminator/ or mlm/); None = random init
    tokenizer: str  # a dir with tokenizer.json / vocab.txt, or one of those files
    config: object | None = None  # electra_scale.config.Config for random init
    lowercase: bool = True


def resolve_pretrained(source: str, workdir: Path) -> ModelSource:
    """An exported model (the export dir or its discriminator/ or mlm/ subdir), or a checkpoint (run dir,
    checkpoints dir or step dir; local or s3://), which is exported into ``workdir`` first."""
    p = Path(source)
    from electra_scale.infra import storage

    if not storage.is_s3(source):
        for cand in (p, p / "discriminator", p / "mlm"):
            if (cand / "config.json").exists():
                return ModelSource(str(source), cand, str(cand), lowercase=_lowercase_of(cand))
    from electra_scale.engine.checkpoint import CheckpointError
    from electra_scale.engine.export import export, locate

    try:
        locate(source)
    except CheckpointError as err:
        raise DataError(
            f"{source} is neither an exported model (a dir with config.json, or with discriminator/ or mlm/) nor "
            "a checkpoint (a run dir with checkpoints/latest, or a step dir with COMPLETE)"
        ) from err
    written = export(source, str(workdir / "export"))
    target = Path(written.get("discriminator") or written["mlm"])
    return ModelSource(str(source), target, str(target), lowercase=_lowercase_of(target))


def random_source(config_paths: list[str], overrides: list[str], tokenizer: str | None) -> ModelSource:
    """The no-pretraining baseline: the run config's discriminator shape with fresh weights."""
    from electra_scale.engine.run_config import load_run_config

    cfg = load_run_config(config_paths, overrides)
    if not tokenizer:
        tokenizer = cfg.data.shards
    if not tokenizer:
        raise ConfigError("--init random needs --tokenizer (a vocab.txt, tokenizer.json, or a shards/export dir)")
    return ModelSource("random init", None, tokenizer, config=cfg, lowercase=_lowercase_of(Path(tokenizer)))


def _lowercase_of(where: Path) -> bool:
    for name, key in (("tokenizer_config.json", "do_lower_case"), ("manifest.json", "lowercase")):
        f = where / name if where.is_dir() else where.parent / name
        if f.exists():
            return bool(json.loads(f.read_text()).get(key, True))
    return True


def load_tokenizer_for(source: ModelSource):
    """The model's WordPiece tokenizer (HF ``tokenizers``), from a dir or a file."""
    from electra_scale.data.tokenizer import load_tokenizer
    from electra_scale.infra import storage

    spec = source.tokenizer
    if storage.is_s3(spec) or Path(spec).is_dir():
        names = ("tokenizer.json", "vocab.txt")
        found = [storage.join(spec, n) for n in names if storage.exists(storage.join(spec, n))]
        if not found:
            raise DataError(f"{spec} holds no tokenizer.json or vocab.txt")
        spec = found[0]
    try:
        return load_tokenizer(spec, lowercase=source.lowercase)
    except ValueError as err:
        raise DataError(str(err)) from err


@dataclass
class Encoded:
    ids: list[np.ndarray]
    types: list[np.ndarray]
    labels: np.ndarray


def encode(tokenizer, task: TaskData, split: str, max_len: int, examples=None) -> Encoded:
    """[CLS] A [SEP] (B [SEP]), truncating the longer text first (the reference's _truncate_seq_pair)."""
    from electra_scale.data.tokenizer import special_ids

    examples = task.splits[split] if examples is None else examples
    special = special_ids(tokenizer)
    a = [e.ids for e in tokenizer.encode_batch([e.text_a for e in examples], add_special_tokens=False)]
    pairs = examples and examples[0].text_b is not None
    b = (
        [e.ids for e in tokenizer.encode_batch([e.text_b or "" for e in examples], add_special_tokens=False)]
        if pairs
        else [None] * len(examples)
    )
    ids, types = [], []
    for ta, tb in zip(a, b):
        ta = list(ta)
        if tb is None:
            ta = ta[: max_len - 2]
            seq, typ = [special["cls"], *ta, special["sep"]], [0] * (len(ta) + 2)
        else:
            tb = list(tb)
            while len(ta) + len(tb) > max_len - 3:
                (ta if len(ta) > len(tb) else tb).pop()
            seq = [special["cls"], *ta, special["sep"], *tb, special["sep"]]
            typ = [0] * (len(ta) + 2) + [1] * (len(tb) + 1)
        ids.append(np.array(seq, np.int64))
        types.append(np.array(typ, np.int64))
    return Encoded(ids, types, task.label_ids(examples))


def default_device():
    """Fine-tuning and probing run on the GPU when there is one."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def batch_tensors(enc: Encoded, idx, pad_id: int, device=None):
    import torch

    n = max(len(enc.ids[i]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(idx), n), dtype=torch.long)
    for row, i in enumerate(idx):
        ids[row, : len(enc.ids[i])] = torch.from_numpy(enc.ids[i])
        types[row, : len(enc.types[i])] = torch.from_numpy(enc.types[i])
    out = ids, (ids != pad_id).long(), types, torch.from_numpy(enc.labels[idx])
    return tuple(t.to(device) for t in out) if device is not None else out
