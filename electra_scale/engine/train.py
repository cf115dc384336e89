"""The pretraining loop. ``pretrain`` = ``setup`` (the run's components, in the order they depend on each other)
then ``train`` (step / log / evaluate / checkpoint until done, then ``finish``). Read ``train`` first.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from electra_scale.config import Config, ConfigError, deepspeed_config, staging_root
from electra_scale.data.shards import DataError
from electra_scale.data.stream import PretrainStream, check_same_mix, load_sources, resolve_partitions
from electra_scale.data.tokenizer import load_tokenizer, model_dir_tokenizer
from electra_scale.data.words import WordConventionError, continuation_ids, warn_if_unsegmented
from electra_scale.engine import early_stop, watchdog
from electra_scale.engine.checkpoint import Checkpointer
from electra_scale.engine.evaluate import Evaluator, describe
from electra_scale.engine.guard import check_finite
from electra_scale.engine.lease import Follower, Lease, LeaseLost, hold
from electra_scale.engine.metrics import DiscriminatorHealth, MetricsLogger, SampleLog
from electra_scale.engine.model import SHAPE_KEYS, peak_tflops
from electra_scale.engine.objective import build_objective
from electra_scale.engine.pretrained import check_vocabulary, fetch_weights, load_weights
from electra_scale.engine.startup import StartupClock
from electra_scale.engine.step import build_engine, settle_device, train_step
from electra_scale.engine.stragglers import StragglerReport
from electra_scale.engine.window import LogWindow
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
        """Give the signals back to the handlers they had (a tool runs pretrain several times in one process)."""
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
    """Node-local scratch for a run whose output is on S3 (checkpoint staging, metrics): one per node by default
    (config.staging_root), which Checkpointer claims for its node."""
    if cfg.run.cache_dir:
        return Path(cfg.run.cache_dir)
    if not storage.is_s3(cfg.run.output_dir):
        return Path(cfg.run.output_dir)
    bucket_path = cfg.run.output_dir[len("s3://") :].replace("/", "_")
    return staging_root() / bucket_path


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


@dataclass
class Run:
    """Everything a pretraining run holds, built by ``setup`` in dependency order and used by ``pretrain``'s loop."""

    cfg: Config
    stop: StopRequest
    dist_env: launch.DistEnv
    device: torch.device
    host_group: object  # gloo group for host collectives on GPUs; None = the default group
    lease: Lease | Follower
    checkpointer: Checkpointer
    engine: object  # the DeepSpeed engine
    stream: PretrainStream
    batches: Iterator  # the stream's global batches, this rank's micro-batches of each
    sources: list
    evaluator: Evaluator | None
    start_step: int
    stop_step: int
    zero_stage: int
    first_batches: list | None  # the first step's micro-batches, read before anything was written
    extra_files: dict[str, bytes]  # small files every checkpoint carries (rank 0's): config and tokenizer
    metrics: MetricsLogger | None  # rank 0's
    samples: SampleLog | None
    progress: _Progress
    health: DiscriminatorHealth
    dog: watchdog.Watchdog  # this rank's watchdog: a phase stuck past its run.timeouts ends the process (exit 75)
    clock: StartupClock  # restart latency, part by part (engine/startup.py)
    stragglers: StragglerReport  # each rank's own time per step, riding on the logging all-reduce
    resumed_from: str | None  # the checkpoint this start resumed from (its tag), for the startup line

    @property
    def main(self) -> bool:
        return self.dist_env.is_main


def pretrain(cfg: Config, on_log: Callable[[int, dict], None] | None = None, save: bool = True) -> dict:
    """Pretrain as ``cfg`` says, resuming from its output dir's newest checkpoint. ``on_log(step, record)`` is
    called on rank 0 after each logging step, with the record written to metrics.jsonl (bench times between
    them); it runs outside the timed windows. ``save=False``: no checkpoint at all (bench)."""
    stop = StopRequest()  # from the start: a signal during set-up stops the run after its first step
    armed = list(watchdog._active)
    try:
        run = setup(cfg, stop)
        return train(run, on_log, save)
    except BaseException:
        # An error (an OOM mid-step in a bench row) must not leave this run's watchdog armed: its step timer
        # would later end the process (exit 75) in whatever runs next in it. Only the dogs this call started.
        for dog in [dog for dog in watchdog._active if dog not in armed]:
            dog.close()
        raise
    finally:
        stop.restore()


