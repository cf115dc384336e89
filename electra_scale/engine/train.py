"""The pretraining loop. Reads top to bottom: set up, resume, then step / log / checkpoint until done.

One optimizer step = one *global* batch of ``train.global_batch_size`` examples, split into
``grad_accum`` micro-batches on each of ``world_size`` ranks. The global batch's content does not depend on
the number of ranks (see data/stream.py) and the loss is normalised by the global batch's counts (see
objective.py), so a run is the same run on 1 rank or on 64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from electra_scale.config import Config, ConfigError, cache_root, deepspeed_config
from electra_scale.data.shards import DataError
from electra_scale.data.stream import PretrainStream, check_same_mix, load_sources, resolve_partitions
from electra_scale.data.tokenizer import continuation_ids, load_tokenizer, model_dir_tokenizer
from electra_scale.engine.checkpoint import Checkpointer
from electra_scale.engine.evaluate import Evaluator, describe
from electra_scale.engine.guard import check_finite
from electra_scale.engine.lease import LeaseLost, hold
from electra_scale.engine.metrics import DiscriminatorHealth, MetricsLogger, SampleLog
from electra_scale.engine.model import SHAPE_KEYS, peak_tflops, training_flops
from electra_scale.engine.objective import build_objective, summarize
from electra_scale.engine.pretrained import check_vocabulary, fetch_weights, load_weights
from electra_scale.engine.step import all_reduce_host, build_engine, real_counts, settle_device, train_step
from electra_scale.infra import launch, storage

log = logging.getLogger("electra_scale")

# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: "try again". SLURM scripts requeue
# on it and the Kubernetes podFailurePolicy restarts the pod on it; re-running the command resumes.
EXIT_PREEMPTED = 75


class StopRequest:
    """SIGTERM (Kubernetes, cloud preemption) or SIGUSR1 (SLURM --signal) asks the run to stop. The handler
    only records it: all ranks agree on the stop step through ``StopVote``, finish it, and then save. A second
    signal during the save changes nothing."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def restore(self) -> None:
        """The handlers as they were: a caller that runs pretrain in-process (bench) gets its own back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.info("%s received: stopping after this step with a checkpoint", self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def cache_dir_for(cfg: Config) -> Path:
    """Node-local scratch for a run whose output is on S3 (checkpoint staging, metrics)."""
    if cfg.run.cache_dir:
        return Path(cfg.run.cache_dir)
    if not storage.is_s3(cfg.run.output_dir):
        return Path(cfg.run.output_dir)
    bucket_path = cfg.run.output_dir[len("s3://") :].replace("/", "_")
    return cache_root() / bucket_path


class StopVote:
    """Do all ranks stop after this step? Each step starts an asynchronous all-reduce of this rank's stop flag
    on the host group and reads the previous step's, done long since: no rank waits for another to ask. So a
    signal that reaches any rank during step s stops every rank after step s + 1, all at the same step. The
    second flag is rank 0's "the lease was lost": every rank then stops without saving (engine/lease.py)."""

    def __init__(self, group=None):
        self.group, self.pending = group, None

    def cast(self, requested: bool, lease_lost: bool = False) -> tuple[bool, bool]:
        """Vote; returns (some rank asked to stop, the lease was lost) as of the previous step."""
        previous = self.close()
        flags = torch.tensor([float(requested), float(lease_lost)])
        self.pending = (dist.all_reduce(flags, group=self.group, async_op=True), flags)
        return previous

    def close(self) -> tuple[bool, bool]:
        if self.pending is None:
            return False, False
        work, flags = self.pending
        work.wait()
        self.pending = None
        return bool(flags[0] > 0), bool(flags[1] > 0)


