"""run.trackers: real TensorBoard event files, a real W&B offline run and a real MLflow file store, each read back
and checked for the values metrics.jsonl holds; nothing leaves the machine (WANDB_MODE=offline, MLflow on file:)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from electra_scale.config import ConfigError, config_from_saved, load_config
from electra_scale.engine.metrics import MetricsLogger
from electra_scale.engine.trackers import OUTPUT_DIR_TAG
from tests.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B offline, with its settings and caches in the test's directory rather than ~."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # For the readers below; the pretrain subprocess gets none of these and must open its file store itself.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# --------------------------------------------------------------------------------------------- reading back
def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks
    of chunks: CRC-32, length, type (1 full, 2 first, 3 middle, 4 last), bytes) of protobuf Records."""
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """step -> the values logged at it, and the run's config (key -> value), from an offline run."""
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    for rec in wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history.setdefault(int(items.pop("_step")), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")}
            )
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
    return history, config


def mlflow_run(uri: str, output_dir: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("electra-scale")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags[OUTPUT_DIR_TAG] == output_dir
    return client, run


def mlflow_series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def tensorboard_series(directory: Path, key: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


# --------------------------------------------------------------------------------------------- tests
def test_every_tracker_gets_the_config_and_every_record(tmp_path):
    """Train records and an eval record through MetricsLogger, then a resume from step 2: each tracker holds what
    metrics.jsonl holds, the config, and one run per output dir."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    config = {"train": {"max_steps": 6, "seed": 3}, "run": {"output_dir": str(out)}}
    logger = MetricsLogger(str(out), cache, 0, ALL, config=config)
    logger.log(2, {"loss": 3.5, "lr": 1e-3, "mfu": None, "note": "text is left out"})
    logger.log(4, {"loss": 3.0, "lr": 2e-3})
    logger.log(4, {"disc_auc": 0.75}, split="eval")
    logger.close()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 4, "loss": 3.0, "lr": 2e-3}  # train records keep their format
    assert lines[2] == {"step": 4, "split": "eval", "disc_auc": 0.75}

    assert tensorboard_series(out / "tensorboard", "train/loss") == [(2, 3.5), (4, 3.0)]
    assert tensorboard_series(out / "tensorboard", "eval/disc_auc") == [(4, 0.75)]

    (run_dir,) = (cache / "wandb").glob("offline-run-*")
    history, wb_config = wandb_history(run_dir)
    assert history == {
        2: {"train/loss": 3.5, "train/lr": 1e-3},
        4: {"train/loss": 3.0, "train/lr": 2e-3, "eval/disc_auc": 0.75},
    }
    assert wb_config["train"] == {"max_steps": 6, "seed": 3}

    uri = f"file:{(cache / 'mlruns').resolve()}"
    client, run = mlflow_run(uri, str(out))
    assert mlflow_series(client, run.info.run_id, "train/loss") == [(2, 3.5), (4, 3.0)]
    assert mlflow_series(client, run.info.run_id, "eval/disc_auc") == [(4, 0.75)]
    assert run.data.params["train.max_steps"] == "6" and run.data.params["run.output_dir"] == str(out)
    assert "train/mfu" not in run.data.metrics and run.info.status == "FINISHED"

    # Resumed from the step-2 checkpoint: metrics.jsonl drops step 4; MLflow continues the same run.
    logger = MetricsLogger(str(out), cache, 2, ALL, config={**config, "train": {"max_steps": 8, "seed": 3}})
    logger.log(4, {"loss": 2.75, "lr": 2e-3})
    logger.close()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    client, again = mlflow_run(uri, str(out))
    assert again.info.run_id == run.info.run_id
    assert again.data.params["train.max_steps"] == "6"  # params are the start's; the resumed config is an artifact
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.yaml", "config_step_2.yaml"}
    assert (4, 2.75) in mlflow_series(client, run.info.run_id, "train/loss")
    assert tensorboard_series(out / "tensorboard", "train/loss")[-1] == (4, 2.75)
    # Offline, the resumed part is written as another offline-run-* directory of the same run id.
    runs = sorted((cache / "wandb").glob("offline-run-*"))
    # offline-run-<YYYYMMDD_HHMMSS>-<run id>, and "-1" after it when both parts started in the same second
    run_id = lambda path: re.match(r"offline-run-\d{8}_\d{6}-([^-]+)", path.name).group(1)  # noqa: E731
    assert {run_id(r) for r in runs} == {run_id(run_dir)} and len(runs) == 2
    assert any(wandb_history(r)[0].get(4) == {"train/loss": 2.75, "train/lr": 2e-3} for r in runs), [
        (r.name, wandb_history(r)[0]) for r in runs
    ]


def test_pretrain_reports_to_all_trackers(shards, tmp_path):
    """`electra-scale pretrain` with all three trackers: each shows every logged step of metrics.jsonl with the
    same values, and the resolved config."""
    out = tmp_path / "run"
    env = {
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }
    args = [
        "pretrain",
        "--config",
        "configs/tiny.yaml",
        f"data.shards={shards[0]}",
        f"run.output_dir={out}",
        f"model.vocab_size={shards[1]}",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "train.log_every=2",
        "data.num_workers=0",
        "run.trackers=[tensorboard,wandb,mlflow]",
    ]
    proc = run_cli(args, env={**_base_env(), **env}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    keys = ["loss", "gen_loss", "disc_loss", "disc_acc", "lr", "tokens_per_s"]

    for key in keys:  # TensorBoard keeps float32
        steps, values = zip(*tensorboard_series(out / "tensorboard", f"train/{key}"))
        assert list(steps) == [2, 4] and list(values) == pytest.approx([r[key] for r in records], rel=1e-6)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history, wb_config = wandb_history(run_dir)
    assert sorted(history) == [2, 4]
    for r in records:
        assert {k: history[r["step"]][f"train/{k}"] for k in keys} == {k: r[k] for k in keys}
    assert wb_config["train"]["max_steps"] == 4 and wb_config["model"]["vocab_size"] == shards[1]

    client, run = mlflow_run(f"file:{out / 'mlruns'}", str(out))
    for key in keys:
        assert mlflow_series(client, run.info.run_id, f"train/{key}") == [(r["step"], r[key]) for r in records]
    assert run.data.params["train.max_steps"] == "4" and run.data.params["run.trackers"] == str(ALL)
    saved = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert saved["data"]["shards"] == shards[0]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}


# --------------------------------------------------------------------------------------------- config
def test_tracker_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"run.trackers\[1\]='neptune' is not allowed; choose one of tensorboard"):
        load_config("configs/tiny.yaml", ["run.trackers=[tensorboard,neptune]"])
    with pytest.raises(
        ConfigError, match=r"sets run.tensorboard, which run.trackers replaced: run.trackers=\[tensorboard\]"
    ):
        load_config("configs/tiny.yaml", ["run.tensorboard=false"])
    # A checkpoint's config.yaml from before run.trackers still loads (export reads it).
    raw = yaml.safe_load(load_config("configs/tiny.yaml").to_yaml())
    raw["run"]["tensorboard"] = True
    assert config_from_saved(raw, "old checkpoint").run.trackers == ["tensorboard"]
    assert load_config("configs/tiny.yaml").run.trackers == ["tensorboard"]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_without_its_package_is_refused_at_start(name, tmp_path):
    """As on a machine without the extra: the import system reports the package missing (sys.modules[name] =
    None is how Python marks a module that cannot be imported)."""
    args = ["pretrain", "--config", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'out'}"]
    proc = run_cli([*args, f"run.trackers=[tensorboard,{name}]"], check=False, unimportable=(name,))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"electra-scale pretrain: error: run.trackers lists {name}, but its package is not installed: pip install "
        f"'electra-scale[{name}]', or remove {name} from run.trackers"
    ]
    assert not (tmp_path / "out").exists()