def train(run: Run, on_log: Callable[[int, dict], None] | None, save: bool = True) -> dict:
    """The loop: step, log, evaluate, checkpoint, stop; then the run's teardown."""
    cfg, engine, stream, main = run.cfg, run.engine, run.stream, run.main
    window = LogWindow(
        cfg,
        stream,
        run.sources,
        run.dist_env.world_size,
        peak_tflops(cfg.train.peak_tflops),
        run.start_step,
        run.host_group,
        run.stragglers,
    )
    dog = run.dog
    vote = StopVote(run.host_group)
    done, preempted, lease_lost = run.start_step, False, False
    saved_at = run.start_step or None  # the newest checkpoint: where a diverged run resumes (engine/guard.py)
    history: list[dict] = []
    evaluations: list[dict] = []
    first_batches = run.first_batches
    for step in range(run.start_step, run.stop_step):
        # The first step of a start compiles and JITs: it has the setup's timeout.
        dog.phase("step", step + 1, "the data loader's next batch", limit="setup" if step == run.start_step else None)
        waited = time.perf_counter()
        micro_batches, first_batches = first_batches or next(run.batches), None
        window.add_batches(micro_batches, time.perf_counter() - waited)  # the step blocked on its input this long
        dog.waiting("the step's compute and collectives (stop vote, global counts, gradient all-reduce)")
        # A rank asked at the previous step: this one is the last. A lost lease: no step more, and no save.
        preempted, lease_lost = vote.cast(run.stop.requested, run.lease.lost is not None)
        if lease_lost:
            break
        lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler advances after it)
        for out in train_step(engine, micro_batches, cfg, run.device, run.dist_env.world_size):
            window.add_outputs(out)
        done = step + 1
        if step == run.start_step:
            run.clock.first_step_done(main, run.resumed_from)
        if run.samples is not None:
            run.samples.log(
                done,
                [int(p) for mb in micro_batches for p in mb.positions],
                [int(x) for mb in micro_batches for x in mb.samples],
                [stream.source_names[int(k)] for mb in micro_batches for k in mb.sources] if window.mixed else None,
            )

        if done % cfg.train.log_every == 0 or done == run.stop_step or preempted:
            dog.waiting("the logging all-reduce")
            record = window.record(done, lr, float(engine.get_global_grad_norm() or 0.0), main)
            record.update(run.clock.take())  # the first record of a start: where the start's time went
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):  # every rank alike
                _stop_diverged(run, vote, done, record["loss"], record["grad_norm"], lr, saved_at)
            if main:
                run.metrics.log(done, record)
                history.append({"step": done, **record})
                run.progress.report(done, record)
                run.health.check(done, record)
                if on_log is not None:
                    on_log(done, record)
            window.reset()

        # Held-out evaluation, before the checkpoint of the same step (a resume from it does not evaluate again);
        # skipped on the step a signal stops at, which should save and exit quickly.
        if run.evaluator is not None and run.evaluator.due(done) and not preempted:
            dog.phase("eval", done, "the held-out evaluation's forward passes and all-reduce")
            evaluation = run.evaluator.run(engine, done, run.host_group)
            if main:
                run.metrics.log(done, evaluation, split="eval")
                evaluations.append({"step": done, **evaluation})
                log.info(describe(done, evaluation))
            window.exclude(evaluation["eval_time_s"])  # the next training record's throughput leaves it out

        if save and (done % cfg.checkpoint.every_steps == 0 or done == run.stop_step or preempted):
            norm = engine.get_global_grad_norm()  # global, the same on every rank; a checkpoint step syncs anyway
            if norm is not None and not math.isfinite(float(norm)):
                _stop_diverged(run, vote, done, None, float(norm), lr, saved_at)
            # metrics.jsonl first: once the checkpoint is marked complete (in the background), a kill -9 must not
            # leave a resume point whose steps the remote log lacks (a resume drops lines past it, never adds).
            dog.phase("checkpoint", done, "the previous upload, then the local save and its barriers")
            if main and run.lease.lost is None:
                run.metrics.sync()
            run.checkpointer.save(engine, done, trainer_state(run, done), run.extra_files)
            saved_at = done
        if preempted:
            break

    dog.phase("checkpoint", done, "the last checkpoint's upload and the run's end (every rank)")
    lease_lost = vote.close()[1] or lease_lost  # the last vote's all-reduce: no collective is left in flight
    finish(run, done, preempted, lease_lost)
    return {
        "start_step": run.start_step,
        "end_step": done,
        "preempted": preempted,
        "history": history,
        "evaluations": evaluations,
        "world_size": run.dist_env.world_size,
    }


