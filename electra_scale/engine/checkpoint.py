"""Checkpoints that resume exactly, on local disk or S3, never count until complete, and don't stall training.

Layout (a local directory or an s3:// prefix, same keys)::

    OUTPUT/checkpoints/step_0000500/   DeepSpeed's files (per rank), trainer_state.json, config.yaml,
                                       tokenizer/, rng/rank_<r>.pt (DeepSpeed does not save RNG state)
    OUTPUT/checkpoints/step_0000500/parts/node_<n>.json   each node's files with size and sha256, once uploaded
                                                          (for tools: rank 0 gets them by a gather)
    OUTPUT/checkpoints/step_0000500/COMPLETE   written last, by rank 0: every file with its size and sha256
    OUTPUT/checkpoints/latest                  names the newest complete step; written after COMPLETE

Saving has two halves. In the foreground every rank writes with ``engine.save_checkpoint`` into a local
directory (the output dir itself, or node-local staging when the output is on S3): training waits only for
that. Then, in the background, each node's lowest rank starts its node's uploader, a child process
(engine/uploader.py: out of the training process's GIL, at a lower priority, killed with the rank), which
hashes the files its node's ranks own, uploads them (multipart above 8 MiB) and writes ``parts/node_<n>.json``
(a record for tools). A thread of every rank waits for it; the nodes' file lists then reach rank 0 by one gather
on a gloo group of their own (never the training loop's groups, so it never races its all-reduces), and rank
0's thread writes COMPLETE, then ``latest``, then applies retention (one listing, DeleteObjects): its requests
after a save stay flat as W grows. At most one upload is in flight: the next save waits for it (and says so
in the log).

Resuming: try ``latest`` first, then every other complete step, newest first; a checkpoint is used only if
every file in its marker is present with the right size and sha256, otherwise it is skipped with a warning.
Rank 0 reads the marker and passes it to every rank; each rank fetches (into its node's staging) and verifies
only the files it loads, its own per-rank files, and each node's local rank 0 also the shared ones
(``needed_files``); a staged file that matches the marker is not downloaded again; all ranks agree before
loading. Each node stages in a directory of its own, which its local rank 0 claims at start (``.owner``).
A checkpoint saved on a different number of ranks (or another ZeRO stage of the same group) is converted to
DeepSpeed's universal format (``ds_to_universal --inject_missing_state``) and loaded with
``checkpoint.load_universal``; DeepSpeed cannot convert between ZeRO-1/2 and ZeRO-3, or into ZeRO-0, and
that case stops with an error that says what would work. The conversion runs once: rank 0 alone fetches the
whole checkpoint, converts it with all its node's cores and publishes the result next to it, with a marker of
its own, as ``step_0000500.universal/`` (COMPLETE written last, under the run's lease); every later start, at
any world size, reuses it. Each node then fetches only the universal files its ranks' new partitions read
(``universal_files``), and retention deletes the converted copy with its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from electra_scale.config import CheckpointConfig, node_name
from electra_scale.engine import uploader, watchdog
from electra_scale.engine.uploader import MARKER, PER_RANK, owner_rank, sha256_file
from electra_scale.errors import ConfigError
from electra_scale.infra import storage
from electra_scale.infra.launch import DistEnv

log = logging.getLogger("electra_scale")

LATEST = "latest"
STAGING_OWNER = ".owner"  # in a staging directory: the node, leader rank and run that use it
UNIVERSAL = ".universal"  # step_N.universal/: step_N converted to DeepSpeed's universal format, once
_TAG = re.compile(r"^step_(\d+)$")
_DEEPSPEED = re.compile(r"(^|_)(model|optim)_states\.pt$")  # DeepSpeed's own files (the rest are the trainer's)


class CheckpointError(RuntimeError):
    pass


class NoCheckpointError(CheckpointError):
    """No checkpoint where one was named (export, finetune): the user's input is wrong, nothing failed, so the
    command exits 2 like any other bad input."""


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_marker(remote_root: str, tag: str) -> dict | str:
    """A checkpoint's completion marker, or why it cannot be read."""
    try:
        marker = json.loads(storage.read_text(storage.join(remote_root, tag, MARKER)))
        if not isinstance(marker.get("files"), dict):
            return f"{MARKER} lists no files"
        return marker
    except (storage.StorageError, json.JSONDecodeError, AttributeError) as err:
        return f"{MARKER} is unreadable: {err}"


