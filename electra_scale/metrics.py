"""Where metrics go: ``<output_dir>/metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

When the output dir is on S3 the file is kept in the node-local cache and uploaded at every checkpoint. On
resume, lines past the resumed step are dropped, so the file always tells the run's actual history: no step
appears twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from electra_scale import storage

log = logging.getLogger("electra_scale")


class MetricsLogger:
    def __init__(self, output_dir: str, cache_dir: Path, start_step: int, tensorboard: bool):
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
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def sync(self) -> None:
        """Make the remote copy current (S3 only; a local file is already in place)."""
        if self.tb is not None:
            self.tb.flush()
        if self.on_s3:
            storage.upload_file(self.path, self.remote)

    def close(self) -> None:
        self.sync()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class SampleLog:
    """``samples/rank_<r>.jsonl``: one line per optimizer step with the stream positions this rank trained on.

    Stream positions identify examples exactly (epoch, shard, sample; see data/stream.py), so the union of all
    ranks' files says which samples a run consumed. Like metrics.jsonl, lines past the resumed step are dropped
    on resume: the file is the history of the run that counts, and a step redone after a crash appears once.
    """

    def __init__(self, directory: Path, rank: int, start_step: int):
        self.path = Path(directory, "samples", f"rank_{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def log(self, step: int, positions: list[int]) -> None:
        self.file.write(json.dumps({"step": step, "positions": positions}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_samples(directory: str | Path) -> dict[int, list[int]]:
    """step -> every rank's positions for that step (sorted), from a run's samples/ directory."""
    steps: dict[int, list[int]] = {}
    for path in sorted(Path(directory, "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["positions"])
    return {step: sorted(pos) for step, pos in sorted(steps.items())}