def setup(cfg: Config, stop: StopRequest) -> Run:
    """Build the run's components in dependency order: distributed init; the inputs (checked before anything is
    written); the lease; the objective; the checkpoint to resume; the engine; the stream; the evaluator; the
    first batches; then the logs."""
    clock = StartupClock()  # from the process's start: imports are its first part
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
    dist_env = launch.detect()
    dog = watchdog.start(cfg, dist_env.rank, EXIT_PREEMPTED)  # a stuck phase ends the process: exit 75
    pg_timeout = watchdog.process_group_timeout(dog.limits)  # a collective blocked on a dead peer fails after this
    device = launch.init_distributed(dist_env, pg_timeout)
    settle_device(cfg, device)  # TF32 for a bf16/fp16 run; fp32 refused with unpad on a GPU (before any write)
    host_group = dist.new_group(backend="gloo", timeout=pg_timeout) if device.type == "cuda" else None  # collective
    clock.mark("distributed_init")
    dog.waiting("the inputs, then the lease")
    world, main = dist_env.world_size, dist_env.is_main
    # The inputs first, so that a run that cannot start leaves nothing behind; then the output.
    sources = load_sources(cfg.data.resolved_sources())  # one tokenizer and seq_len for all, or refused
    for source in sources:
        source.manifest.check_compatible(cfg.model.vocab_size, cfg.data.seq_len)
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

    special = sources[0].manifest.special_ids
    continuation = word_pieces(cfg, special, warn=main) if cfg.objective.whole_word_mask else None
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    objective = build_objective(cfg, special, continuation)
    zero_stage = deepspeed_config(cfg, world).get("zero_optimization", {}).get("stage", 0)

    # Find (and verify) the checkpoint to resume before building the engine: one saved on another number of
    # ranks is converted to DeepSpeed's universal format, which the engine must be configured to load.
    cache = cache_dir_for(cfg)
    checkpointer = Checkpointer(cfg.run.output_dir, cache, dist_env, cfg.checkpoint, lease)

    def check_data(saved: dict) -> None:  # before converting anything: refuse what cannot continue this run
        check_same_model(cfg, saved)
        resolve_partitions(cfg.data.partitions, world, fewest, saved_partitions(saved))
        check_same_mix(saved.get("data_position", {}), sources)

    clock.mark("inputs_and_lease")
    dog.waiting("checkpoint fetch and verify (storage requests, then every rank)")
    resume_from = checkpointer.select(zero_stage, check_state=check_data)
    clock.mark("checkpoint_fetch")
    if cfg.model.init_from:
        if resume_from is not None:  # the run's own checkpoint is newer than where it started
            log.info("resuming %s: model.init_from (%s) is not used", cfg.run.output_dir, cfg.model.init_from)
        else:
            check_vocabulary(cfg.model.init_from, cfg.data.tokenizer_prefix)
            init_weights(cfg, objective, cache, dist_env.local_rank)
    dog.waiting("the engine's build (deepspeed.initialize)")
    engine = build_engine(cfg, objective, world, device, universal=bool(resume_from and resume_from.universal))
    clock.mark("engine")
    early_stop.release()  # a signal held back since the CLI's first line reaches `stop` now (engine/early_stop.py)
    torch.manual_seed(cfg.train.seed + 1 + dist_env.rank)  # dropout differs between ranks
    dog.waiting("checkpoint load")
    state = checkpointer.load(engine, resume_from) if resume_from is not None else {}
    clock.mark("checkpoint_load")
    start_step = state.get("step", 0)
    stop_step = cfg.train.stop_at_step or cfg.train.max_steps
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
    # The held-out set is read now, with the other inputs: a bad one stops the run before anything is written.
    evaluator = Evaluator(cfg, sources[0].manifest, dist_env.rank, world, device) if cfg.eval.shards else None
    extra_files = _checkpoint_extras(cfg) if main else {}
    # The first step's batches come before anything is written: a shard that cannot be read (truncated, or
    # corrupt under data.on_corrupt_shard=error) stops a new run with its output dir as it was. No rank writes
    # until every rank has its batches: one that fails exits, and its launcher ends the others at the barrier.
    batches = iter(stream)
    dog.waiting("the data stream's first batches, then every rank's (a barrier)")
    first_batches = next(batches) if start_step < stop_step else None
    dist.barrier(group=host_group)
    clock.mark("data_seek")
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
        _log_start(cfg, stream, sources, world, start_step, stop_step)
    return Run(
        cfg=cfg,
        stop=stop,
        dist_env=dist_env,
        device=device,
        host_group=host_group,
        lease=lease,
        checkpointer=checkpointer,
        engine=engine,
        stream=stream,
        batches=batches,
        sources=sources,
        evaluator=evaluator,
        start_step=start_step,
        stop_step=stop_step,
        zero_stage=zero_stage,
        first_batches=first_batches,
        extra_files=extra_files,
        metrics=metrics,
        samples=SampleLog(cache, dist_env.rank, world, start_step) if cfg.run.record_samples else None,
        progress=_progress(cfg, main, start_step, stop_step),
        health=DiscriminatorHealth(cfg.optim.warmup_steps, cfg.train.max_steps),
        dog=dog,
        clock=clock,
        stragglers=StragglerReport(dist_env.rank, world, cfg.run.straggler, engine.module, device),
        resumed_from=resume_from.tag if resume_from is not None else None,
    )


