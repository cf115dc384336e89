"""``electra-scale bench``: how fast a config trains here, and where the time goes.

    electra-scale bench --config configs/small.yaml [key=value ...] [--steps 20] [--warmup 5] [--json-out F]

Measures, for one rank on this machine (a GPU if there is one):

- three training paths over the same model and micro-batch shape, with the same threads, warm-up steps
  excluded: ``bare`` (a plain PyTorch loop: the objective, torch AdamW, clipping, the schedule, one fixed batch
  already on the device), ``engine`` (the DeepSpeed engine on the same fixed batch, driven exactly as train.py's
  step drives it: target counts, their all-reduce, forward, backward, step, metric sums) and ``pretrain`` (the
  real ``electra_scale.engine.train.pretrain``, streaming shards from S3, with its data loader, logging and all);
- bare and engine steps are timed *interleaved* (one step of each in turn) and summarised by the median, so
  that a machine shared with other work slows both alike; pretrain is timed per logging window (median);
- for each path: step time, tokens/s, model TFLOP/s, MFU, and peak memory, as what the path adds to the
  process (CUDA max allocated, or peak RSS on CPU, over the level before the path started); the framework
  overhead is a path's step time over the bare loop's;
- the data path on one core: rank 0 of ``--data-world-size`` W through its share of an epoch, S3 ranged GETs ->
  block decode -> collated micro-batches (``PretrainStream`` with no worker processes), in samples/s and
  tokens/s per CPU-second, with the bytes and GETs it fetched against its 1/W share (docs/data.md).

Throughput counts real tokens, not padding: tokens/s is the batches' real tokens per second, and MFU =
model.training_flops of those tokens (matmuls, attention within each example, backward = 2 x forward) per
second / peak. With train.unpad=false the step also computes the padding, which shows as lost MFU. The peak is the GPU's
dense bf16 figure from model.GPU_PEAK_TFLOPS, or on CPU a measured matmul rate in the run's precision with the
same threads (so CPU MFU says how close the step gets to this CPU's own matmul speed).

Without ``--data`` the bench writes synthetic shards (random ids over the config's whole vocabulary, the
config's seq_len, written straight as blocks) into a private SeaweedFS it starts and stops itself;
``--scratch s3://bucket/prefix`` writes them to your S3 instead (and deletes them after), to measure a real
store. ``--data SHARDS`` uses an existing
shard set (its vocab and seq_len must match the config). The global batch is one micro-batch unless
``--accum`` says otherwise: step time and MFU are per micro-batch-sized step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.tools.bench.data import bench_data, data_source
from electra_scale.tools.bench.device import device_peak
from electra_scale.tools.bench.paths import (
    BareLoop,
    EngineLoop,
    bench_fixed_batch,
    bench_pretrain,
    fixed_batch,
    largest_micro_batch,
    user_errors,
)
from electra_scale.tools.bench.report import PathResult, as_dict, print_report

log = logging.getLogger("electra_scale")

PATHS = ("bare", "engine", "pretrain", "data")


def run_bench(
    config: list[str],
    overrides: list[str],
    *,
    steps: int = 20,
    warmup: int = 5,
    accum: int = 1,
    data: str | None = None,
    scratch: str | None = None,
    data_samples: int = 65536,
    block_samples: int | None = None,
    data_world_size: tuple[int, ...] = (1,),
    data_partitions: int | None = None,
    skip: tuple[str, ...] = (),
    threads: int | None = None,
    find_micro_batch: int = 0,
    ablate: tuple[tuple[str, tuple[str, ...]], ...] = (),
    rows_out: str | None = None,
) -> dict:
    import torch

    from electra_scale.data import load_manifest
    from electra_scale.engine.model import flops_per_token, paper_flops_per_token, param_counts, training_flops
    from electra_scale.engine.run_config import load_run_config
    from electra_scale.engine.step import real_counts
    from electra_scale.infra import launch, storage

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench measures one rank: run it as a single process, not under torchrun/srun")
    base = load_run_config(config, overrides)
    micro = base.train.micro_batch_size
    cfg = load_run_config(
        config,
        [
            *overrides,
            f"train.global_batch_size={micro * accum}",
            f"train.max_steps={max(warmup + steps, 1)}",
            "train.stop_at_step=null",
        ],
    )
    if data is not None and not storage.exists(storage.join(data, "manifest.json")):
        raise ConfigError(f"--data {data}: no manifest.json there; pass the output of `electra-scale prepare`")
    device = launch.init_distributed(launch.detect())
    if device.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    peak, peak_source, measured = device_peak(device, cfg.train.precision, cfg.train.peak_tflops)
    fpt = flops_per_token(cfg)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    report: dict = {
        "config": list(config),
        "overrides": list(overrides),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "precision": cfg.train.precision,
        "zero_stage": _zero_stage(cfg),
        "micro_batch_size": micro,
        "grad_accum": accum,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "warmup": warmup,
        "params": param_counts(cfg),
        "flops_per_token": fpt,
        "paper_flops_per_token": paper_flops_per_token(cfg),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "measured_matmul_tflops": measured,
    }

    results: dict[str, PathResult] = {}
    with (
        tempfile.TemporaryDirectory(prefix="electra-bench-") as tmp,
        data_source(data, scratch, Path(tmp), cfg, data_samples, block_samples) as shards,
    ):
        report["data_source"] = shards
        load_manifest(shards).check_compatible(cfg.model.vocab_size, cfg.data.seq_len)  # --data: fail first
        work = Path(tmp)
        if "data" not in skip:
            sweep = []
            for w in data_world_size:
                log.info("bench: the data path, rank 0 of %d, one core", w)
                sweep.append(bench_data(shards, cfg, w, data_partitions))
            results["data"] = sweep[0]
            if len(sweep) > 1:
                report["data_sweep"] = [as_dict(r) for r in sweep]
        if find_micro_batch:
            micro = largest_micro_batch(cfg, shards, device, find_micro_batch)
            cfg = load_run_config(
                config,
                [
                    *overrides,
                    f"train.micro_batch_size={micro}",
                    f"train.global_batch_size={micro * accum}",
                    f"train.max_steps={max(warmup + steps, 1)}",
                    "train.stop_at_step=null",
                ],
            )
            tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
            report.update(micro_batch_size=micro, tokens_per_step=tokens_per_step, found_micro_batch=True)
        batches, special = (None, None)
        if {"bare", "engine"} - set(skip):
            batches, special = fixed_batch(shards, cfg)
        loops = [loop for loop in (BareLoop, EngineLoop) if loop.name not in skip]
        if loops:
            log.info(
                "bench: %s, %d warm-up + %d timed steps, interleaved",
                " and ".join(loop.name for loop in loops),
                warmup,
                steps,
            )
            results.update(bench_fixed_batch(loops, cfg, batches, special, device, steps, warmup))
        if "pretrain" not in skip:
            log.info("bench: electra-scale pretrain, %d warm-up + %d timed steps", warmup, steps)
            bare = None
            try:
                if "bare" in results and not results["bare"].error:
                    bare = BareLoop(cfg, batches, special, device)  # interleaved with pretrain's windows
                    for _ in range(warmup):
                        bare.step()
                results["pretrain"] = bench_pretrain(cfg, shards, work, device, steps, warmup, bare)
            except user_errors():
                raise
            except Exception as err:  # report the path as failed, keep the others' figures
                log.exception("bench: the pretrain path failed")
                results["pretrain"] = PathResult("pretrain", error=f"{type(err).__name__}: {err}")
            finally:
                if bare is not None:
                    bare.close()
        if ablate:
            report["ablation"] = run_ablation(cfg, shards, work, device, steps, warmup, ablate, peak, rows_out)

    if batches is not None:  # the fixed batch's real tokens (not padding) and the FLOPs they need
        tokens, pairs = real_counts(batches)
        fixed = {"real_tokens_per_step": float(tokens), "flops_per_step": training_flops(cfg, tokens, pairs)}
        report.update(real_tokens_per_step=fixed["real_tokens_per_step"])
        report.update(pad_frac=1.0 - fixed["real_tokens_per_step"] / tokens_per_step)
    for name in ("bare", "engine", "pretrain"):
        r = results.get(name)
        if r is None or r.step_time_s is None:
            continue
        counts = r.extra if name == "pretrain" else fixed
        r.tokens_per_s = counts["real_tokens_per_step"] / r.step_time_s
        r.tflops = counts["flops_per_step"] / r.step_time_s / 1e12
        r.mfu = r.tflops / peak
    # Each path against the bare steps it was interleaved with (pretrain's own, when it had them).
    report["overhead"] = {}
    bare, engine, pre = results.get("bare"), results.get("engine"), results.get("pretrain")
    for name, r in (("engine", engine), ("pretrain", pre)):
        if not (bare and bare.step_time_s and r and r.step_time_s):
            continue
        ref_wall = r.extra.get("bare_step_time_s", bare.step_time_s)
        report["overhead"][f"{name}_vs_bare"] = r.step_time_s / ref_wall
        ref_cpu = r.extra.get("bare_cpu_time_s", bare.extra.get("cpu_time_s"))
        if device.type == "cpu" and ref_cpu and r.extra.get("cpu_time_s"):
            report["overhead"][f"{name}_vs_bare_cpu_time"] = r.extra["cpu_time_s"] / ref_cpu
    report["results"] = {name: as_dict(r) for name, r in results.items()}
    if "data" in report["results"]:
        report["data"] = report["results"]["data"]
    if "data" in results and "pretrain" in results and results["pretrain"].tokens_per_s:
        report["data_headroom"] = results["data"].tokens_per_s / results["pretrain"].tokens_per_s
    return report


def run_ablation(
    cfg, shards: str, work: Path, device, steps: int, warmup: int, levers, peak, rows_out: str | None = None
) -> list[dict]:
    """One lever at a time, in the same process and on the same data: for each ``KEY=V1,V2,...``, the real
    pretrain path with the bench's config and ``KEY=V`` for each value, one row each (step time, real tokens/s,
    MFU, peak memory, data wait), each naming every lever's setting (unpad, compile and its backend, ZeRO stage,
    precision). A setting that fails (out of memory, a kernel missing here) is a row with its error, and the
    others still run. ``rows_out``: each row is appended there (JSON Lines) as soon as it is measured, so a run
    killed at its time limit keeps the rows it finished."""
    from electra_scale.config import config_from_dict, read_layered

    rows = []

    def finish(row: dict) -> None:
        rows.append(row)
        if rows_out:
            Path(rows_out).parent.mkdir(parents=True, exist_ok=True)
            with open(rows_out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for key, values in levers:
        for value in values:
            trial = config_from_dict(read_layered([cfg.to_dict()], [f"{key}={value}"], "train.unpad=true"))
            row: dict = {"lever": key, "value": value, **settings(trial)}
            try:
                log.info("bench: ablation %s=%s, %d warm-up + %d timed steps", key, value, warmup, steps)
                r = bench_pretrain(trial, shards, work / f"ablation-{len(rows)}", device, steps, warmup)
            except user_errors():
                raise
            except Exception as err:  # e.g. out of memory at this setting: a row that says so
                log.exception("bench: ablation %s=%s failed", key, value)
                finish({**row, "error": f"{type(err).__name__}: {err}"})
                continue
            tokens_per_s = r.extra["real_tokens_per_step"] / r.step_time_s
            tflops = r.extra["flops_per_step"] / r.step_time_s / 1e12
            finish(
                {
                    **row,
                    "step_time_s": r.step_time_s,
                    "tokens_per_s": tokens_per_s,
                    "examples_per_s": trial.train.global_batch_size / r.step_time_s,
                    "pad_frac": r.extra["pad_frac"],
                    "tflops": tflops,
                    "mfu": tflops / peak,
                    "peak_memory_bytes": r.peak_memory_bytes,
                    "data_wait": r.extra.get("data_wait"),
                    "cpu_time_s": r.extra.get("cpu_time_s"),  # CPU only: the steadier figure on a busy machine
                    # The warm-up window, compilation included: a compile row's over the eager row's is its cost.
                    "first_window_s": r.extra.get("first_window_s"),
                    "error": None,
                }
            )
    return rows


def settings(cfg) -> dict:
    """Every lever's setting in a row: what the row measured, whichever lever it changed."""
    zero = _zero_stage(cfg)
    row = {
        "model": f"{cfg.model.num_layers} layers x {cfg.model.hidden_size}",
        "micro_batch_size": cfg.train.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "precision": cfg.train.precision,
        "unpad": cfg.train.unpad,
        "compile": cfg.train.compile_backend if cfg.train.compile else "off",
        "zero_stage": zero,
    }
    if cfg.train.precision != "fp32" and zero < 2:
        # DeepSpeed 0.19.8 wraps bf16 at ZeRO-1 in BF16_Optimizer and bf16/fp16 at ZeRO-0 in FP16_Optimizer, whose
        # step tests the gradient norm with bool(tensor), a host sync every step (docs/gpu.md): the row measures
        # that sync with the stage; ZeRO-2 has none (check_grad_overflow off).
        row["caveat"] = "host sync per step (DeepSpeed's BF16/FP16_Optimizer norm check)"
    return row


