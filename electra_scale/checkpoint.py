"""Checkpoints that resume exactly, on local disk or S3, and never count until they are complete.

Layout (a local directory or an s3:// prefix, same keys)::

    OUTPUT/checkpoints/step_0000500/   DeepSpeed's files (per rank), trainer_state.json, config.yaml,
                                       tokenizer/, rng/rank_<r>.pt (DeepSpeed does not save RNG state)
    OUTPUT/checkpoints/step_0000500/COMPLETE   written last: every file with its size and sha256
    OUTPUT/checkpoints/latest                  names the newest complete step; written after COMPLETE

Saving: every rank writes with ``engine.save_checkpoint`` into a local directory (the output dir itself, or a
node-local staging dir when the output is on S3), hashes the files it owns, uploads them, and reports them
to rank 0, which writes COMPLETE and then ``latest`` once all ranks are done.

Resuming: try ``latest`` first, then every other complete step, newest first; a checkpoint is used only if
every file in its marker is present with the right size and sha256, otherwise it is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from electra_scale import storage
from electra_scale.launch import DistEnv

log = logging.getLogger("electra_scale")

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")
_OWNER = re.compile(r"zero_pp_rank_(\d+)_|^rng/rank_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def owner_rank(relpath: str) -> int:
    """Which rank wrote (and so hashes and uploads) a file: DeepSpeed names per-rank files
    ``zero_pp_rank_<r>_...``; everything else is written by rank 0."""
    m = _OWNER.search(relpath)
    return int(m.group(1) or m.group(2)) if m else 0


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def fetch_and_verify(remote_root: str, local_root: Path, tag: str) -> str | None:
    """Make a checkpoint's files present under ``local_root/tag`` (downloading them when the checkpoint is on
    S3) and check each against its completion marker. Returns the first problem found, or None."""
    marker = json.loads(storage.read_text(storage.join(remote_root, tag, MARKER)))
    local_dir = Path(local_root, tag)
    for rel, meta in marker["files"].items():
        path = local_dir / rel
        if storage.is_s3(remote_root):
            try:
                storage.download_file(storage.join(remote_root, tag, rel), path)
            except storage.StorageError as err:
                return str(err)
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the marker says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


class Checkpointer:
    def __init__(self, output_dir: str, cache_dir: Path, dist_env: DistEnv, keep_last: int):
        self.remote = storage.join(output_dir, "checkpoints")
        self.on_s3 = storage.is_s3(output_dir)
        # Where DeepSpeed writes and reads: the output dir itself, or node-local staging for S3.
        self.local = Path(cache_dir, "checkpoints") if self.on_s3 else Path(self.remote)
        self.env = dist_env
        self.keep_last = keep_last

    # ------------------------------------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict, extra_files: dict[str, bytes]) -> str:
        """Write a checkpoint for ``step`` from every rank; returns its tag once it is complete."""
        tag = tag_for(step)
        started = time.monotonic()
        local_dir = self.local / tag
        # A directory for this step can survive a crash mid-save (it never got COMPLETE): start it afresh so
        # that no stale file is listed in the new marker. One process per filesystem clears it.
        if (self.env.local_rank == 0) if self.on_s3 else self.env.is_main:
            shutil.rmtree(local_dir, ignore_errors=True)
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
        dist.barrier()

        mine = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if owner_rank(rel) != self.env.rank or rel == MARKER:
                continue
            mine[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            if self.on_s3:
                storage.upload_file(path, storage.join(self.remote, tag, rel))
        gathered: list[dict] = [None] * self.env.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)

        if self.env.is_main:
            files = {k: v for part in gathered for k, v in part.items()}
            marker = {"step": step, "tag": tag, "world_size": self.env.world_size, "files": files}
            storage.write_text(storage.join(self.remote, tag, MARKER), json.dumps(marker, indent=1))
            storage.write_text(storage.join(self.remote, LATEST), tag + "\n")
            self._apply_retention(keep=tag)
            log.info("checkpoint %s complete (%d files, %.1fs)", tag, len(files), time.monotonic() - started)
        dist.barrier()
        if self.on_s3 and self.env.local_rank == 0:
            shutil.rmtree(local_dir, ignore_errors=True)  # the S3 copy is the checkpoint now
        return tag

    def _apply_retention(self, keep: str) -> None:
        complete = self.complete_tags()
        for tag in complete[self.keep_last :]:
            if tag != keep:
                storage.delete_prefix(storage.join(self.remote, tag))
                log.info("retention: deleted %s", tag)

    # ------------------------------------------------------------------------------------------- find
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
    def resume(self, engine) -> dict | None:
        """Load the newest checkpoint that verifies into ``engine``; return its trainer state (None if fresh)."""
        holder = [self.candidates() if self.env.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        tags: list[str] = holder[0]
        problems = []
        for tag in tags:
            # One process per node downloads and verifies; all ranks then agree before loading.
            problem = fetch_and_verify(self.remote, self.local, tag) if self.env.local_rank == 0 else None
            verdicts: list = [None] * self.env.world_size
            dist.all_gather_object(verdicts, problem)
            problem = next((p for p in verdicts if p), None)
            if problem:
                log.warning("checkpoint %s fails verification (%s); trying an older one", tag, problem)
                problems.append(f"{tag}: {problem}")
                continue
            engine.load_checkpoint(str(self.local), tag=tag)
            local_dir = self.local / tag
            state = json.loads((local_dir / "trainer_state.json").read_text())
            rng_file = local_dir / "rng" / f"rank_{self.env.rank}.pt"
            if state.get("world_size") == self.env.world_size and rng_file.exists():
                set_rng_state(torch.load(rng_file, weights_only=False))
            dist.barrier()
            if self.on_s3 and self.env.local_rank == 0:
                shutil.rmtree(local_dir, ignore_errors=True)  # loaded; S3 holds the checkpoint
            if self.env.is_main:
                log.info("resumed from %s/%s at step %d", self.remote, tag, state["step"])
            return state
        if problems:
            raise CheckpointError(
                f"no checkpoint in {self.remote} verifies ({'; '.join(problems)}); refusing to start over and "
                "overwrite the run: fix or remove the broken checkpoints, or use a new run.output_dir"
            )
        return None