def finish(run: Run, done: int, preempted: bool, lease_lost: bool) -> None:
    """The run's teardown: the last checkpoint complete, then the logs closed and the lease released."""
    run.checkpointer.close()  # the last checkpoint is complete (uploaded, marked) before the run reports done
    if lease_lost or run.lease.lost is not None:  # metrics.jsonl is the new holder's now: not synced
        raise LeaseLost(run.lease.lost or "rank 0 found the run's lease taken by another run; this rank stops too")
    if preempted and run.main:
        log.info("stopped at step %d by a signal; re-run the same command to resume", done)
    if run.main and run.start_step >= run.stop_step:
        log.info("nothing to do: the run is already at step %d", run.start_step)
    run.progress.close()
    if run.metrics is not None:
        run.metrics.close()
    if run.samples is not None:
        run.samples.close()
    run.lease.release()  # the next run on this output dir starts without waiting
    run.dog.close()


def _stop_diverged(run: Run, vote: StopVote, step, loss, grad_norm, lr, saved_at) -> None:
    """A non-finite loss or gradient norm: the earlier checkpoints finish (uploaded, marked), this step's is never
    written, the lease is let go, and the run stops in one line (exit 2: engine/guard.py)."""
    vote.close()
    run.checkpointer.close()
    run.lease.release()
    run.dog.close()
    check_finite(step, loss, grad_norm, lr, saved_at)


def trainer_state(run: Run, done: int) -> dict:
    """What a checkpoint records besides DeepSpeed's files: where the run is, and what it must resume as."""
    cfg = run.cfg
    return {
        "step": done,
        "model": {key: getattr(cfg.model, key) for key in SHAPE_KEYS},
        "world_size": run.dist_env.world_size,
        "zero_stage": run.zero_stage,
        "global_batch_size": cfg.train.global_batch_size,
        "tokens_seen": done * cfg.train.global_batch_size * cfg.data.seq_len,
        "data_position": run.stream.position(done),
        "objective": cfg.objective.kind,
        "embedding_sharing": cfg.objective.embedding_sharing,
    }


def _log_start(cfg: Config, stream, sources, world: int, start_step: int, stop_step: int) -> None:
    log.info(
        "pretrain %s: steps %d -> %d of %d, %d rank(s) x micro-batch %d x accumulation %d = %d per step; "
        "data in %d partitions (%d per rank)",
        cfg.objective.kind,
        start_step,
        stop_step,
        cfg.train.max_steps,
        world,
        cfg.train.micro_batch_size,
        stream.grad_accum,
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


def word_pieces(cfg: Config, special: dict[str, int], warn: bool = True) -> list[int]:
    """The ids that continue a word in the shards' tokenizer (data/words.py reads its convention: WordPiece
    ``##``, Metaspace ``▁``, byte-level ``Ġ``), for objective.whole_word_mask. The shards' tokenizer.json is
    read first: it is the tokenizer itself, where their vocab.txt is only its token list."""
    prefix = cfg.data.tokenizer_prefix
    tok_json = storage.join(prefix, "tokenizer.json")
    try:
        spec = tok_json if storage.exists(tok_json) else model_dir_tokenizer(prefix, lowercase=True)[0]
    except ValueError as err:
        raise ConfigError(
            "objective.whole_word_mask needs the shards' tokenizer to find word pieces, and "
            f"{prefix} has no tokenizer.json or vocab.txt; re-make the shards with electra-scale "
            "prepare, or set whole_word_mask=false"
        ) from err
    tok = load_tokenizer(spec)
    try:
        ids = continuation_ids(tok, set(special.values()))
    except WordConventionError as err:
        raise ConfigError(f"{prefix}: {err}") from err
    if warn:  # one line per run, from rank 0
        warn_if_unsegmented(tok)
    return ids


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
        if rec.get("slowest_vs_median") is not None:  # several ranks: the one the others wait for (stragglers.py)
            parts.append(f"slowest rank {rec['slowest_rank']} {rec['slowest_vs_median']:.2f}x")
        if "source_examples" in rec:  # a mix: each source's examples so far and its epochs
            epochs = rec["source_epochs"]
            parts.append(", ".join(f"{k} {n:,} (ep {epochs[k]:.2f})" for k, n in rec["source_examples"].items()))
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(cfg: Config, main: bool, start: int, stop: int) -> _Progress:
    return _Progress(cfg.run.progress and main, start, stop)