def pretrain(cfg: Config, on_log: Callable[[int, dict], None] | None = None, save: bool = True) -> dict:
    """Pretrain as ``cfg`` says, resuming from its output dir's newest checkpoint. ``on_log(step, record)`` is
    called on rank 0 after each logging step, with the record written to metrics.jsonl (bench times between
    them); it runs outside the timed windows. ``save=False``: no checkpoint at all (bench)."""
    stop = StopRequest()  # from the start: a signal during set-up stops the run after its first step
    try:
        return _pretrain(cfg, on_log, save, stop)
    finally:
        stop.restore()


def _pretrain(cfg: Config, on_log, save: bool, stop: StopRequest) -> dict:
    # ---------------------------------------------------------------------------------------- set up
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
    dist_env = launch.detect()
    device = launch.init_distributed(dist_env)
    settle_device(cfg, device)  # TF32 for a bf16/fp16 run; fp32 refused with unpad on a GPU (before any write)
    host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None  # collective: every rank
    world, main = dist_env.world_size, dist_env.is_main
    # The inputs first, so that a run that cannot start leaves nothing behind; then the output.
    sources = load_sources(cfg.data.resolved_sources())  # one tokenizer and seq_len for all, or refused
    for source in sources:
        source.manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
    special = sources[0].manifest.special_ids
    fewest = min(s.manifest.num_samples for s in sources)  # every source is cut into the same P partitions
    blocker = storage.file_in_the_way(cfg.run.output_dir)
    if blocker is not None:
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir} cannot be a directory: {blocker} is a file; set run.output_dir "
            "to a directory (a new one starts a new run, a run's own resumes it)"
        )
    if main:
        storage.check_writable(cfg.run.output_dir)  # bad endpoint / credentials / bucket: fail now, clearly
    # One writer per run: rank 0 takes the output dir's lease before anything reads its checkpoints or touches
    # their node-local staging; a live run's lease refuses this one here, in one line (engine/lease.py).
    lease = hold(cfg.run.output_dir, cfg.run.lease_timeout_s, cfg.run.take_over, main, host_group)

    continuation = word_pieces(cfg) if cfg.objective.whole_word_mask else None
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    objective = build_objective(cfg, special, continuation)
    total_steps = cfg.train.max_steps
    stop_step = cfg.train.stop_at_step or total_steps
    ds_config = deepspeed_config(cfg, world)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    # Find (and verify) the checkpoint to resume before building the engine: one saved on another number of
    # ranks is converted to DeepSpeed's universal format, which the engine must be configured to load.
    cache = cache_dir_for(cfg)
    checkpointer = Checkpointer(cfg.run.output_dir, cache, dist_env, cfg.checkpoint, lease)

    def check_data(saved: dict) -> None:  # before converting anything: refuse what cannot continue this run
        check_same_model(cfg, saved)
        resolve_partitions(cfg.data.partitions, world, fewest, saved_partitions(saved))
        check_same_mix(saved.get("data_position", {}), sources)

    resume_from = checkpointer.select(zero_stage, check_state=check_data)
    if cfg.model.init_from:
        if resume_from is not None:  # the run's own checkpoint is newer than where it started
            log.info("resuming %s: model.init_from (%s) is not used", cfg.run.output_dir, cfg.model.init_from)
        else:
            check_vocabulary(cfg.model.init_from, cfg.data.tokenizer_prefix)
            init_weights(cfg, objective, cache, dist_env.local_rank)
    engine = build_engine(cfg, objective, world, device, universal=resume_from is not None and resume_from.universal)
    torch.manual_seed(cfg.train.seed + 1 + dist_env.rank)  # dropout differs between ranks
    state = checkpointer.load(engine, resume_from) if resume_from is not None else {}
    start_step = state.get("step", 0)
    if state and state["global_batch_size"] != cfg.train.global_batch_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} but the checkpoint was trained with "
            f"{state['global_batch_size']}; keep it to continue the same data order and schedule"
        )

    stream = PretrainStream(
        sources,
        seed=cfg.train.seed,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=dist_env.rank,
        world_size=world,
        partitions=resolve_partitions(cfg.data.partitions, world, fewest, saved_partitions(state)),
        shuffle_blocks=cfg.data.shuffle_blocks,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch,
        start_step=start_step,
        on_corrupt_shard=cfg.data.on_corrupt_shard,
        pin_memory=device.type == "cuda",  # copied to the GPU without blocking the host
    )
    grad_accum = stream.grad_accum
    # The held-out set is read now, with the other inputs: a bad one stops the run before anything is written.
    evaluator = Evaluator(cfg, sources[0].manifest, dist_env.rank, world, device) if cfg.eval.shards else None
    extra_files = _checkpoint_extras(cfg) if main else {}
    # The first step's batches come before anything is written: a shard that cannot be read (truncated, or
    # corrupt under data.on_corrupt_shard=error) stops a new run with its output dir as it was. No rank writes
    # until every rank has its batches: one that fails exits, and its launcher ends the others at the barrier.
    batches = iter(stream)
    first_batches = next(batches) if start_step < stop_step else None
    dist.barrier(group=host_group)
    metrics = None
    if main:
        metrics = MetricsLogger(
            cfg.run.output_dir,
            cache,
            start_step,
            cfg.run.trackers,
            config=cfg.to_dict(),
            tracker_project=cfg.run.tracker_project,
            mlflow_tracking_uri=cfg.run.mlflow_tracking_uri,
        )
    samples = SampleLog(cache, dist_env.rank, world, start_step) if cfg.run.record_samples else None
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len  # positions, padding included
    peak = peak_tflops(cfg.train.peak_tflops)
    if main:
        log.info(
            "pretrain %s: steps %d -> %d of %d, %d rank(s) x micro-batch %d x accumulation %d = %d per step; "
            "data in %d partitions (%d per rank)",
            cfg.objective.kind,
            start_step,
            stop_step,
            total_steps,
            world,
            cfg.train.micro_batch_size,
            grad_accum,
            cfg.train.global_batch_size,
            stream.layout.partitions,
            stream.layout.partitions // world,
        )
        if len(sources) > 1:
            log.info(
                "data mixed from %d sources: %s",
                len(sources),
                ", ".join(
                    f"{s.name} {w:.3g} ({s.manifest.num_samples:,} examples, {s.prefix})"
                    for s, w in zip(sources, stream.mix.weights)
                ),
            )
    progress = _progress(cfg, main, start_step, stop_step)
    health = DiscriminatorHealth(cfg.optim.warmup_steps, total_steps)

    # ---------------------------------------------------------------------------------------- train
    done, preempted, lease_lost = start_step, False, False
    saved_at = start_step or None  # the newest checkpoint: where a diverged run resumes (engine/guard.py)
    vote = StopVote(host_group)
    history: list[dict] = []
    evaluations: list[dict] = []
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    real_tokens, real_pairs = 0, 0  # this rank's, in the window: throughput and FLOPs count what is not padding
    skipped_logged = 0
    mixed = len(sources) > 1
    source_examples = stream.source_examples(start_step)  # all ranks' draws of each source so far
    source_window = [0] * len(sources)  # this rank's, in the window
    sums: dict[str, torch.Tensor | float] = defaultdict(float)
    for step in range(start_step, stop_step):
        waited = time.perf_counter()
        micro_batches, first_batches = first_batches or next(batches), None
        data_wait += time.perf_counter() - waited  # the step blocked on its input for this long
        tokens, pairs = real_counts(micro_batches)
        real_tokens, real_pairs = real_tokens + tokens, real_pairs + pairs
        if mixed:
            drawn = torch.bincount(torch.cat([mb.sources for mb in micro_batches]), minlength=len(sources))
            source_window = [a + b for a, b in zip(source_window, drawn.tolist())]
        # A rank asked at the previous step: this one is the last. A lost lease: no step more, and no save.
        preempted, lease_lost = vote.cast(stop.requested, lease.lost is not None)
        if lease_lost:
            break
        lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler advances after it)
        for out in train_step(engine, micro_batches, cfg, device, world):
            for key, value in out.items():
                sums[key] += value.detach()  # stays on the device: one sync per logging step, not per metric
        window_steps += 1
        done = step + 1
        if samples is not None:
            samples.log(
                done,
                [int(p) for mb in micro_batches for p in mb.positions],
                [int(x) for mb in micro_batches for x in mb.samples],
                [stream.source_names[int(k)] for mb in micro_batches for k in mb.sources] if mixed else None,
            )

        if done % cfg.train.log_every == 0 or done == stop_step or preempted:
            keys = sorted(sums)
            values = [sums[k] for k in keys]  # device tensors, the AUC's histograms among them
            values += [float(len(stream.skipped) - skipped_logged), data_wait, float(real_tokens), float(real_pairs)]
            values += [float(n) for n in source_window]  # rides along: no collective of its own
            summed = all_reduce_host(values, host_group)
            *reduced_values, skipped_new, wait_sum, tokens, pairs = summed[: len(summed) - len(sources)]
            drawn = summed[len(summed) - len(sources) :]
            reduced = dict(zip(keys, reduced_values))
            source_examples = [n + round(d) for n, d in zip(source_examples, drawn)]
            source_window = [0] * len(sources)
            skipped_logged = len(stream.skipped)
            elapsed = time.perf_counter() - window_start
            record = summarize(reduced, cfg.objective.disc_weight)
            tflops = training_flops(cfg, tokens, pairs) / elapsed / 1e12
            record.update(
                lr=lr,
                grad_norm=float(engine.get_global_grad_norm() or 0.0),
                step_time_s=elapsed / window_steps,
                tokens_per_s=tokens / elapsed,  # real tokens (not padding), all ranks
                pad_frac=1.0 - tokens / (window_steps * tokens_per_step),  # positions of the batches that are padding
                tflops=tflops,
                mfu=tflops / peak / world if peak else None,
                samples_seen=done * cfg.train.global_batch_size,
                # Share of the window's wall time the ranks spent blocked on their next batch (mean over ranks).
                data_wait=wait_sum / world / elapsed,
                skipped_blocks=skipped_new,  # bad blocks left out in this window, all ranks (data.on_corrupt_shard)
            )
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):  # every rank alike
                _stop_diverged(done, record["loss"], record["grad_norm"], lr, saved_at, vote, checkpointer, lease)
            if mixed:  # each source's examples so far, and the epochs of it they make (each source has its own)
                record["source_examples"] = dict(zip(stream.source_names, source_examples))
                record["source_epochs"] = {
                    s.name: round(n / layout.epoch_size, 4)
                    for s, n, layout in zip(sources, source_examples, stream.layouts)
                }
            if main:
                metrics.log(done, record)
                history.append({"step": done, **record})
                progress.report(done, record)
                health.check(done, record)
                if on_log is not None:
                    on_log(done, record)
            sums.clear()
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            real_tokens, real_pairs = 0, 0

        # Held-out evaluation, before the checkpoint of the same step (a resume from it does not evaluate again);
        # skipped on the step a signal stops at, which should save and exit quickly.
        if evaluator is not None and evaluator.due(done) and not preempted:
            evaluation = evaluator.run(engine, done, host_group)
            if main:
                metrics.log(done, evaluation, split="eval")
                evaluations.append({"step": done, **evaluation})
                log.info(describe(done, evaluation))
            window_start += evaluation["eval_time_s"]  # the next training record's throughput leaves it out

        if save and (done % cfg.checkpoint.every_steps == 0 or done == stop_step or preempted):
            norm = engine.get_global_grad_norm()  # global, the same on every rank; a checkpoint step syncs anyway
            if norm is not None and not math.isfinite(float(norm)):
                _stop_diverged(done, None, float(norm), lr, saved_at, vote, checkpointer, lease)
            trainer_state = {
                "step": done,
                "model": {key: getattr(cfg.model, key) for key in SHAPE_KEYS},
                "world_size": world,
                "zero_stage": zero_stage,
                "global_batch_size": cfg.train.global_batch_size,
                "tokens_seen": done * tokens_per_step,
                "data_position": stream.position(done),
                "objective": cfg.objective.kind,
                "embedding_sharing": cfg.objective.embedding_sharing,
            }
            # metrics.jsonl first: once the checkpoint is marked complete (in the background), a kill -9 must not
            # leave a resume point whose steps the remote log lacks (a resume drops lines past it, never adds).
            if main and lease.lost is None:
                metrics.sync()
            checkpointer.save(engine, done, trainer_state, extra_files)
            saved_at = done
        if preempted:
            break

    lease_lost = vote.close()[1] or lease_lost  # the last vote's all-reduce: no collective is left in flight
    checkpointer.close()  # the last checkpoint is complete (uploaded, marked) before the run reports done
    if lease_lost or lease.lost is not None:  # metrics.jsonl is the new holder's now: not synced
        raise LeaseLost(lease.lost or "rank 0 found the run's lease taken by another run; this rank stops too")
    if preempted and main:
        log.info("stopped at step %d by a signal; re-run the same command to resume", done)

    if main and start_step >= stop_step:
        log.info("nothing to do: the run is already at step %d", start_step)
    progress.close()
    if metrics is not None:
        metrics.close()
    if samples is not None:
        samples.close()
    lease.release()  # the next run on this output dir starts without waiting
    return {
        "start_step": start_step,
        "end_step": done,
        "preempted": preempted,
        "history": history,
        "evaluations": evaluations,
        "world_size": world,
    }