def _lever(text: str) -> tuple[str, tuple[str, ...]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2 (e.g. train.unpad=false,true), got {text!r}")
    return key, tuple(values.split(","))


def _zero_stage(cfg) -> int:
    from electra_scale.config import deepspeed_config

    return int(deepspeed_config(cfg, 1).get("zero_optimization", {}).get("stage", 0))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _world_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, action="append", help="YAML; repeat to layer files (later wins)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=_positive, default=20, help="timed steps per path (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    p.add_argument("--accum", type=_positive, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--data", help="existing shards (local or s3://) instead of synthetic ones")
    p.add_argument("--scratch", help="write the synthetic shards here (s3://bucket/prefix) instead of a private S3")
    p.add_argument("--data-samples", type=_positive, default=65536, help="synthetic shard set size (default 65536)")
    p.add_argument("--block-samples", type=_positive, default=None, help="synthetic examples per block (~1 MiB)")
    p.add_argument(
        "--data-world-size",
        type=_world_sizes,
        default=(1,),
        help="the data path plays rank 0 of this many ranks; a list (1,8,64,512) sweeps them (default 1)",
    )
    p.add_argument("--data-partitions", type=_positive, default=None, help="the stream's P (default: the world size)")
    p.add_argument("--skip", nargs="+", choices=PATHS, default=[], help="paths not to measure")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--find-micro-batch",
        type=_positive,
        nargs="?",
        const=1024,
        default=0,
        metavar="MAX",
        help="double the micro-batch until an engine step runs out of memory (up to MAX, default 1024); "
        "measure the largest that fits",
    )
    p.add_argument(
        "--ablate",
        type=_lever,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="also run pretrain once per value of this config key, all else equal (repeat for more levers); "
        "the report's `ablation` has a row per setting",
    )
    p.add_argument("--json-out", help="write the full report here as JSON")
    p.add_argument("--rows-out", help="append each ablation row here (JSON Lines) as soon as it is measured")


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.data and args.scratch:
        raise ConfigError("--data reads existing shards and --scratch writes synthetic ones: give one of them")
    report = run_bench(
        args.config,
        args.overrides,
        steps=args.steps,
        warmup=args.warmup,
        accum=args.accum,
        data=args.data,
        scratch=args.scratch,
        data_samples=args.data_samples,
        block_samples=args.block_samples,
        data_world_size=args.data_world_size,
        data_partitions=args.data_partitions,
        skip=tuple(args.skip),
        threads=args.threads,
        find_micro_batch=args.find_micro_batch,
        ablate=tuple(args.ablate),
        rows_out=args.rows_out,
    )
    print_report(report)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, r in report["results"].items() if r.get("error")]
    return 1 if failed else 0
