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
    Cut,
    EngineLoop,
    bench_fixed_batch,
    bench_pretrain,
    diverged,
    fixed_batch,
    largest_micro_batch,
    sigterm_cuts,
    user_errors,
)
from electra_scale.tools.bench.report import PathResult, as_dict, print_report

log = logging.getLogger("electra_scale")

PATHS = ("bare", "engine", "pretrain", "data")
# A bench cut by SIGTERM (the GPU check's step limit) exits like a run stopped by a signal: "not finished".
EXIT_CUT = 75


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
    ablate: tuple[tuple[tuple[str, str], ...], ...] = (),
    rows_out: str | None = None,
    json_out: str | None = None,
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
    fixed: dict = {}

    def publish(running: str | None = None) -> None:
        """The report so far, figures and all, written to ``json_out`` at once: each path's result is on disk
        the moment it finishes, so a run killed at its time limit keeps every path it completed."""
        _figures(report, results, fixed, peak, device)
        report["running"] = running  # the path in progress when this was written (None: between paths, or done)
        if json_out:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{json_out}.tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(json_out)  # never half a file, even when killed while writing

    running: str | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="electra-bench-") as tmp,
            data_source(data, scratch, Path(tmp), cfg, data_samples, block_samples) as shards,
        ):
            report["data_source"] = shards
            load_manifest(shards).check_compatible(cfg.model.vocab_size, cfg.data.seq_len)  # --data: fail first
            work = Path(tmp)
            if "data" not in skip:
                running = "data"
                sweep = []
                for w in data_world_size:
                    log.info("bench: the data path, rank 0 of %d, one core", w)
                    sweep.append(bench_data(shards, cfg, w, data_partitions))
                results["data"] = sweep[0]
                if len(sweep) > 1:
                    report["data_sweep"] = [as_dict(r) for r in sweep]
                publish()
            if find_micro_batch:
                running = "find-micro-batch"
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
                tokens, pairs = real_counts(batches)  # the fixed batch's real tokens (not padding), their FLOPs
                fixed.update(real_tokens_per_step=float(tokens), flops_per_step=training_flops(cfg, tokens, pairs))
                report.update(real_tokens_per_step=fixed["real_tokens_per_step"])
                report.update(pad_frac=1.0 - fixed["real_tokens_per_step"] / tokens_per_step)
            loops = [loop for loop in (BareLoop, EngineLoop) if loop.name not in skip]
            bare = None  # the bare loop, kept warm for pretrain's windows to interleave with
            try:
                if loops:
                    running = " and ".join(loop.name for loop in loops)
                    log.info("bench: %s, %d warm-up + %d timed steps, interleaved", running, warmup, steps)
                    publish(running)
                    keep = "bare" if "pretrain" not in skip else None
                    timed, bare = bench_fixed_batch(loops, cfg, batches, special, device, steps, warmup, keep)
                    results.update(timed)
                    publish()
                if "pretrain" not in skip:
                    running = "pretrain"
                    log.info("bench: electra-scale pretrain, %d warm-up + %d timed steps", warmup, steps)
                    publish(running)
                    try:
                        if bare is None and "bare" in results and not results["bare"].error:
                            bare = BareLoop(cfg, batches, special, device)  # interleaved with pretrain's windows
                            for _ in range(warmup):
                                bare.step()
                        results["pretrain"] = bench_pretrain(cfg, shards, work, device, steps, warmup, bare)
                    except diverged() as err:  # a measured outcome of these settings, not the user's error
                        results["pretrain"] = PathResult("pretrain", error=f"{type(err).__name__}: {err}")
                        results["pretrain"].extra["diverged"] = True
                    except user_errors():
                        raise
                    except Exception as err:  # report the path as failed, keep the others' figures
                        log.exception("bench: the pretrain path failed")
                        results["pretrain"] = PathResult("pretrain", error=f"{type(err).__name__}: {err}")
                    publish()
                    if results["pretrain"].extra.get("cut"):
                        raise Cut("SIGTERM")
            finally:
                if bare is not None:
                    bare.close()
            if ablate:
                running = "ablation"
                report["ablation"] = []
                publish(running)
                run_ablation(cfg, shards, work, device, steps, warmup, ablate, peak, rows_out, report["ablation"])
    except Cut:
        # SIGTERM: the path (or ablation row) in progress is marked cut, nothing more starts, the report is written.
        log.warning("bench: cut by SIGTERM during %s; no other path or row starts", running)
        report["cut"] = running or "start-up"
        if running in results:
            results[running].extra["cut"] = True
    publish()
    return report


def _figures(report: dict, results: dict[str, PathResult], fixed: dict, peak: float, device) -> None:
    """Each timed path's tokens/s, TFLOP/s and MFU from its step time and real tokens, and each path against
    the bare loop's steps it was interleaved with."""
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