def needs_conversion(marker: dict, world_size: int, zero_stage: int) -> bool:
    """A checkpoint DeepSpeed cannot load as saved: another world size or ZeRO stage (ZeRO-0 files hold whole,
    unpartitioned states, which load on any world size)."""
    same = marker.get("world_size") == world_size and marker.get("zero_stage") == zero_stage
    return not same and not (marker.get("zero_stage") == 0 and zero_stage == 0)


def needed_files(
    marker: dict, rank: int, local_rank: int, world_size: int, zero_stage: int, converts: bool = False
) -> list[str]:
    """The files of a checkpoint that this rank fetches and verifies: the ones it loads. Loaded as saved (the
    same world size and ZeRO stage, or ZeRO-0 on any), a rank loads only its own per-rank files (its optimizer
    shard, its RNG state, at ZeRO-3 its model-state partition: DeepSpeed opens no other rank's file unless
    zero_elastic_checkpoint is set, which this package never sets), and local rank 0 also the files every rank
    reads (the module at ZeRO-1/2, the trainer state, the tokenizer), which its node's ranks share through the
    node's staging. A checkpoint that must be converted is read whole by the one rank that ``converts`` it;
    every other node's local rank 0 reads only the trainer's own files (DeepSpeed's come from the converted
    copy, ``universal_files``)."""
    files = sorted(marker["files"])
    if needs_conversion(marker, world_size, zero_stage):
        if converts:
            return files
        return [rel for rel in files if not (PER_RANK.search(rel) or _DEEPSPEED.search(rel))] if local_rank == 0 else []
    return [rel for rel in files if (owner_rank(rel) == rank if PER_RANK.search(rel) else local_rank == 0)]


def universal_params(engine) -> set[str] | None:
    """The parameters whose ``zero/<param>/`` files of a converted (universal) checkpoint this rank's engine
    reads as it loads (None: all of them). At ZeRO-1/2, those its partition of the flat buffer overlaps
    (DeepSpeed's own map, ``_hp_mapping``, set when the engine was built): about 1/W of them. At ZeRO-3 every
    rank holds a slice of every parameter, and DeepSpeed reads each parameter's file whole to cut its slice,
    so every node reads all of them (the format's cost, not this package's)."""
    optimizer = engine.optimizer
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    names = getattr(optimizer, "param_names", None)
    if engine.zero_optimization_partition_weights() or not groups or not names:
        return None
    return {names[lp] for group in groups for lp in group if getattr(lp, "_hp_mapping", None) is not None}


def universal_files(marker: dict, params: set[str] | None) -> list[str]:
    """The files of a converted checkpoint that ranks reading ``params`` (``universal_params``; None: all)
    load: DeepSpeed's module file (rank 0's at ZeRO-3), the optimizer's global state, and those parameters'
    ``zero/<param>/`` files."""
    shared = {"zero/optimizer_state.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"}
    return [
        rel
        for rel in sorted(marker["files"])
        if rel in shared or (rel.startswith("zero/") and (params is None or rel.split("/")[1] in params))
    ]


def fetch_and_verify(
    remote_root: str, local_root: Path, tag: str, marker: dict | None = None, files: list[str] | None = None
) -> str | None:
    """Make ``files`` of a checkpoint (default: all) present under ``local_root/tag`` and check each against its
    marker (default: read here): a staged copy (a crash leaves the node's last save, or last load, in its
    staging) is kept when its size and sha256 match, else downloaded (no HEAD: the marker has the size).
    Returns the first problem, or None."""
    if marker is None:
        marker = read_marker(remote_root, tag)
        if isinstance(marker, str):
            return marker
    local_dir = Path(local_root, tag)
    files = sorted(marker["files"]) if files is None else files
    for rel in files:
        meta = marker["files"][rel]
        path = local_dir / rel
        if storage.is_s3(remote_root) and not _matches(path, meta):
            try:
                storage.download_file(storage.join(remote_root, tag, rel), path, size=int(meta["size"]))
            except storage.StorageError as err:
                return str(err)
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the marker says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def _matches(path: Path, meta: dict) -> bool:
    """A staged file that is the marker's: the size first (cheap), then the hash."""
    try:
        return path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]
    except OSError:
        return False


