"""Shared fixtures: a real SeaweedFS S3 server (fresh ports, stopped after the session)."""

from __future__ import annotations

import os
import uuid

import pytest

from electra_scale import storage
from electra_scale.s3server import SeaweedS3

# DeepSpeed on CPU: say so up front (silences accelerator detection) and reuse compiled ops between tests.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the session's SeaweedFS; boto3 (and child processes) see its endpoint and keys."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    storage.s3_client.cache_clear()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    yield f"s3://{name}"
    storage.s3_client.cache_clear()