def run_ablation(
    cfg, shards: str, work: Path, device, steps: int, warmup: int, ablate, peak, rows_out=None, rows=None
) -> list[dict]:
    """A row per setting, in the same process and on the same data: the real pretrain path with the bench's
    config and the row's overrides (``ablate``: one tuple of ``(key, value)`` pairs per row; most rows change one
    lever, a few several, e.g. compile with an equal-real-tokens micro-batch). Each row has its step time, real
    tokens/s, MFU, peak memory and data wait, and names every lever's setting (unpad, compile and its backend,
    ZeRO stage, precision). A setting that fails (out of memory, a kernel missing here) or diverges (a non-finite
    loss: engine/guard.py) is a row with its error, and the others still run. ``rows_out``: each row is appended
    there (JSON Lines) as soon as it is measured, after a ``"status": "started"`` line, so that a run killed at
    its time limit keeps the rows it finished and shows which one it was in. SIGTERM (``Cut``, or pretrain
    stopped by it) marks the row in progress cut and starts no other."""
    from electra_scale.config import config_from_dict, read_layered

    rows = [] if rows is None else rows

    def append(row: dict) -> None:
        if rows_out:
            Path(rows_out).parent.mkdir(parents=True, exist_ok=True)
            with open(rows_out, "a") as f:
                f.write(json.dumps(row) + "\n")

    def finish(row: dict) -> None:
        rows.append(row)
        append(row)

    for index, pairs in enumerate(ablate):
        overrides = [f"{key}={value}" for key, value in pairs]
        keys = {key for key, _ in pairs}
        if "train.micro_batch_size" in keys and "train.global_batch_size" not in keys:  # the same accumulation
            accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
            overrides.append(f"train.global_batch_size={int(dict(pairs)['train.micro_batch_size']) * accum}")
        trial = config_from_dict(read_layered([cfg.to_dict()], overrides, "train.unpad=true"))
        row: dict = {
            "index": index,
            "lever": "+".join(key for key, _ in pairs),
            "value": "+".join(value for _, value in pairs),
            "setting": " ".join(f"{key.removeprefix('train.')}={value}" for key, value in pairs),
            **settings(trial),
        }
        append({**row, "status": "started"})
        try:
            log.info("bench: ablation %s, %d warm-up + %d timed steps", " ".join(overrides), warmup, steps)
            r = bench_pretrain(trial, shards, work / f"ablation-{index}", device, steps, warmup)
        except Cut:
            finish({**row, "cut": True, "error": None})
            raise
        except diverged() as err:  # a measured outcome of this setting: its row, then the next row
            log.warning("bench: ablation %s diverged: %s", " ".join(overrides), err)
            finish({**row, "diverged": True, "error": f"{type(err).__name__}: {err}"})
            continue
        except user_errors():
            raise
        except Exception as err:  # e.g. out of memory at this setting: a row that says so
            log.exception("bench: ablation %s failed", " ".join(overrides))
            finish({**row, "error": f"{type(err).__name__}: {err}"})
            continue
        cut = bool(r.extra.get("cut"))
        if r.step_time_s is None:  # cut in its warm-up window: nothing timed
            finish({**row, "cut": True, "error": None, "peak_memory_bytes": r.peak_memory_bytes})
            raise Cut("SIGTERM")
        tokens_per_s = r.extra["real_tokens_per_step"] / r.step_time_s
        tflops = r.extra["flops_per_step"] / r.step_time_s / 1e12
        finish(
            {
                **row,
                "step_time_s": r.step_time_s,
                "steps": r.steps,  # timed steps: fewer than asked when cut
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
                **({"cut": True} if cut else {}),
            }
        )
        if cut:
            raise Cut("SIGTERM")
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


def _lever(text: str) -> list[tuple[tuple[str, str], ...]]:
    """``KEY=V1,V2``: a row per value; ``K1=V K2=W`` (space-separated): one row with every one of them set."""
    items = text.split()
    if len(items) > 1:
        pairs = tuple(item.partition("=") for item in items)
        if any(not sep or not key or not value for key, sep, value in pairs):
            raise argparse.ArgumentTypeError(f"expected K1=V K2=W (one row, several keys), got {text!r}")
        return [tuple((key, value) for key, _, value in pairs)]
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2 (e.g. train.unpad=false,true), got {text!r}")
    return [((key, value),) for value in values.split(",")]


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
        help="also run pretrain once per value of this config key, all else equal (repeat for more levers; "
        "'K1=V K2=W', space-separated, is one row with both set); the report's `ablation` has a row per setting",
    )
    p.add_argument("--json-out", help="write the report here as JSON, rewritten as each path finishes")
    p.add_argument("--rows-out", help="append each ablation row here (JSON Lines) as soon as it is measured")


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.data and args.scratch:
        raise ConfigError("--data reads existing shards and --scratch writes synthetic ones: give one of them")
    with sigterm_cuts():
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
            ablate=tuple(row for rows in args.ablate for row in rows),
            rows_out=args.rows_out,
            json_out=args.json_out,
        )
    print_report(report)
    if report.get("cut"):
        return EXIT_CUT
    failed = [name for name, r in report["results"].items() if r.get("error")]
    return 1 if failed else 0
