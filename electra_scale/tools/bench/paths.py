"""The timed training paths: a bare PyTorch loop, the DeepSpeed engine on a fixed batch, and the real pretrain."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path

from electra_scale.config import ConfigError
from electra_scale.tools.bench.device import current_memory, dtype_of, free_memory, peak_memory, reset_peak_memory, sync
from electra_scale.tools.bench.report import PathResult

log = logging.getLogger("electra_scale")


class Cut(BaseException):
    """SIGTERM (``timeout`` at the GPU check's step limit) reached the bench outside a pretrain run: the path
    or row in progress is recorded as cut and no other starts. A BaseException, so that the paths' ``except
    Exception`` (a failed path: report it, go on) does not swallow it."""


def sigterm_cuts():
    """While the bench runs, SIGTERM raises ``Cut`` (pretrain's own handler takes it during a pretrain run and
    stops that run after its step; bench_pretrain then marks the result cut)."""
    import signal

    def handler(signum, _frame):
        raise Cut(signal.Signals(signum).name)

    return _Handler(signal.SIGTERM, handler)


class _Handler(contextlib.AbstractContextManager):
    def __init__(self, sig, handler):
        self.sig, self.handler, self.previous = sig, handler, None

    def __enter__(self):
        import signal

        self.previous = signal.signal(self.sig, self.handler)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(self.sig, self.previous)
        return False


def user_errors() -> tuple[type[Exception], ...]:
    """Bad config or data: the user's to fix, so they stop the bench instead of marking one path failed. A run
    that diverged (engine/guard.py's Diverged, a ConfigError for the CLI's exit 2) is not one of them here: it is
    a measured outcome of that setting, so the path or ablation row records it and the others still run."""
    from electra_scale.data.shards import DataError

    return (ConfigError, DataError)


def diverged() -> type[Exception]:
    from electra_scale.engine.guard import Diverged

    return Diverged


def fixed_batch(shards: str, cfg):
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
    return torch.autocast(device.type, dtype=dtype_of(precision))


class BareLoop:
    """The least a training step can do: forward, backward, clip, AdamW, schedule, on a batch already on the
    device. In bf16 the weights are bf16, as the engine's are (DeepSpeed's bf16 mode runs the model in bf16 and
    keeps fp32 master weights in the optimizer, which the bare loop does without); fp16 is torch's autocast
    with a loss scaler. On CUDA the AdamW is torch's fused one, as DeepSpeed's FusedAdam. train.unpad and
    train.compile apply here as in the engine (the fixed batch packed once, the encoders' layers compiled), so
    that "engine vs bare" compares like with like."""

    name = "bare"

    def __init__(self, cfg, batches, special, device):
        import torch

        from electra_scale.engine.masking import count_targets
        from electra_scale.engine.model import prepare_encoders
        from electra_scale.engine.objective import build_objective
        from electra_scale.engine.optim import electra_schedule, param_groups
        from electra_scale.engine.step import objective_inputs, settle_device

        self.cfg, self.device, p = cfg, device, cfg.optim
        settle_device(cfg, device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_objective(cfg, special).to(device)
        prepare_encoders(self.model, cfg.train)  # compile (and activation checkpointing), as build_engine does
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
        self.batches = [objective_inputs(mb, cfg, device) for mb in batches]  # packed too, with train.unpad

    def step(self) -> None:
        import torch

        from electra_scale.engine.objective import training_loss

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

        from electra_scale.engine.objective import build_objective
        from electra_scale.engine.step import build_engine

        self.cfg, self.device, self.batches, self.special = cfg, device, batches, special
        torch.manual_seed(cfg.train.seed)
        self.engine = build_engine(cfg, build_objective(cfg, special), 1, device)
        self.sums: dict = defaultdict(float)

    def step(self) -> None:
        from electra_scale.engine.step import train_step

        self.engine.get_lr()
        for out in train_step(self.engine, self.batches, self.cfg, self.device, 1):
            for key, value in out.items():
                self.sums[key] += value.detach()

    def close(self) -> None:
        self.engine.destroy()
        del self.engine, self.sums


def bench_fixed_batch(
    loops: list[type], cfg, batches, special, device, steps: int, warmup: int, keep: str | None = None
) -> tuple[dict[str, PathResult], object | None]:
    """Build each loop and run its warm-up (peak memory: what the loop adds to the process), then time the
    loops' steps *interleaved*, in turns of ``warmup`` steps (the length of pretrain's timed windows), so that a
    busy machine slows them alike. Step time is the median of the timed steps. ``keep``: the loop of that name
    is returned built and warm, not closed (pretrain's windows interleave with it: no second build of a Large
    model and its compile)."""
    import statistics

    built, results, kept = [], {}, None
    try:
        for cls in loops:
            free_memory(device)
            baseline = current_memory(device)
            reset_peak_memory(device)
            loop = None
            try:
                loop = cls(cfg, batches, special, device)
                for _ in range(warmup):
                    loop.step()
                sync(device)
            except user_errors():
                raise
            except Exception as err:  # report this path as failed and keep measuring the others
                log.exception("bench: the %s path failed", cls.name)
                results[cls.name] = PathResult(cls.name, error=f"{type(err).__name__}: {err}")
                if loop is not None:
                    loop.close()
                continue
            built.append(loop)
            results[cls.name] = PathResult(cls.name, steps=steps, peak_memory_bytes=peak_memory(device) - baseline)
        times: dict[str, list[float]] = {loop.name: [] for loop in built}
        cpu: dict[str, list[float]] = {loop.name: [] for loop in built}
        block = max(warmup, 1)  # steps of one loop in a row, as pretrain's logging windows
        for first in range(0, steps, block):
            for loop in [loop for loop in built if not results[loop.name].error]:
                try:
                    for _ in range(min(block, steps - first)):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        loop.step()
                        sync(device)
                        times[loop.name].append(time.perf_counter() - start)
                        cpu[loop.name].append(time.process_time() - start_cpu)
                except Exception as err:  # e.g. out of memory with both loops resident: report it, go on
                    log.exception("bench: the %s path failed", loop.name)
                    results[loop.name].error = f"{type(err).__name__}: {err}"
        kept = next((loop for loop in built if loop.name == keep and not results[loop.name].error), None)
    finally:
        for loop in built:
            if loop is not kept:
                loop.close()
        free_memory(device)
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
    return results, kept


@contextlib.contextmanager
def threads_pinned(device):
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
    from electra_scale.engine.train import pretrain

    window = warmup or steps
    windows = -(-steps // window)  # whole windows covering at least `steps`
    total = (windows + (1 if warmup else 0)) * window
    run_cfg = copy.deepcopy(cfg)
    run_cfg.data.shards = shards
    run_cfg.run.output_dir, run_cfg.run.cache_dir = str(workdir / "pretrain-run"), str(workdir / "pretrain-cache")
    run_cfg.run.progress = run_cfg.run.record_samples = False
    run_cfg.run.trackers = []
    run_cfg.train.max_steps, run_cfg.train.stop_at_step, run_cfg.train.log_every = total, None, window
    validate(run_cfg)
    free_memory(device)
    baseline = current_memory(device)
    reset_peak_memory(device)
    hook = _BetweenWindows(bare, window, total, device)
    # launch.init_distributed gives a CPU rank all the cores: keep the threads the other paths ran with.
    with threads_pinned(device):
        outcome = pretrain(run_cfg, on_log=hook, save=False)  # no checkpoint: GBs per row at Large
    history = outcome["history"]
    # Each record covers the steps since the previous one.
    steps_in = [r["step"] - a for a, r in zip([0] + [r["step"] for r in history[:-1]], history)]
    # A run stopped by SIGTERM (the step's time limit) logs a short last window, at the step it stopped at: only
    # whole windows are timed, and the result says it was cut, so that a cut row never reads as a normal one.
    cut = bool(outcome.get("preempted"))
    whole = list(zip(steps_in, history))
    if cut and whole and whole[-1][0] != window:
        whole.pop()
    timed_records = whole[1 if warmup else 0 :]
    timed = [(n, n * r["step_time_s"]) for n, r in timed_records]
    records = [r for _, r in timed_records]
    result = PathResult(
        "pretrain",
        steps=sum(n for n, _ in timed),
        peak_memory_bytes=peak_memory(device) - baseline,
        extra={"cut": True} if cut else {},
    )
    if timed:  # none when cut during the warm-up window: the result is the cut alone, no figures
        result.step_time_s = statistics.median(t / n for n, t in timed)
        result.extra.update(
            {
                "step_time_mean_s": sum(t for _, t in timed) / sum(n for n, _ in timed),
                # What its streamed batches held: real tokens and their FLOPs per step (train.py counts them).
                "real_tokens_per_step": statistics.fmean(r["tokens_per_s"] * r["step_time_s"] for r in records),
                "flops_per_step": statistics.fmean(r["tflops"] * 1e12 * r["step_time_s"] for r in records),
                "pad_frac": statistics.fmean(r["pad_frac"] for r in records),
            }
        )
    if warmup and whole:  # the untimed first window: start-up and warm-up, train.compile's compilation included
        result.extra["first_window_s"] = steps_in[0] * history[0]["step_time_s"]
    waits = [r["data_wait"] for r in records if r.get("data_wait") is not None]
    if waits:  # the share of the step the rank spent blocked on its next batch
        result.extra["data_wait"] = statistics.median(waits)
    if device.type == "cpu" and not cut and len(hook.window_cpu) == len(history) - 1 and len(history) > 1:
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
                sync(self.device)
                self.bare_wall.append(time.perf_counter() - start)
                self.bare_cpu.append(time.process_time() - start_cpu)
        self._window_start_cpu = time.process_time()


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
            batches, special = fixed_batch(shards, trial)
            loop = EngineLoop(trial, batches, special, device)
            for _ in range(2):
                loop.step()
            sync(device)
        except torch.OutOfMemoryError:
            log.info("bench: micro-batch %d does not fit", micro)
            break
        finally:
            if loop is not None:
                loop.close()
            free_memory(device)
        found, micro = micro, micro * 2
        log.info("bench: micro-batch %d fits", found)
    if not found:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} does not fit on {device}; lower it")
    return found