def resume_budget(checkpoint_bytes: int) -> timedelta:
    """How long ranks wait for a node's download, hashing and conversion of a checkpoint of this size: 10
    minutes, plus three passes over its bytes at 25 MB/s (a slow object store or disk; each pass is far faster
    on a good one). An 8 GB Large checkpoint: about 26 minutes."""
    return timedelta(seconds=600 + 3 * checkpoint_bytes / 25e6)


def same_zero_group(saved: int, current: int) -> bool:
    """Universal checkpoints convert within ZeRO-1/2 and within ZeRO-3 (checked with DeepSpeed 0.19.8)."""
    return (saved in (1, 2) and current in (1, 2)) or (saved == 3 and current == 3)


@dataclass
class Resumable:
    """A verified checkpoint on local disk, and how DeepSpeed must load it."""

    tag: str
    world_size: int
    zero_stage: int
    universal: dict | None = None  # the marker of the converted copy ``<tag>.universal`` it loads from

    @property
    def load_tag(self) -> str:
        return f"{self.tag}{UNIVERSAL}" if self.universal else self.tag


class Checkpointer:
    def __init__(self, output_dir: str, cache_dir: Path, dist_env: DistEnv, cfg: CheckpointConfig, lease=None):
        self.remote = storage.join(output_dir, "checkpoints")
        self.on_s3 = storage.is_s3(output_dir)
        # Where DeepSpeed writes and reads: the output dir itself, or node-local staging for S3.
        self.local = Path(cache_dir, "checkpoints") if self.on_s3 else Path(self.remote)
        self.env = dist_env
        self.cfg = cfg
        # The run's lease (engine/lease.py): its token names this run's parts and markers, and rank 0 checks it
        # before every write that only the run's one writer may make (COMPLETE, latest, pruning).
        self.lease = lease
        # Waits and agreements on the host, apart from the training's collectives (collective to create).
        self.control = dist.new_group(backend="gloo")
        # The upload threads' own group: their one gather per save never shares a group with the training loop.
        self.uploads = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.upload_timeout_s))
        self._upload: threading.Thread | None = None
        self._upload_tag: str | None = None
        self._upload_error: BaseException | None = None
        if self.on_s3:
            self._group_by_node(self._claim_staging(Path(cache_dir)))
        else:  # the output directory itself: every node sees every file, and hashes its own ranks'
            self._group_by_node(node_name())

    def _group_by_node(self, key: str | int) -> None:
        """Which ranks save into this rank's local directory (``key``: the same on exactly those ranks), and
        their group's place among the groups: the group's lowest rank runs its node's uploader
        (engine/uploader.py), which writes ``parts/node_<index>.json``. Collective: one key from each rank."""
        keys: list = [None] * self.env.world_size
        dist.all_gather_object(keys, key, group=self.control)
        self.node_ranks = [r for r, k in enumerate(keys) if k == key]
        self.node_index = list(dict.fromkeys(keys)).index(key)
        self.runs_uploader = self.env.rank == self.node_ranks[0]

    def _claim_staging(self, staging: Path) -> int:
        """Each node's filesystem leader writes its node's name, its rank and this run's id into
        ``staging/.owner``, then reads it back after every leader has written: a leader that finds another
        leader's record shares the directory with it (a shared $HOME, one run.cache_dir for all, a hostPath
        volume of two pods on one Kubernetes node), and every rank stops in one line before anything is
        downloaded into it. A marker of another run (a predecessor on other nodes) is simply replaced: only
        leaders of the same run collide. Every rank returns the rank of the leader whose directory it stages
        in: the ranks that save into one directory are the ones one uploader serves. Collective."""
        run_id = [uuid.uuid4().hex if self.env.is_main else None]
        dist.broadcast_object_list(run_id, src=0, group=self.control)
        me = {"node": node_name(), "rank": self.env.rank, "run": run_id[0]}
        marker = staging / STAGING_OWNER
        if self._fs_leader:
            storage.write_text(str(marker), json.dumps(me))
        dist.barrier(group=self.control)
        problem = None
        try:
            holder = json.loads(marker.read_text())
        except (OSError, ValueError):
            holder = {}
        if self._fs_leader and holder != me:
            problem = (
                f"the staging directory {staging} is shared by rank {me['rank']} on node {me['node']} and rank "
                f"{holder.get('rank', '?')} on node {holder.get('node', '?')} (one filesystem, such as a shared "
                "$HOME or one run.cache_dir for every node): unset run.cache_dir for the per-node default, or "
                "give each node its own"
            )
        elif holder.get("run") != me["run"] or holder.get("node") != me["node"]:
            problem = (
                f"rank {self.env.rank} on node {me['node']} finds no record of its node's local rank 0 in "
                f"{marker}: every rank of a node must stage in the same directory (run.cache_dir)"
            )
        problem = self._agree(problem)
        if problem:
            raise ConfigError(problem)
        return holder["rank"]

    def _agree(self, problem: str | None, budget: timedelta | None = None) -> str | None:
        """The first rank's problem (None if none), the same on every rank. ``budget``: first wait for every
        rank that long (a monitored barrier names a rank that never came). Collective, on the control group."""
        if budget is not None:
            dist.monitored_barrier(group=self.control, timeout=budget)
        verdicts: list = [None] * self.env.world_size
        dist.all_gather_object(verdicts, problem, group=self.control)
        return next((p for p in verdicts if p), None)

    @property
    def _fs_leader(self) -> bool:
        """One process per filesystem touches shared local files: per node for S3 staging, else rank 0."""
        return self.env.local_rank == 0 if self.on_s3 else self.env.is_main

    # ------------------------------------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict, extra_files: dict[str, bytes]) -> str:
        """Write ``step``'s checkpoint locally on every rank, then hash/upload/mark it in the background."""
        tag = tag_for(step)
        # At most one upload in flight; every rank's is done: its staging files may go. Rank 0 also checks the
        # lease: the save first deletes what an earlier attempt left of this step.
        self._wait_all(check_lease=True)
        started = time.monotonic()
        local_dir = self.local / tag
        if self.on_s3 and self.env.is_main:
            storage.delete_prefix(storage.join(self.remote, tag))  # debris of a crashed save of this step
        if self._fs_leader:
            # A directory for this step can survive a crash mid-save (it never got COMPLETE): start afresh so
            # that no stale file (or part list) is listed in the new marker.
            shutil.rmtree(local_dir, ignore_errors=True)
            if self.on_s3:
                for old in self.local.glob("step_*"):
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.local), tag=tag, save_latest=False)
        rng_file = local_dir / "rng" / f"rank_{self.env.rank}.pt"
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), rng_file)
        if self.env.is_main:
            (local_dir / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            for name, data in extra_files.items():
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (local_dir / name).write_bytes(data)
        dist.barrier()  # all files of this checkpoint are on local disk
        log.debug("checkpoint %s saved locally in %.1fs", tag, time.monotonic() - started)

        args = (tag, step, trainer_state.get("world_size"), trainer_state.get("zero_stage"))
        self._upload_error, self._upload_tag = None, tag
        self._upload = threading.Thread(target=self._finish_guarded, args=args, name=f"upload-{tag}", daemon=True)
        self._upload.start()
        if not self.cfg.async_upload:
            self._wait_all(quiet=True)  # the checkpoint is complete when save returns, or every rank raises
        return tag

    def wait(self, quiet: bool = False) -> None:
        """Block until this rank's in-flight upload (if any) is done; raise if it failed."""
        if self._upload is None:
            return
        if self._upload.is_alive():
            if not quiet:
                log.info("checkpoint: waiting for the upload of %s before the next save", self._upload_tag)
            self._upload.join()
        self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise CheckpointError(f"checkpoint {self._upload_tag} was not completed: {err}") from err

    def _wait_all(self, quiet: bool = False, check_lease: bool = False) -> None:
        """Every rank's upload is done (collective). If one rank's failed (its lease lost, say), every rank
        raises, so that none waits in a collective for a rank that has gone."""
        failed = None
        try:
            self.wait(quiet)
            if check_lease and self.env.is_main:
                self._check_lease()
        except CheckpointError as err:
            failed = err
        flag = torch.tensor([float(failed is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        if failed is not None:
            raise failed
        if flag[0] > 0:
            raise CheckpointError(
                "another rank's checkpoint failed (its error says why: an upload, or a lost lease); this rank stops too"
            )

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def close(self) -> None:
        """End of run: every rank's last upload is done and marked, and S3 staging is cleaned (collective)."""
        self._wait_all(quiet=True)
        if self.on_s3 and self._fs_leader:
            for old in self.local.glob("step_*"):
                shutil.rmtree(old, ignore_errors=True)

    def _finish_guarded(self, *args) -> None:
        try:
            self._finish(*args)
        except BaseException as err:  # surfaced by wait() in the training thread
            self._upload_error = err
            log.error("checkpoint %s: upload failed: %s", args[0], err)

    def _finish(self, tag: str, step: int, world_size: int, zero_stage: int) -> None:
        """The node's uploader process (engine/uploader.py), started by the node's lowest rank, hashes and
        uploads every file its node's ranks wrote and writes the node's part; the nodes' file lists then reach
        rank 0 by one gather on the upload threads' own group (the other ranks send an empty list), and rank 0
        writes COMPLETE and ``latest``. A node whose upload failed still joins the gather, with its error, so
        that rank 0 says which failed instead of waiting for it."""
        started = time.monotonic()
        writer = self.lease.token if self.lease is not None else None
        report: dict = {"files": {}}
        failure: BaseException | None = None
        if self.runs_uploader:
            job = {
                "local_dir": str(self.local / tag),
                "remote_dir": storage.join(self.remote, tag),
                "on_s3": self.on_s3,
                "ranks": self.node_ranks,
                "part": f"parts/node_{self.node_index}.json",
                "writer": writer,
                "label": f"rank {self.env.rank} uploader",
            }
            try:
                report = {"files": uploader.result(uploader.start(job), self.cfg.upload_timeout_s)}
            except BaseException as err:  # noqa: BLE001 - reported to rank 0, then raised here
                failure, report = err, {"error": f"{type(err).__name__}: {err}"}
        parts: list | None = [None] * self.env.world_size if self.env.is_main else None
        try:
            dist.gather_object(report, parts, dst=0, group=self.uploads)
        except RuntimeError as err:  # a rank that never reported: its process died, or it outlived the timeout
            if failure is None:
                failure = CheckpointError(
                    f"not every rank finished uploading {tag} within checkpoint.upload_timeout_s="
                    f"{self.cfg.upload_timeout_s:g}s ({err}); the checkpoint stays incomplete and will not be used"
                )
        if failure is not None:
            raise failure
        if not self.env.is_main:
            return

        files: dict[str, dict] = {}
        for r, part in enumerate(parts):
            if "error" in part:
                raise CheckpointError(
                    f"the uploader of rank {r}'s node could not upload {tag} ({part['error']}); it stays incomplete"
                )
            files.update(part["files"])
        marker = {"step": step, "tag": tag, "world_size": world_size, "zero_stage": zero_stage, "files": files}
        marker["writer"] = writer  # the lease token of the run that marked it
        self._check_lease()  # a run whose lease was taken marks nothing complete
        if watchdog.fired():  # ... nor one whose watchdog is ending it (engine/watchdog.py)
            raise CheckpointError("this rank's watchdog is ending the process; the checkpoint stays incomplete")
        storage.write_text(storage.join(self.remote, tag, MARKER), json.dumps(marker, indent=1))
        storage.write_text(storage.join(self.remote, LATEST), tag + "\n")
        self._check_lease()  # ... and prunes nothing
        self._apply_retention(newest=tag)
        log.info(
            "checkpoint %s complete (%d files, %.1fs after the local save)", tag, len(files), time.monotonic() - started
        )

    def _apply_retention(self, newest: str) -> None:
        """Keep the last ``keep_last`` complete checkpoints and every ``keep_every``-th step; never the newest
        (``latest``). Incomplete directories older than the newest are debris of crashed saves: the only save
        that can be in flight is the one just completed, so they go too. One listing (a request per 1,000 keys)
        finds them and their files, and DeleteObjects removes 1,000 files a request: at W = 512 a checkpoint of
        1,030 files goes in 2 requests, not 1,030 DELETEs one after another. A checkpoint's converted copy
        (``<tag>.universal``) goes with it."""
        by_tag: dict[str, set[str]] = {}
        converted: dict[str, set[str]] = {}  # by the tag it was converted from
        for rel in storage.list_files(self.remote):
            if _TAG.match(tag := rel.split("/")[0]):
                by_tag.setdefault(tag, set()).add(rel)
            elif tag.endswith(UNIVERSAL) and _TAG.match(source := tag.removesuffix(UNIVERSAL)):
                converted.setdefault(source, set()).add(rel)
        complete = sorted((t for t, rels in by_tag.items() if f"{t}/{MARKER}" in rels), key=step_of, reverse=True)
        keep_every = self.cfg.keep_every
        doomed = {}
        for tag in complete[self.cfg.keep_last :]:
            if tag != newest and not (keep_every and step_of(tag) % keep_every == 0):
                doomed[tag] = "retention: deleted %s"
        for tag in by_tag:
            if tag not in complete and step_of(tag) < step_of(newest):
                doomed[tag] = "retention: deleted %s, an incomplete checkpoint left by an interrupted save"
        # A converted copy whose checkpoint goes (or went) goes too.
        for source, rels in converted.items():
            if source in doomed or (source not in by_tag and step_of(source) < step_of(newest)):
                doomed[source + UNIVERSAL] = "retention: deleted %s, the converted copy of a deleted checkpoint"
                by_tag[source + UNIVERSAL] = rels
        # The markers first: a checkpoint half deleted is then an incomplete one, never a complete one that
        # fails verification.
        names = sorted(f"{t}/{MARKER}" for t in doomed if f"{t}/{MARKER}" in by_tag[t])
        storage.delete_files(self.remote, names)
        if self.on_s3:
            storage.delete_files(self.remote, sorted(rel for t in doomed for rel in by_tag[t] - set(names)))
        else:  # local disk: the directories go too
            for tag in doomed:
                storage.delete_prefix(storage.join(self.remote, tag))
        for tag, message in sorted(doomed.items()):
            log.info(message, tag)

    # ------------------------------------------------------------------------------------------- find
    def all_tags(self) -> set[str]:
        return {rel.split("/")[0] for rel in storage.list_files(self.remote) if _TAG.match(rel.split("/")[0])}

    def complete_tags(self) -> list[str]:
        """Tags with a completion marker, newest first."""
        tags = set()
        for rel in storage.list_files(self.remote):
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] == MARKER and _TAG.match(parts[0]):
                tags.add(parts[0])
        return sorted(tags, key=step_of, reverse=True)

    def candidates(self) -> list[str]:
        tags = self.complete_tags()
        latest_url = storage.join(self.remote, LATEST)
        if storage.exists(latest_url):
            latest = storage.read_text(latest_url).strip()
            if latest in tags:
                tags.remove(latest)
                tags.insert(0, latest)
            else:
                log.warning("checkpoints/latest names %r, which has no %s marker; ignoring it", latest, MARKER)
        return tags

    # ------------------------------------------------------------------------------------------- resume
    def select(self, zero_stage: int, check_state: Callable[[dict], None] | None = None) -> Resumable | None:
        """Find the newest checkpoint that verifies and make it loadable here (None for a new run).

        Runs before ``deepspeed.initialize`` because a checkpoint from another world size needs
        ``checkpoint.load_universal`` in the DeepSpeed config. Every rank takes part (it is collective).
        ``check_state(trainer_state)`` may refuse the checkpoint (by raising) before any conversion starts.
        """
        # Resuming waits on work one process does for the others (download, hash, conversion): minutes for a
        # Large checkpoint, longer than a collective's default timeout. The waits run on a gloo group of their
        # own, each with a budget from the checkpoint's size (``resume_budget``).
        control = self.control
        holder = [self.candidates() if self.env.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=control)
        tags: list[str] = holder[0]
        problems = []
        env = self.env
        for tag in tags:
            # Rank 0 reads the marker (one GET) and every rank gets it from rank 0: it names each file's size
            # and sha256, so no rank needs a listing or a HEAD. For another world size, rank 0 also reads the
            # marker of its converted copy, if an earlier start published one (``_publish_universal``).
            converted = None
            if env.is_main:
                marker = read_marker(self.remote, tag)
                if isinstance(marker, dict) and needs_conversion(marker, env.world_size, zero_stage):
                    converted = read_marker(self.remote, tag + UNIVERSAL)
                    converted = converted if isinstance(converted, dict) else None
            holder = [(marker, converted) if env.is_main else None]
            dist.broadcast_object_list(holder, src=0, group=control)
            marker, converted = holder[0]
            size = sum(int(m["size"]) for m in marker["files"].values()) if isinstance(marker, dict) else 0
            budget = resume_budget(size)
            if isinstance(marker, str):
                problem = marker
            else:
                # Each rank fetches and verifies what it loads; all ranks then agree before loading. Without a
                # converted copy, rank 0 fetches the whole checkpoint: it converts it.
                converts = env.is_main and converted is None
                files = needed_files(marker, env.rank, env.local_rank, env.world_size, zero_stage, converts)
                problem = fetch_and_verify(self.remote, self.local, tag, marker, files)
            problem = self._agree(problem, budget)
            if problem:
                log.warning("checkpoint %s fails verification (%s); trying an older one", tag, problem)
                problems.append(f"{tag}: {problem}")
                continue
            return self._loadable(tag, zero_stage, check_state, control, budget, converted)
        if problems:
            raise CheckpointError(
                f"no checkpoint in {self.remote} verifies ({'; '.join(problems)}); refusing to start over and "
                "overwrite the run: fix or remove the broken checkpoints, or use a new run.output_dir"
            )
        return None

    def _loadable(
        self, tag: str, zero_stage: int, check_state, control, budget: timedelta, converted: dict | None
    ) -> Resumable:
        state = json.loads((self.local / tag / "trainer_state.json").read_text()) if self.env.is_main else None
        if state is not None and "model" not in state and (self.local / tag / "config.yaml").exists():
            # Checkpoints written before the trainer state named the model's shape: their config.yaml does.
            state["model"] = yaml.safe_load((self.local / tag / "config.yaml").read_text()).get("model", {})
        holder = [state]
        dist.broadcast_object_list(holder, src=0, group=control)
        if check_state is not None:
            check_state(holder[0])
        saved_world, saved_stage = holder[0]["world_size"], holder[0].get("zero_stage", zero_stage)
        found = Resumable(tag, saved_world, saved_stage)
        if saved_world == self.env.world_size and saved_stage == zero_stage:
            return found
        where = f"{tag} was saved by {saved_world} rank(s) at ZeRO-{saved_stage}"
        if saved_stage == 0 and zero_stage == 0:
            return found  # ZeRO-0 files hold whole, unpartitioned states: they load on any world size
        if not same_zero_group(saved_stage, zero_stage):
            raise CheckpointError(
                f"{where}; this run has {self.env.world_size} rank(s) at ZeRO-{zero_stage}. DeepSpeed's universal "
                "checkpoint converts only within ZeRO-1/2 or within ZeRO-3, never into ZeRO-0: resume with a ZeRO "
                f"stage of the saved one's group (train.deepspeed_config), or on {saved_world} rank(s) at "
                f"ZeRO-{saved_stage}"
            )
        if converted is not None:
            if self.env.is_main:
                log.info("%s; loading its converted copy %s%s (converted once, reused)", where, tag, UNIVERSAL)
            found.universal = converted
            return found
        # No converted copy yet: rank 0 converts (it fetched the whole checkpoint) and publishes the result; the
        # other ranks wait for it, then get its marker.
        outcome = None
        if self.env.is_main:
            log.info("%s; converting it to a universal checkpoint for %d rank(s)", where, self.env.world_size)
            try:
                outcome = self._publish_universal(tag, found)
            except (CheckpointError, storage.StorageError) as err:
                outcome = f"converting {tag} to a universal checkpoint failed: {err}"
        dist.monitored_barrier(group=control, timeout=budget)
        holder = [outcome]
        dist.broadcast_object_list(holder, src=0, group=control)
        if isinstance(holder[0], str):
            raise CheckpointError(holder[0])
        found.universal = holder[0]
        return found

    def _publish_universal(self, tag: str, found: Resumable) -> dict:
        """Convert ``tag`` (staged whole on this node) with DeepSpeed's ``ds_to_universal`` into
        ``<tag>.universal``, with every core of the node, then publish it as a checkpoint of its own: each
        file's size and sha256 in its COMPLETE marker, uploaded (on S3) by a pool of threads, the marker
        last and only while this run holds the lease. Returns the marker."""
        utag = tag + UNIVERSAL
        src, dst = self.local / tag, self.local / utag
        started = time.monotonic()
        storage.delete_prefix(storage.join(self.remote, utag))  # what a conversion that died left behind
        shutil.rmtree(dst, ignore_errors=True)
        # DeepSpeed's defaults are 4 extract + 2 merge workers; one node converting for all may use all it has.
        # Extraction reads one rank's shard per worker; merging holds one parameter's slices per worker.
        cores = len(os.sched_getaffinity(0))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src)]
        cmd += ["--output_folder", str(dst), "--inject_missing_state", "--num_extract_workers", str(cores)]
        cmd += ["--num_merge_workers", str(max(1, cores // 2))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(proc.stderr.strip()[-2000:])
        shutil.copyfile(src / "trainer_state.json", dst / "trainer_state.json")
        (dst.parent / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; nobody reads it
        converted_s = time.monotonic() - started
        paths = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != MARKER)

        def publish(path: Path) -> tuple[str, dict]:
            rel = path.relative_to(dst).as_posix()
            if self.on_s3:
                storage.upload_file(path, storage.join(self.remote, utag, rel))
            return rel, {"size": path.stat().st_size, "sha256": sha256_file(path)}

        # Many small files (4 per parameter at ZeRO-1/2: ~3,200 for Large): their requests overlap.
        with ThreadPoolExecutor(max(4, cores)) as pool:
            files = dict(pool.map(publish, paths))
        marker = {"tag": utag, "source": tag, "world_size": found.world_size, "zero_stage": found.zero_stage}
        marker |= {"files": files, "writer": self.lease.token if self.lease is not None else None}
        self._check_lease()  # a run whose lease was taken publishes nothing
        storage.write_text(storage.join(self.remote, utag, MARKER), json.dumps(marker, indent=1))
        size = sum(m["size"] for m in files.values())
        log.info(
            "converted %s once: %d files, %.2f GB in %.1fs, published in %.1fs more",
            utag,
            len(files),
            size / 1e9,
            converted_s,
            time.monotonic() - started - converted_s,
        )
        return marker

    def _fetch_universal(self, engine, found: Resumable) -> None:
        """Each node's local rank 0 fetches (and verifies) the converted files that its node's ranks read
        (``universal_files``), all ranks agree, and a copy that fails verification loses its marker (the next
        start converts again) before every rank stops. Collective."""
        marker, utag = found.universal, found.load_tag
        # Parameter names, not file names, and None for "all" (ZeRO-3, where every rank's list would be the
        # whole copy's): what every rank receives stays about one list of the model's parameters as W grows.
        wanted: list = [None] * self.env.world_size
        dist.all_gather_object(wanted, universal_params(engine), group=self.control)
        problem = None
        if self._fs_leader:
            # The ranks that stage in this directory (_group_by_node) for S3; the output directory itself (one
            # for all) otherwise.
            ours = [params for r, params in enumerate(wanted) if r in self.node_ranks or not self.on_s3]
            params = None if None in ours else set().union(*ours)
            problem = fetch_and_verify(self.remote, self.local, utag, marker, universal_files(marker, params))
        size = sum(int(m["size"]) for m in marker["files"].values())
        problem = self._agree(problem, resume_budget(size))
        if problem:
            if self.env.is_main:
                self._check_lease()
                storage.delete_files(storage.join(self.remote, utag), [MARKER])
            raise CheckpointError(
                f"the converted copy {utag} fails verification ({problem}); its marker is deleted, so the next "
                "start converts the checkpoint again: re-run the same command"
            )

    def load(self, engine, found: Resumable) -> dict:
        """Load a checkpoint that ``select`` returned into ``engine``; return its trainer state."""
        if found.universal:
            self._fetch_universal(engine, found)
        engine.load_checkpoint(str(self.local), tag=found.load_tag)
        local_dir = self.local / found.tag
        state = json.loads((local_dir / "trainer_state.json").read_text())
        rng_file = local_dir / "rng" / f"rank_{self.env.rank}.pt"
        # Per-rank RNG (dropout) only means something on the same ranks; the data and the objective's
        # masking do not depend on it (they are keyed by stream position), so a new world size loses nothing.
        if found.world_size == self.env.world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        # The loaded files stay staged until the next save replaces them: a crash before then restarts from them
        # without downloading them again (fetch_and_verify keeps a staged file that matches the marker).
        dist.barrier()
        if self.env.is_main:
            how = f" (converted from {found.world_size} rank(s), ZeRO-{found.zero_stage})" if found.universal else ""
            log.info("resumed from %s/%s at step %d%s", self.remote, found.tag, state["step"], how)
        return state
