"""The S3 client and what every layer above shares: the one-line ``StorageError``, URLs, the retry budget
(``RetryPolicy``, read from the environment; the client's timeouts are part of it) and the I/O counters."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("electra_scale")

TRANSFER_THREADS = 8  # parallel parts of one upload or download; the client pools as many connections

# Backoff jitter draws from its own generator: the training seeds Python's global `random`, and a retry must
# never shift that stream (a run with faults must train exactly like one without).
_JITTER = random.Random()


class StorageError(RuntimeError):
    """A storage problem explained in one line: what failed, on which object, and how to fix it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # stays the one line even if a library appends to ``args`` on the way up
        return self.message


class PreconditionFailed(StorageError):
    """A conditional write or delete found the object other than expected (HTTP 412, or 409 for a concurrent
    conditional write): someone else wrote it first. The caller re-reads and decides; never retried here."""


class ConditionsUnsupported(StorageError):
    """The store refused ``If-None-Match`` / ``If-Match`` as not implemented (HTTP 501)."""


@dataclass
class IOStats:
    """What this process read from storage: GET requests (a resumed body counts again), bytes, and bytes per
    object. The data path's cost per rank is counted here (``electra-scale bench --data-world-size``, and the
    tests that check a rank reads only its own shards). Per process: a dataloader worker counts its own."""

    gets: int = 0
    bytes: int = 0
    by_object: dict[str, int] = field(default_factory=dict)

    def add(self, url: str, nbytes: int, gets: int = 0) -> None:
        self.gets += gets
        self.bytes += nbytes
        self.by_object[url] = self.by_object.get(url, 0) + nbytes

    def snapshot(self) -> IOStats:
        return IOStats(self.gets, self.bytes, dict(self.by_object))


IO = IOStats()


def reset_io_stats() -> IOStats:
    """Zero the counters (in place: ``storage.IO`` stays the one object); returns what they held."""
    old = IO.snapshot()
    IO.gets, IO.bytes, IO.by_object = 0, 0, {}
    return old


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url!r} names no bucket; write s3://BUCKET/PREFIX")
    return bucket, key


# --------------------------------------------------------------------------------------------- retry policy
@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def number(name: str, default: float, kind: type = float) -> Any:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or value <= 0 or not math.isfinite(value):
                raise StorageError(f"{name}={raw!r} is not a positive {kind.__name__}; unset it or fix it")
            return value

        d = cls()
        return cls(
            max_attempts=number("ELECTRA_S3_MAX_ATTEMPTS", d.max_attempts, int),
            backoff_base=number("ELECTRA_S3_BACKOFF_BASE", d.backoff_base),
            backoff_max=number("ELECTRA_S3_BACKOFF_MAX", d.backoff_max),
            connect_timeout=number("ELECTRA_S3_CONNECT_TIMEOUT", d.connect_timeout),
            read_timeout=number("ELECTRA_S3_READ_TIMEOUT", d.read_timeout),
        )

    def backoff(self, failures: int) -> float:
        """Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): spreads a crowd of ranks that
        all hit the same throttled prefix instead of having them retry in lockstep."""
        return _JITTER.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** (failures - 1)))


@functools.lru_cache(maxsize=1)
def s3_client():
    import boto3
    from botocore.config import Config

    policy = RetryPolicy.from_env()
    config = Config(
        # One retry layer, ours: botocore's would multiply the budget and cannot resume a broken body.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=policy.connect_timeout,
        read_timeout=policy.read_timeout,
        # A few files at once (a node's uploader, a conversion's publish), each in up to 8 parts.
        max_pool_connections=4 * TRANSFER_THREADS + 2,
        # Path-style addressing works with every S3-compatible server (SeaweedFS, MinIO, Ceph) and AWS.
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", config=config)


def reset_client() -> None:
    """Forget the S3 client: the next operation builds one from the environment as it is then. For a forked
    process (its parent's pooled connections are not its own) and after changing AWS_* variables."""
    s3_client.cache_clear()
