"""Shared fixtures: a real SeaweedFS S3 server (fresh ports, stopped after the session), and a small corpus
with its prepared shards for the training, launch and SLURM tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from electra_scale.data import prepare
from electra_scale.infra import storage
from electra_scale.infra.s3server import SeaweedS3
from tests.corpus import prepare_shards, write_corpus

# DeepSpeed on CPU: say so up front (silences accelerator detection) and reuse compiled ops between tests.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, tmp_path):
    """A fresh bucket on the session's SeaweedFS; boto3 (and child processes) see its endpoint and keys. A run
    writing there without run.cache_dir stages under this test's directory, not the user's ~/.cache."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ELECTRA_SCALE_CACHE", str(tmp_path / "electra-scale-cache"))
    storage.reset_client()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    yield f"s3://{name}"
    storage.reset_client()


# A small corpus (tests/corpus.py) and its shards (seq 128, the tiny preset's), shared by the training tests.
@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> tuple[str, int]:
    return prepare_shards(corpus, str(tmp_path_factory.mktemp("shards") / "tiny"))


@pytest.fixture(scope="session")
def eval_shards(corpus, shards, tmp_path_factory) -> str:
    """A held-out set for ``eval.shards``, in the training shards' tokenizer: ``prepare --eval-fraction``'s."""
    out = str(tmp_path_factory.mktemp("eval-shards") / "tiny")
    prepare(
        [str(corpus)],
        out,
        f"{shards[0]}/tokenizer.json",
        seq_len=128,
        samples_per_shard=64,
        samples_per_block=16,
        progress=False,
        eval_fraction=0.1,
    )
    return f"{out}/eval"


# ------------------------------------------------------------------------------------------------ gpu checks
def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: the GPU path (tests/test_gpu.py); run by scripts/gpu_check.sh with `-m gpu`, on CPU by its --dry-run",
    )


def pytest_collection_modifyitems(config, items):
    """The GPU checks run only when asked for (`-m gpu`): deselected, not skipped, from the CPU suite, which
    runs them through `scripts/gpu_check.sh --dry-run` instead. Then the files in the order `make test` hands
    them to its two workers (see LONGEST_FIRST)."""
    if "gpu" not in (config.option.markexpr or ""):
        keep = [item for item in items if item.get_closest_marker("gpu") is None]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu")])
            items[:] = keep
    items[:] = longest_first(items)


# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each file goes whole to one of two
# workers, in the order collected here, the next file to whichever worker runs low. xdist's default order (most
# tests first) left the SLURM files, few tests but minutes each, to the end, where the other worker ran out of
# files and waited for them. These files go first, longest first (seconds on 2 quiet cores), so that
# the two SLURM files start on different workers and the short files fill in around them; the rest follow in
# xdist's own order, most tests first.
LONGEST_FIRST = (
    "test_slurm.py",  # ~200 s: the 2-node reference job, the frozen rank's restart, requeue and 1-rank resume
    "test_slurm_requeue.py",  # ~100 s: the time limit's USR1 and requeue; a second job refused
    "test_soak.py",  # ~80 s: the short soak
    "test_slurm_prepare.py",
)


def longest_first(items: list) -> list:
    per_file: dict[str, int] = {}
    for item in items:
        per_file[item.path.name] = per_file.get(item.path.name, 0) + 1

    def rank(name: str) -> tuple[int, int]:
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name), 0
        return len(LONGEST_FIRST), -per_file[name]

    return sorted(items, key=lambda item: rank(item.path.name))  # stable: a file's own tests keep their order
