"""Experiment trackers (``run.trackers``): TensorBoard, Weights & Biases and MLflow, behind one interface.

``MetricsLogger`` owns them (rank 0 only): each gets the resolved config once, then every record written to
metrics.jsonl, under ``<split>/<key>`` (``train/loss``; a held-out evaluation logs ``split="eval"`` through the
same call). Numbers only: None (mfu without a peak) and text are left out.

Where each writes, and how it stays off the network unless told otherwise:

* tensorboard: ``tensorboard/`` beside metrics.jsonl (in the node-local cache when the output is on S3).
* wandb: project ``run.tracker_project``, the run named after the output dir, with an id derived from it, so
  that a resumed run continues the same W&B run. ``WANDB_MODE=offline`` writes only
  ``<cache_dir>/wandb/offline-run-*`` (``wandb sync`` uploads it later) and turns off what would still reach out:
  error reports and the system-metrics sampler (which can query a cloud's metadata endpoint).
* mlflow: ``run.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``file:<cache_dir>/mlruns``; experiment
  ``run.tracker_project``; the run is tagged with the output dir and found again on resume. MLflow's usage
  telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.

A tracker whose package is missing is refused when the config loads (``check_installed``), naming the extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from electra_scale.config import ConfigError

log = logging.getLogger("electra_scale")

# tracker -> the module it needs; the extra that installs it has the tracker's name
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
OUTPUT_DIR_TAG = "electra_scale.output_dir"
RUN_KEY_TAG = "electra_scale.run_key"  # a hash of the output dir: safe to quote in a search filter


def check_installed(names: Iterable[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed (without importing it: that is slow)."""
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(
                f"run.trackers lists {name}, but its package is not installed: pip install 'electra-scale[{name}]', "
                f"or remove {name} from run.trackers"
            )


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers; a dict of them (a mix's ``source_examples``) as ``key/name``."""
    out = {}
    for key, value in flatten(record, sep="/").items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def flatten(config: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"model": {"hidden_size": 256}}`` -> ``{"model.hidden_size": 256}``: MLflow's params are flat."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoard:
    def __init__(self, directory: Path, start_step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, events past the checkpoint's step (written before a crash) are hidden.
        self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=start_step + 1)
        if start_step == 0:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def where(self) -> str:
        return self.writer.log_dir

    def log(self, step: int, values: dict[str, float], split: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, directory: Path, output_dir: str, project: str, config: dict[str, Any]):
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
        if offline:
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=_run_name(output_dir),
            id=_run_key(output_dir),
            resume="allow",
            dir=str(directory),
            config=config,
            # console="off": our log lines are not the run's to upload.
            settings=wandb.Settings(console="off", x_disable_stats=offline),
        )

    def where(self) -> str:
        return f"{self.run.dir} (run {self.run.id})"

    def log(self, step: int, values: dict[str, float], split: str) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        pass  # wandb's own process writes as records arrive

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, uri: str, output_dir: str, project: str, config: dict[str, Any], start_step: int):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked (it is in maintenance mode); a file: URI asks.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{_run_key(output_dir)}'", max_results=1
        )
        if found:  # a resumed run: its params stay those it started with (MLflow refuses to change them)
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_dict(self.run_id, config, f"config_step_{start_step}.yaml")
        else:
            tags = {OUTPUT_DIR_TAG: output_dir, RUN_KEY_TAG: _run_key(output_dir)}
            run = self.client.create_run(experiment_id, run_name=_run_name(output_dir), tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.log_dict(self.run_id, config, "config.yaml")
        self.uri = uri

    def where(self) -> str:
        return f"{self.uri} (run {self.run_id})"

    def log(self, step: int, values: dict[str, float], split: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{split}/{k}", v, now, step) for k, v in values.items()])

    def flush(self) -> None:
        pass  # every log_batch is written when it returns

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _run_name(output_dir: str) -> str:
    return output_dir.rstrip("/").rsplit("/", 1)[-1] or output_dir


def _run_key(output_dir: str) -> str:
    """One run per output dir in every tracker: resuming continues it."""
    return hashlib.sha256(output_dir.encode()).hexdigest()[:16]


class Trackers:
    """The trackers of one run, fed together."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    @classmethod
    def open(
        cls,
        names: Iterable[str],
        *,
        config: dict[str, Any],
        output_dir: str,
        metrics_dir: Path,
        cache_dir: Path,
        start_step: int,
        project: str = "electra-scale",
        mlflow_tracking_uri: str | None = None,
    ) -> Trackers:
        names = list(dict.fromkeys(names))
        check_installed(names)
        opened: list[Any] = []
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoard(metrics_dir, start_step, config))
            elif name == "wandb":
                opened.append(WandB(cache_dir, output_dir, project, config))  # wandb adds its wandb/
            elif name == "mlflow":
                uri = (
                    mlflow_tracking_uri
                    or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"file:{(cache_dir / 'mlruns').resolve()}"
                )
                opened.append(MLflow(uri, output_dir, project, config, start_step))
            log.info("tracker %s: %s", name, opened[-1].where())
        return cls(opened)

    def log(self, step: int, record: dict[str, Any], split: str = "train") -> None:
        values = numbers(record)
        for tracker in self.trackers:
            tracker.log(step, values, split)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