def _stop_diverged(step, loss, grad_norm, lr, saved_at, vote, checkpointer, lease) -> None:
    """A non-finite loss or gradient norm: the earlier checkpoints finish (uploaded, marked), this step's is never
    written, the lease is let go, and the run stops in one line (exit 2: engine/guard.py)."""
    vote.close()
    checkpointer.close()
    lease.release()
    check_finite(step, loss, grad_norm, lr, saved_at)


def init_weights(cfg: Config, objective: torch.nn.Module, cache: Path, local_rank: int) -> None:
    """model.init_from's weights (and init_generator_from's) into ``objective`` on every rank. From S3 they are
    downloaded once per node, into the node-local cache that resuming uses, and removed once every rank has
    loaded them: a Large model is 1.3 GB, which W ranks would otherwise each read (collective)."""
    group = dist.new_group(backend="gloo")
    scratch = cache / "init_from"
    new_cache = not cache.exists()
    directories = [d for d in (cfg.model.init_from, cfg.model.init_generator_from) if d]
    try:
        files = fetch_weights(directories, scratch, local_rank, group)
        load_weights(objective, cfg.model.init_from, cfg.model.init_generator_from, files)
        dist.barrier(group=group)  # the node's ranks have all read the copy
    finally:
        if local_rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            if new_cache:  # made for the copy alone (a local run.output_dir, say): leave nothing behind
                with contextlib.suppress(OSError):
                    cache.rmdir()


