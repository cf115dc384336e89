"""The run's guards: a non-finite loss or gradient norm stops it before its checkpoint (engine/guard.py), and
pretrain leaves the process's signal handlers as it found them (bench runs it in-process, row after row)."""

from __future__ import annotations

import signal

import pytest
import torch.distributed as dist

from electra_scale.config import load_config
from electra_scale.data.shards import DataError
from electra_scale.engine.train import pretrain
from electra_scale.infra import launch
from tests.cli import run_cli
from tests.test_train import metrics, pretrain_args


def test_a_diverging_run_stops_before_its_checkpoint(shards, tmp_path):
    """A learning rate of 1e30 (a real divergence: the weights overflow fp32 after the first full-rate update):
    the run stops at the first step whose loss or gradient norm is not finite, in one line, exit 2, and that
    step has no checkpoint while the ones before it are complete."""
    out = tmp_path / "run"
    args = pretrain_args(shards, str(out), "optim.lr=1e30", "optim.warmup_steps=1", "train.max_steps=8")
    proc = run_cli([*args, "checkpoint.every_steps=1", "checkpoint.keep_last=10"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if "training diverged at step" in x]
    assert len(line) == 1 and "Lower optim.lr" in line[0], proc.stderr[-2000:]
    step = int(line[0].split("training diverged at step ")[1].split(":")[0])
    assert 1 < step < 8
    saved = sorted(int(p.name.removeprefix("step_")) for p in (out / "checkpoints").glob("step_*"))
    assert saved == list(range(1, step)), saved  # every step before it, none at or after it
    assert f"resumes from the last checkpoint (step {step - 1})" in line[0]
    logged = [m["step"] for m in metrics(str(out))]
    assert logged == list(range(1, step))  # the non-finite record is not logged either


def test_pretrain_restores_the_signal_handlers(tmp_path, monkeypatch):
    """Installed for the run, the previous handlers are back once pretrain returns or raises."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(launch.free_port()))

    def mine(signum, frame):
        pass

    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        cfg = load_config("configs/tiny.yaml", [f"data.shards={tmp_path / 'none'}", f"run.output_dir={tmp_path}/r"])
        with pytest.raises(DataError):  # after the handlers are installed: set-up reads the shards
            pretrain(cfg)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_an_error_in_pretrain_closes_the_runs_watchdog(tmp_path, monkeypatch):
    """An exception out of pretrain (an OOM mid-step in a bench row; here the inputs, read after the watchdog is
    armed) closes the watchdog that run armed: left armed, its step timer would end the process (exit 75) later,
    in whatever runs next in it (bench's next row). The loop's errors leave by the same way out."""
    from electra_scale.engine import watchdog

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(launch.free_port()))
    armed = []
    start = watchdog.start
    monkeypatch.setattr(watchdog, "start", lambda *a, **k: armed.append(start(*a, **k)) or armed[-1])
    try:
        cfg = load_config("configs/tiny.yaml", [f"data.shards={tmp_path / 'none'}", f"run.output_dir={tmp_path}/r"])
        with pytest.raises(DataError):
            pretrain(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (dog,) = armed
    assert dog not in watchdog._active and dog._stop.is_set()  # closed: its thread has stopped watching


def test_one_place_settles_the_device_for_every_path():
    """step.settle_device, which pretrain, bench's loops, find-micro-batch, the profiles and objective_cost all call:
    on a GPU, TF32 for a bf16 run's fp32 matmuls, and fp32 with padding-free batches refused in one line (the
    varlen kernel has no fp32; the fallback would attend example by example). The device is only looked at, so
    the CPU can show both."""
    import torch

    from electra_scale.config import ConfigError
    from electra_scale.engine.step import settle_device

    cuda, saved = torch.device("cuda"), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        settle_device(load_config("configs/tiny.yaml", ["train.precision=bf16", "train.unpad=true"]), cuda)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        torch.backends.cuda.matmul.allow_tf32 = False
        settle_device(load_config("configs/tiny.yaml", ["train.precision=fp32"]), cuda)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # an fp32 run keeps fp32 matmuls
        with pytest.raises(ConfigError, match="train.unpad=true on a GPU needs train.precision=bf16 or fp16"):
            settle_device(load_config("configs/tiny.yaml", ["train.precision=fp32", "train.unpad=true"]), cuda)
        settle_device(
            load_config("configs/tiny.yaml", ["train.precision=fp32", "train.unpad=true"]), torch.device("cpu")
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
