"""Where metrics go: ``<output_dir>/metrics.jsonl`` (one JSON object per logged step) and the run's trackers
(``run.trackers``: TensorBoard, W&B, MLflow; engine/trackers.py).

When the output dir is on S3 the file is kept in the node-local cache and uploaded at every checkpoint. On
resume, lines past the resumed step are dropped, so the file always tells the run's actual history: no step
appears twice.
"""

from __future__ import annotations

import json
import logging
import math
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
    and which examples of the shard set they were (with data.sources, also the name of each one's source).

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

    def log(
        self, step: int, positions: list[int], samples: list[int] | None = None, sources: list[str] | None = None
    ) -> None:
        rec = {"step": step, "positions": positions}
        if samples is not None:
            rec["samples"] = samples  # which examples of the shard set those positions are
        if sources is not None:
            rec["sources"] = sources  # with data.sources: the source each example is from (samples index into it)
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


def base_rate(replaced_frac: float) -> float:
    """The discriminator loss of knowing only the replaced share r: predicting r at every token scores the binary
    entropy of r (in nats, as ``disc_loss``). A loss below it is what the discriminator has learned per token."""
    r = replaced_frac
    return 0.0 if r <= 0.0 or r >= 1.0 else -(r * math.log(r) + (1 - r) * math.log(1 - r))


MIN_AUC = 0.55  # below this the discriminator barely ranks replaced tokens above originals (0.5 = chance)


def little_sign_of_learning(auc: float | None, margin: float, min_auc: float = MIN_AUC) -> bool:
    """The one rule, for pretraining's warning and compare's flag: an AUC near chance; for logs without an AUC, a
    loss no lower than the base rate (``margin`` = base rate - loss). Recall at the 0.5 threshold is no sign either
    way. Where the AUC is logged it decides alone: a discriminator that ranks replaced tokens above originals is
    learning even while its loss is still above the base rate, its probabilities not yet calibrated to the
    replaced share. The demo at optim.lr=1e-4 is such a run: held-out AUC 0.73 at step 300 with its loss 0.0096
    above the base rate (docs/compare.md, "The learning rate")."""
    if auc is not None:
        return auc < min_auc
    return margin <= 0


class DiscriminatorHealth:
    """Warns once, after warmup, when the discriminator shows no sign of learning, and says so when it later does.

    Learning looks like this: the AUC rises above 0.5 (replaced tokens score above original ones) and, sooner or
    later, the loss falls below the base rate (``base_rate``). Recall at the 0.5 threshold is not a sign either
    way: about 85% of tokens are original, so a discriminator that is learning still calls almost every token
    original for a long time (google-research/electra #81: AUC 0.68 and recall 0.048 at step 5,000; our CPU runs
    are far shorter). So the warning fires on an AUC near chance (``little_sign_of_learning``), never on recall.
    """

    MIN_AUC = MIN_AUC

    def __init__(self, warmup_steps: int, total_steps: int):
        self.after = max(2 * warmup_steps, total_steps // 10, 1)
        self.warned_at: int | None = None
        self.done = False  # warned and then saw it learn: nothing more to say in this process

    def check(self, step: int, record: dict) -> None:
        loss, auc = record.get("disc_loss"), record.get("disc_auc")
        if self.done or loss is None or step < self.after:  # an MLM record has no discriminator
            return
        base = base_rate(record.get("replaced_frac", 0.0))
        stuck = little_sign_of_learning(auc, base - loss, self.MIN_AUC)
        if self.warned_at is not None:
            # A small run can sit at chance for a while and then start to rank (the demo at optim.lr=5e-4: AUC 0.51
            # at step 40, 0.72 at step 80), so an early warning is withdrawn in the log rather than left standing.
            if not stuck:
                self.done = True
                log.info(
                    "the discriminator now shows signs of learning at step %d: AUC %s and loss %.4f, %.4f below the "
                    "base rate (the warning at step %d no longer holds)",
                    step,
                    "n/a" if auc is None else f"{auc:.3f}",
                    loss,
                    base - loss,
                    self.warned_at,
                )
            return
        if not stuck:
            return
        self.warned_at = step
        log.warning(
            "the discriminator shows little sign of learning at step %d: AUC %s (0.5 = chance; warned below %.2f) "
            "and loss %.4f against a base rate of %.4f (predicting the replaced share everywhere; learning goes "
            "below it). Levers: a lower optim.lr (the tiny preset's 300 steps: held-out AUC 0.53 at 1e-3, 0.77 at "
            "2e-4, docs/compare.md 'The learning rate'; 5e-4 to 1e-4 unstuck it in ymcui/Chinese-ELECTRA #66), the "
            "generator curriculum (objective.temperature_start, objective.temperature_warmup_steps), "
            "objective.embedding_sharing=gdes (docs/compare.md measures both), or more steps",
            step,
            "n/a" if auc is None else f"{auc:.3f}",
            self.MIN_AUC,
            loss,
            base,
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


def of_split(records: list[dict], split: str = "train") -> list[dict]:
    """The records of one split: training's (no "split" key) or a held-out evaluation's (``"eval"``)."""
    return [r for r in records if r.get("split", "train") == split]
