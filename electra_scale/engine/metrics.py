"""Where metrics go: ``<output_dir>/metrics.jsonl`` (one JSON object per logged step) and the run's trackers
(``run.trackers``: TensorBoard, W&B, MLflow; engine/trackers.py).

When the output dir is on S3 the file is kept in the node-local cache and uploaded at every checkpoint. On
resume, lines past the resumed step are dropped, so the file always tells the run's actual history: no step
appears twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.engine.trackers import Trackers
from electra_scale.infra import storage

log = logging.getLogger("electra_scale")


class MetricsLogger:
    """metrics.jsonl and the trackers, fed by one call per record. A record of another split than "train" (a
    held-out evaluation: ``split="eval"``) carries ``"split"`` in metrics.jsonl and goes to the trackers under
    ``<split>/``, as training records go under ``train/``."""

    def __init__(
        self,
        output_dir: str,
        cache_dir: Path,
        start_step: int,
        trackers: Sequence[str] = (),
        config: dict | None = None,
        tracker_project: str = "electra-scale",
        mlflow_tracking_uri: str | None = None,
    ):
        self.remote = storage.join(output_dir, "metrics.jsonl")
        self.on_s3 = storage.is_s3(output_dir)
        self.path = Path(cache_dir, "metrics.jsonl") if self.on_s3 else Path(self.remote)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.on_s3:
            if storage.exists(self.remote):
                storage.download_file(self.remote, self.path)
            else:
                self.path.unlink(missing_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.trackers = Trackers.open(
            trackers,
            config=config or {},
            output_dir=output_dir,
            metrics_dir=self.path.parent,
            cache_dir=Path(cache_dir),
            start_step=start_step,
            project=tracker_project,
            mlflow_tracking_uri=mlflow_tracking_uri,
        )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        extra = {} if split == "train" else {"split": split}  # training records keep the format readers know
        self.file.write(json.dumps({"step": step, **extra, **metrics}) + "\n")
        self.file.flush()
        self.trackers.log(step, metrics, split)

    def sync(self) -> None:
        """Make the remote copy current (S3 only; a local file is already in place)."""
        self.trackers.flush()
        if self.on_s3:
            storage.upload_file(self.path, self.remote)

    def close(self) -> None:
        self.sync()
        self.file.close()
        self.trackers.close()


class SampleLog:
    """``samples/rank_<r>.jsonl``: one line per optimizer step with the stream positions this rank trained on,
    and which examples of the shard set they were.

    Stream positions identify each draw exactly (see data/stream.py) and example indices say what was drawn,
    so the union of all ranks' files says which samples a run consumed, and how often in each epoch. Like
    metrics.jsonl, lines past the resumed step are dropped on resume: the file is the history of the run that
    counts, and a step redone after a crash appears once.
    """

    def __init__(self, directory: Path, rank: int, world_size: int, start_step: int):
        self.path = Path(directory, "samples", f"rank_{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = [self.path]
        if rank == 0:  # files of ranks that this (smaller) world no longer has: nobody else truncates them
            mine += [p for p in self.path.parent.glob("rank_*.jsonl") if int(p.stem.split("_")[1]) >= world_size]
        for path in mine:
            if path.exists():
                lines = path.read_text().splitlines()
                path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= start_step))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def log(self, step: int, positions: list[int], samples: list[int] | None = None) -> None:
        rec = {"step": step, "positions": positions}
        if samples is not None:
            rec["samples"] = samples  # which examples of the shard set those positions are
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_samples(directory: str | Path, key: str = "positions") -> dict[int, list[int]]:
    """step -> every rank's stream positions (or, with ``key="samples"``, example indices in the shard set) for
    that step, sorted, from a run's samples/ directory."""
    steps: dict[int, list[int]] = {}
    for path in sorted(Path(directory, "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec[key])
    return {step: sorted(pos) for step, pos in sorted(steps.items())}


class DiscriminatorHealth:
    """Warns once when the discriminator predicts "original" almost everywhere.

    The failure mode of replaced token detection: about 85% of tokens are original and the generator's
    samples are often correct (then they count as original too), so "never replaced" is a cheap local optimum.
    Its signature is recall on replaced tokens near 0 long after warmup. ``compare`` flags such runs from
    metrics.jsonl; this makes the same diagnosis visible while the run is going.
    """

    THRESHOLD = 0.01

    def __init__(self, warmup_steps: int, total_steps: int):
        self.after = max(2 * warmup_steps, total_steps // 10, 1)
        self.warned = False

    def check(self, step: int, record: dict) -> None:
        recall = record.get("disc_recall")
        if self.warned or recall is None or step < self.after or recall >= self.THRESHOLD:
            return
        self.warned = True
        log.warning(
            "discriminator recall on replaced tokens is %.3f at step %d: it predicts 'original' almost everywhere. "
            "Likely causes: the learning rate (optim.lr, optim.warmup_steps), a generator too strong or too weak "
            "(model.generator_hidden_size; the paper uses 1/4 to 1/2 of the discriminator's width), "
            "objective.disc_weight, or simply too few steps so far",
            recall,
            step,
        )


def read_metrics(url: str) -> list[dict]:
    """The records of a metrics.jsonl (local or s3://), sorted by step; [] when the file does not exist. A line
    that is not a metrics record is a ConfigError naming the file and line."""
    if not storage.exists(url):
        return []
    records = []
    for n, line in enumerate(storage.read_text(url).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{url} line {n} is not JSON ({err.msg}); is this a metrics.jsonl?") from err
        if not isinstance(rec, dict) or "step" not in rec:
            raise ConfigError(f"{url} line {n} has no 'step'; is this an electra-scale metrics.jsonl?")
        records.append(rec)
    return sorted(records, key=lambda r: r["step"])