def check_same_model(cfg: Config, trainer_state: dict) -> None:
    """Refuse, in one line and before anything is loaded, a checkpoint whose model has another shape (the shards'
    vocabulary differing from the checkpoint's, say), naming the keys that differ and the way to a fresh run."""
    saved = trainer_state.get("model") or {}
    differ = [
        f"model.{k}={saved[k]!r} there, {getattr(cfg.model, k)!r} here"
        for k in SHAPE_KEYS
        if k in saved and saved[k] != getattr(cfg.model, k)
    ]
    kind = trainer_state.get("objective")
    if kind and kind != cfg.objective.kind:
        differ.append(f"objective.kind={kind!r} there, {cfg.objective.kind!r} here")
    sharing = trainer_state.get("embedding_sharing", "shared")  # checkpoints before the key were "shared"
    if cfg.objective.kind == "electra" and sharing != cfg.objective.embedding_sharing:
        differ.append(f"objective.embedding_sharing={sharing!r} there, {cfg.objective.embedding_sharing!r} here")
    if differ:
        raise ConfigError(
            f"the checkpoint in {cfg.run.output_dir} was trained with another model ({'; '.join(differ)}): set "
            "those keys back to continue it, or start a new run with a new run.output_dir"
        )


def word_pieces(cfg: Config) -> list[int]:
    """The shards' WordPiece continuation ids (``##...``), for objective.whole_word_mask."""
    try:
        spec, _ = model_dir_tokenizer(cfg.data.tokenizer_prefix, lowercase=True)
    except ValueError as err:
        raise ConfigError(
            "objective.whole_word_mask needs the shards' tokenizer to find word pieces, and "
            f"{cfg.data.tokenizer_prefix} has no tokenizer.json or vocab.txt; re-make the shards with electra-scale "
            "prepare, or set whole_word_mask=false"
        ) from err
    return continuation_ids(load_tokenizer(spec))


