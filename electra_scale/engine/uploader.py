"""A node's checkpoint uploader: a child process that hashes and uploads what its node's ranks saved.

Why a process, and one per node. Hashing and uploading a checkpoint takes tens of CPU-seconds (Large's 5.7 GB:
48 s here); in threads of the training process that work shares the GIL with the training thread, which must
launch every kernel. scripts/save_stall.py measured the same upload against host-bound steps: +39% mean step
time from a thread, +19% from a child process (docs/faults.md, "What a save costs training"). The node's ranks
share one staging directory, so one process with a few transfer threads does for all of them what a thread
per rank did: each node's work stays the same as W grows, and rank 0 still only gathers each node's list.

The rank that starts it (its node's lowest rank) stays in charge, from a background thread
(engine/checkpoint.py ``_finish``):
- The uploader never marks anything. COMPLETE is written afterwards by rank 0's training process, which
  checks its lease and its watchdog first.
- Its life is tied to that rank's: ``PR_SET_PDEATHSIG`` kills it when the rank's thread that started it dies
  (kill -9, the watchdog's ``os._exit``, a crash). A rank that is gone uploads nothing more.
- It ignores SIGUSR1, SIGTERM and SIGINT. SLURM sends those to every process of a step, and a terminal's
  Ctrl-C goes to the whole process group. To the rank they mean "save and stop", and the save it then makes
  needs the upload in flight to finish. The rank's death still ends the uploader.
- It runs at UPLOAD_NICE above the training's niceness, so it yields cores to training.

Protocol: one JSON job on stdin; the result on stdout, one JSON line: ``{"files": {rel: {"size", "sha256"}}}``
or ``{"error": "..."}``. Logs (S3 retries, say) go to stderr, the rank's log. It imports no torch: it starts in
a fraction of a second.

    python -m electra_scale.engine.uploader < job.json
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from electra_scale.infra import storage

log = logging.getLogger("electra_scale")

MARKER = "COMPLETE"
UPLOAD_NICE = 10  # the uploader's niceness above the training's (scripts/save_stall.py measures it)
FILE_WORKERS = 4  # files hashed and uploaded at once; each upload runs in up to 8 parts of its own
PER_RANK = re.compile(r"zero_pp_rank_(\d+)_|^rng/rank_(\d+)\.pt$")  # files one rank writes (the rest: rank 0)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class UploadError(RuntimeError):
    pass


def owner_rank(relpath: str) -> int:
    """Which rank wrote a file (its node's uploader hashes and uploads it): DeepSpeed names per-rank files
    ``zero_pp_rank_<r>_...``; everything else is written by rank 0."""
    m = PER_RANK.search(relpath)
    return int(m.group(1) or m.group(2)) if m else 0


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------- the parent's side
def start(job: dict) -> subprocess.Popen:
    """Start the uploader for ``job`` (see ``upload``) from the calling thread, which must outlive it: Linux
    sends PDEATHSIG when that thread exits."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    job = {"nice": UPLOAD_NICE, "parent": os.getpid(), **job}
    proc = subprocess.Popen(
        [sys.executable, "-m", "electra_scale.engine.uploader"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    proc.stdin = None  # written and closed: communicate() would flush it again
    return proc


def result(proc: subprocess.Popen, timeout_s: float) -> dict[str, dict]:
    """Wait for the uploader; its files with their sizes and hashes, or UploadError saying why there are none.
    After ``timeout_s`` it is killed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise UploadError(
            f"the uploader did not finish within checkpoint.upload_timeout_s={timeout_s:g}s and was stopped"
        ) from None
    lines = out.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if "files" in answer and proc.returncode == 0:
        return answer["files"]
    if "error" in answer:
        raise UploadError(answer["error"])
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    raise UploadError(f"the uploader process {how} before it reported (its log is above)")


# --------------------------------------------------------------------------------------------- the child's side
def _bind_to_parent(parent: int) -> None:
    """Die with the parent: ask Linux for SIGKILL when it goes, then check it has not already gone (it may have
    died between the fork and this call, and the request only covers a later death)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the rank's exit still ends its pipes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def upload(job: dict) -> dict[str, dict]:
    """Hash (and, for an S3 output, upload) every file of ``job["local_dir"]`` that one of ``job["ranks"]``
    wrote, then write the node's part record ``job["part"]`` (for people and tools). Job keys: local_dir,
    remote_dir (the checkpoint's directory in the output), on_s3, ranks, part (relative to remote_dir), writer
    (the run's lease token, for the record)."""
    local_dir, ranks = Path(job["local_dir"]), set(job["ranks"])
    paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
    mine = [
        (p, rel)
        for p in paths
        if owner_rank(rel := p.relative_to(local_dir).as_posix()) in ranks
        and rel != MARKER
        and not rel.startswith("parts/")
    ]

    def one(item: tuple[Path, str]) -> tuple[str, dict]:
        path, rel = item
        meta = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if job["on_s3"]:
            storage.upload_file(path, storage.join(job["remote_dir"], rel))
        return rel, meta

    with ThreadPoolExecutor(max(1, min(FILE_WORKERS, len(mine)))) as pool:
        files = dict(pool.map(one, mine))
    record = {"writer": job.get("writer"), "ranks": sorted(ranks), "files": files}
    storage.write_text(storage.join(job["remote_dir"], job["part"]), json.dumps(record))
    return files


def main() -> int:
    job = json.loads(sys.stdin.read())
    _bind_to_parent(job["parent"])
    with contextlib.suppress(OSError):
        os.nice(job["nice"])
    label = job.get("label", "uploader")  # the rank's log format (cli.py), so its lines read as the rank's
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [{label}] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    try:
        answer = {"files": upload(job)}
    except Exception as err:  # noqa: BLE001 - reported to the rank, which raises it in the training thread
        answer = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(answer), flush=True)
    return 0 if "files" in answer else 1


if __name__ == "__main__":
    sys.exit(main())
