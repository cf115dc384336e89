"""A node's checkpoint uploader (engine/uploader.py) is a process apart from training: it uploads exactly its
node's files, yields cores to training, survives the stop signals its rank answers by saving, dies with its
rank, and reports a failure in one line. Real SeaweedFS, with the fault proxy holding an upload where a test
needs the uploader caught mid-transfer. (A whole run through it: every checkpoint test on S3.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from electra_scale.engine import uploader
from electra_scale.infra import storage
from tests.cli import PATIENCE, ROOT

HELD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # the file whose upload the proxy holds
PARENT = """
import json, sys
from electra_scale.engine import uploader
proc = uploader.start(json.loads(sys.argv[1]))
print(proc.pid, flush=True)
print(proc.wait(), flush=True)
"""


@pytest.fixture
def staged(tmp_path) -> Path:
    """A checkpoint as ranks 0-2 saved it into one directory; the node uploaded holds ranks 0 and 1."""
    step = tmp_path / "step_0000004"
    names = {
        "mp_rank_00_model_states.pt": 1 << 20,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 9 << 20,  # above 8 MiB: a multipart upload
        HELD: 1000,
        "zero_pp_rank_2_mp_rank_00_optim_states.pt": 1000,  # another node's
        "rng/rank_1.pt": 10,
        "rng/rank_2.pt": 10,  # another node's
        "trainer_state.json": 10,
        "COMPLETE": 10,  # a stale marker is never uploaded by an uploader
        "parts/node_9.json": 10,
    }
    for name, size in names.items():
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_bytes(os.urandom(size))
    return step


def job_for(staged: Path, remote: str) -> dict:
    return {"local_dir": str(staged), "remote_dir": remote, "on_s3": True, "ranks": [0, 1], "part": "parts/node_0.json"}


def test_the_uploader_uploads_exactly_its_nodes_files_with_their_hashes(staged, s3_bucket):
    remote = f"{s3_bucket}/run/checkpoints/step_0000004"
    files = uploader.result(uploader.start(job_for(staged, remote)), PATIENCE)
    ours = {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", HELD}
    ours |= {"rng/rank_1.pt", "trainer_state.json"}
    assert set(files) == ours
    for rel, meta in files.items():
        data = storage.read_bytes(storage.join(remote, rel))
        assert data == (staged / rel).read_bytes() and meta["size"] == len(data)
        assert meta["sha256"] == uploader.sha256_file(staged / rel)
    part = json.loads(storage.read_text(f"{remote}/parts/node_0.json"))
    assert part == {"writer": None, "ranks": [0, 1], "files": files}
    assert set(storage.list_files(remote)) == ours | {"parts/node_0.json"}


def test_a_failed_upload_says_why_in_one_line(staged, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(uploader.UploadError, match="rejected the credentials.*AWS_SECRET_ACCESS_KEY") as failed:
        uploader.result(uploader.start(job_for(staged, f"{s3_bucket}/run")), PATIENCE)
    assert "\n" not in str(failed.value)


def _state(pid: int) -> str:
    """'' once the process is gone; a zombie ('Z') counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return "" if state in ("Z", "X") else state


def _parent_with_held_upload(staged: Path, bucket: str, proxy) -> tuple[subprocess.Popen, int]:
    """A process standing for a rank: it starts the uploader, which gets stuck on HELD's PUT at the proxy."""
    proxy.stall_after(0, match=f"PUT /{bucket}/run/{HELD}")
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": str(ROOT)}
    job = json.dumps(job_for(staged, f"s3://{bucket}/run"))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, job], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert proxy.stalled.wait(PATIENCE), "the uploader never reached the held upload"
    proxy.stalled.clear()
    return parent, child


def test_the_uploader_yields_cores_survives_stop_signals_and_dies_with_its_rank(staged, s3_bucket, s3_server):
    from tests.faultproxy import FaultProxy

    bucket = s3_bucket.removeprefix("s3://")
    with FaultProxy(s3_server.endpoint).start() as proxy:
        parent, child = _parent_with_held_upload(staged, bucket, proxy)
        try:
            # Training keeps its priority; the uploader runs UPLOAD_NICE below it.
            base = os.getpriority(os.PRIO_PROCESS, parent.pid)
            assert os.getpriority(os.PRIO_PROCESS, child) == min(19, base + uploader.UPLOAD_NICE)
            # SLURM's stop signals reach every process of a step: the rank saves, and the upload goes on.
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                os.kill(child, sig)
            proxy.release()
            assert parent.stdout.readline().strip() == "0", "the uploader finished its upload"
            assert parent.wait(timeout=PATIENCE) == 0
        finally:
            parent.kill()

        # kill -9 of the rank (or its watchdog's os._exit) ends its uploader mid-upload.
        parent, child = _parent_with_held_upload(staged, bucket, proxy)
        try:
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + PATIENCE
            while _state(child):
                assert time.monotonic() < deadline, "the uploader outlived its rank"
                time.sleep(0.05)
        finally:
            if _state(child):
                os.kill(child, signal.SIGKILL)
            proxy.release()