def saved_partitions(trainer_state: dict) -> int | None:
    """The partition count a checkpoint's stream was cut into (None for a new run)."""
    if not trainer_state:
        return None
    position = trainer_state.get("data_position", {})
    if "partitions" not in position:
        raise DataError(
            "this checkpoint was written by electra-scale's earlier stream (every rank read every shard), whose "
            "data order the partitioned stream cannot continue; resume it with the electra-scale release that "
            "wrote it, or start a new run (a new run.output_dir)"
        )
    return int(position["partitions"])


def _checkpoint_extras(cfg: Config) -> dict[str, bytes]:
    """Small files that make a checkpoint self-contained for export: config and tokenizer."""
    extras = {"config.yaml": cfg.to_yaml().encode()}
    for name in ("tokenizer.json", "vocab.txt", "manifest.json"):  # the first source's (all share the tokenizer)
        url = storage.join(cfg.data.tokenizer_prefix, name)
        if storage.exists(url):
            extras[f"tokenizer/{name}" if name != "manifest.json" else "data_manifest.json"] = storage.read_bytes(url)
    return extras


class _Progress:
    """A tqdm bar with ETA on a terminal; one log line per logging step otherwise (batch logs, CI)."""

    def __init__(self, enabled: bool, start: int, stop: int):
        self.bar = None
        self.start_time, self.start, self.stop = time.perf_counter(), start, stop
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)
        self.enabled = enabled

    def report(self, step: int, rec: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            return
        if not self.enabled:
            return
        rate = (step - self.start) / max(time.perf_counter() - self.start_time, 1e-9)
        eta = (self.stop - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.stop}", f"loss {rec['loss']:.4f}", f"gen {rec['gen_loss']:.3f}"]
        if "disc_loss" in rec:
            parts += [f"disc {rec['disc_loss']:.4f}", f"disc_acc {rec['disc_acc']:.3f}"]
            if rec.get("disc_auc") is not None:  # None while a window has no replaced token
                parts.append(f"auc {rec['disc_auc']:.3f}")
        parts += [f"lr {rec['lr']:.2e}", f"{rec['tokens_per_s']:.0f} tok/s", f"eta {eta:.0f}s"]
        if "source_examples" in rec:  # a mix: each source's examples so far and its epochs
            epochs = rec["source_epochs"]
            parts.append(", ".join(f"{k} {n:,} (ep {epochs[k]:.2f})" for k, n in rec["source_examples"].items()))
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(cfg: Config, main: bool, start: int, stop: int) -> _Progress:
    return _Progress(cfg.run.progress and main, start, stop)
