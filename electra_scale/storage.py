"""One small interface over local paths and ``s3://bucket/key`` URLs.

Every read and write of shards, manifests, checkpoints and metrics goes through here, so there is exactly one
place that knows about boto3, retries and the error messages a user sees when S3 is misconfigured.

S3 settings come from boto3's own environment variables, so the same run works against AWS, a cluster's
object store or the demo's local SeaweedFS without code changes:

    AWS_ENDPOINT_URL            e.g. http://127.0.0.1:8333 (unset for AWS itself)
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (or a profile / instance role)

Faults (docs/faults.md). botocore's own retries are switched off; every S3 operation runs under the retry loop
below instead, which also covers what botocore never retries: a GET body that breaks mid-stream (resumed with
``Range: bytes=<offset>-`` after checking the ETag did not change) and the parts of multipart transfers.
Retried: connection refused/reset/closed, truncated bodies, timeouts, HTTP 500/502/503/504 and throttling
codes (SlowDown...). Not retried, they fail at once: missing credentials, 403, 404, NoSuchBucket, other 4xx.
The budget, read from the environment when an operation starts:

    ELECTRA_S3_MAX_ATTEMPTS     tries per operation (default 8); for a streamed body, failures in a row
                                without a byte of progress, so a long download on a flaky link still ends
    ELECTRA_S3_BACKOFF_BASE     seconds (default 0.5); before try k+1 sleep uniform(0, min(MAX, BASE * 2**(k-1)))
    ELECTRA_S3_BACKOFF_MAX      seconds (default 20): the cap of one sleep ("full jitter" exponential backoff)
    ELECTRA_S3_CONNECT_TIMEOUT  seconds (default 5) to open a connection
    ELECTRA_S3_READ_TIMEOUT     seconds (default 60) a socket may stay silent; a server that accepts and never
                                answers fails after this, so nothing hangs

(the two timeouts are read when the client is created). With the defaults an operation gives up after at most
7 sleeps of at most 0.5+1+2+4+8+16+20 = 51.5 s in all (about half that on average), plus 8 tries of at most
the timeouts. Then a ``StorageError`` names the object, the last cause and the budget.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

log = logging.getLogger("electra_scale")
T = TypeVar("T")

MULTIPART_THRESHOLD = 8 << 20  # files above this go up in parts, as boto3's transfer manager does
PART_SIZE = 8 << 20
DOWNLOAD_PART_SIZE = 32 << 20  # larger objects come down as parallel ranged GETs
TRANSFER_THREADS = 8
READ_CHUNK = 64 << 10  # reads without urllib3's read1: the most a broken GET body loses

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
    """Zero the counters; returns what they held."""
    global IO
    old, IO = IO, IOStats()
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


_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)


@functools.lru_cache(maxsize=1)
def _errors() -> tuple[type[BaseException], ...]:
    """What an S3 call can raise that the retry loop looks at (anything else is a bug and propagates)."""
    import urllib3
    from botocore import exceptions as bex

    return (bex.BotoCoreError, bex.ClientError, OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)


class _BodyEndedEarly(ConnectionError):
    """The server closed a response before the promised byte count (a killed server can do that cleanly)."""


def _status(err: BaseException) -> tuple[str, int | None]:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_transient(err: BaseException) -> bool:
    """Worth another try: the network or an overloaded server, not the request or its credentials."""
    import urllib3
    from botocore import exceptions as bex

    if isinstance(err, bex.ClientError):
        code, status = _status(err)
        return status in (500, 502, 503, 504) or code in _RETRY_CODES
    return isinstance(
        err,
        bex.ConnectionError  # refused, connect timeout, proxy/SSL trouble
        | bex.HTTPClientError  # closed, reset, read timeout, body broke mid-stream
        | bex.IncompleteReadError
        | ConnectionError  # the builtin: reset/refused/aborted, and _BodyEndedEarly
        | TimeoutError
        | http.client.HTTPException
        | urllib3.exceptions.HTTPError,
    )


class _Attempts:
    """The failures of one operation: sleeps the backoff after each transient one, and raises a one-line
    ``StorageError`` at once for a permanent one, or once the budget is spent."""

    def __init__(self, url: str, action: str):
        self.url, self.action = url, action
        self.policy = RetryPolicy.from_env()
        self.failures = 0  # in a row, since the last progress
        self.total = 0
        self.started = time.monotonic()

    def failed(self, err: BaseException, note: str = "") -> None:
        if not is_transient(err):
            raise _explain(err, self.url, self.action) from err
        self.failures += 1
        self.total += 1
        if self.failures >= self.policy.max_attempts:
            explained = _explain(err, self.url, self.action).message
            raise StorageError(
                f"{explained} (gave up after {self.failures} failed tries in a row, "
                f"{time.monotonic() - self.started:.1f}s; ELECTRA_S3_MAX_ATTEMPTS={self.policy.max_attempts} "
                "sets the budget)"
            ) from err
        delay = self.policy.backoff(self.failures)
        log.warning(
            "S3 %s %s failed (%s), try %d of %d in %.2fs%s",
            self.action,
            self.url,
            _cause(err),
            self.failures + 1,
            self.policy.max_attempts,
            delay,
            note,
        )
        time.sleep(delay)

    def progressed(self) -> None:
        if self.failures:
            self.failures, self.started = 0, time.monotonic()


def _retry(url: str, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` under the retry budget; errors become one-line ``StorageError``s."""
    attempts = _Attempts(url, action)
    while True:
        try:
            return fn(*args, **kwargs)
        except _errors() as err:
            attempts.failed(err)


# --------------------------------------------------------------------------------------------- S3 client
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
        max_pool_connections=max(10, TRANSFER_THREADS + 2),
        # Path-style addressing works with every S3-compatible server (SeaweedFS, MinIO, Ceph) and AWS.
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", config=config)


def reset_client() -> None:
    """Forget the S3 client: the next operation builds one from the environment as it is then. For a forked
    process (its parent's pooled connections are not its own) and after changing AWS_* variables."""
    s3_client.cache_clear()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _label(err: BaseException) -> str:
    """ "SlowDown (HTTP 503)", or "HTTP 503" when the code is only the status (HEAD answers have no body)."""
    code, status = _status(err)
    return f"{code} (HTTP {status})" if code and code != str(status) else f"HTTP {status}"


def _cause(err: BaseException) -> str:
    code, status = _status(err)
    if code or status:
        message = (getattr(err, "response", None) or {}).get("Error", {}).get("Message", "")
        return _one_line(f"{_label(err)}{': ' + message if message else ''}")
    return _one_line(f"{type(err).__name__}: {err}")


def _explain(err: BaseException, url: str, action: str) -> StorageError:
    """Turn a botocore exception into one readable line that names the object and the fix."""
    from botocore import exceptions as bex

    if isinstance(err, StorageError):
        return err
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS default endpoint")
    if isinstance(err, bex.ReadTimeoutError | TimeoutError):
        return StorageError(
            f"timed out: the S3 endpoint {endpoint} sent nothing for {RetryPolicy.from_env().read_timeout:g}s "
            f"(ELECTRA_S3_READ_TIMEOUT) to {action} {url}; check that the server is up and not overloaded."
        )
    if isinstance(err, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} to {action} {url}: {_one_line(str(err))}. "
            "Check AWS_ENDPOINT_URL and that the server is running."
        )
    if isinstance(err, bex.NoCredentialsError | bex.PartialCredentialsError):
        return StorageError(
            f"no S3 credentials to {action} {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        )
    if isinstance(err, bex.ClientError):
        code, status = _status(err)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
            return StorageError(
                f"S3 at {endpoint} rejected the credentials ({code or status}) to {action} {url}; "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
            )
        if code == "NoSuchBucket":
            bucket, _ = split_s3(url)
            return StorageError(
                f"S3 bucket {bucket!r} does not exist at {endpoint} ({action} {url}); create it first, "
                f"e.g. `aws s3 mb s3://{bucket}`."
            )
        if code in ("NoSuchKey", "404") or status == 404:
            return StorageError(f"{url} does not exist ({action}).")
        message = _one_line((err.response or {}).get("Error", {}).get("Message", ""))
        return StorageError(f"S3 answered {_label(err)} to {action} {url}: {message or _one_line(str(err))}")
    if is_transient(err):
        return StorageError(f"the connection to the S3 endpoint {endpoint} failed to {action} {url}: {_cause(err)}")
    return StorageError(f"failed to {action} {url}: {_cause(err)}")


# --------------------------------------------------------------------------------------------- resumable GET
class _S3Reader(io.RawIOBase):
    """The body of one GET (bytes ``[start, end)`` of the object) that survives broken connections.

    botocore retries a request, but not a body that breaks while it is being read. Here a break re-issues
    the GET with ``Range: bytes=<offset>-`` and carries on from the same byte, after checking that the
    object's ETag is still the one the first answer had (else the bytes would splice two versions)."""

    def __init__(self, url: str, start: int = 0, end: int | None = None, etag: str | None = None):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.pos, self.end, self.etag = start, end, etag
        self.bounded = end is not None  # the caller wants [start, end), not "to the end of the object"
        self.resumes = 0
        self.attempts = _Attempts(url, "read")
        self.body: Any = None
        self.discard = 0  # bytes to drop first: the answer of a server that ignored our Range
        self._open()  # a missing object or bad credentials fail here, at open time

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        # A whole object is asked for without a Range: "bytes=0-" on an empty object is an error (416).
        ranged = self.pos > 0 or self.bounded
        if ranged:
            kwargs["Range"] = f"bytes={self.pos}-{self.end - 1 if self.bounded else ''}"
        while True:
            try:
                IO.add(self.url, 0, gets=1)
                resp = s3_client().get_object(**kwargs)
                break
            except _errors() as err:
                if self.bounded and _status(err)[1] == 416:  # the range starts past the object's end
                    self.end = self.pos
                    return
                self.attempts.failed(err)
        etag = resp.get("ETag")
        if self.etag is None:
            self.etag = etag
        elif etag != self.etag:
            resp["Body"].close()
            raise StorageError(
                f"{self.url} changed while it was being read (ETag {self.etag} -> {etag}); something overwrote "
                "it: don't rewrite objects a run is reading"
            )
        if resp["ResponseMetadata"]["HTTPStatusCode"] == 206:
            total = resp.get("ContentRange", "").rpartition("/")[2]
        else:
            total, self.discard = resp.get("ContentLength"), self.pos if ranged else 0
        if str(total).isdigit():  # a bounded range past the end of the object gets what there is
            self.end = int(total) if self.end is None else min(self.end, int(total))
        self.body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.end is not None:
            view = view[: max(0, self.end - self.pos)]
        if not len(view):
            return 0
        while True:
            try:
                if self.body is None:
                    self._open()
                while self.discard:
                    dropped = self.body.read(min(self.discard, 1 << 20))
                    if not dropped:
                        raise _BodyEndedEarly(f"the body ended before byte {self.pos}")
                    self.discard -= len(dropped)
                n = self._read_some(view)
                if n == 0:
                    if self.end is None:
                        return 0
                    raise _BodyEndedEarly(f"the body ended at byte {self.pos} of {self.end}")
                self.pos += n
                IO.add(self.url, n)
                self.attempts.progressed()
                return n
            except _errors() as err:
                self._close_body()
                self.attempts.failed(err, f"; resuming at byte {self.pos} with a Range GET")
                self.resumes += 1

    def _read_some(self, view: memoryview) -> int:
        """What has arrived, up to ``len(view)``. A plain read blocks until the whole buffer is full, so a break
        would lose what the call had received; urllib3's ``read1`` hands over each piece as it comes. botocore
        keeps that response as ``_raw_stream`` (long-standing, but private): without it, read in small chunks."""
        read1 = getattr(getattr(self.body, "_raw_stream", None), "read1", None)
        if read1 is None:
            return self.body.readinto(view[:READ_CHUNK])
        data = read1(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        if self.end is None:
            return super().readall()
        out = bytearray(max(0, self.end - self.pos))
        view, filled = memoryview(out), 0
        while filled < len(out):
            filled += self.readinto(view[filled:])
        return bytes(out)

    def _close_body(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close too; it is dropped
                self.body.close()
            self.body = None

    def close(self) -> None:
        self._close_body()
        super().close()


# --------------------------------------------------------------------------------------------- operations
def exists(url: str) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    from botocore import exceptions as bex

    bucket, key = split_s3(url)

    def head() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except bex.ClientError as err:
            if _status(err)[1] == 404:
                return False
            raise

    return _retry(url, "check", head)


def open_read(url: str) -> BinaryIO:
    """A streaming, file-like reader: a local file, or an S3 object whose body resumes where it broke."""
    if not is_s3(url):
        try:
            return open(url, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    return io.BufferedReader(_S3Reader(url), buffer_size=1 << 20)  # type: ignore[return-value]


def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    with _S3Reader(url) as reader:
        return reader.readall()


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a local file or S3 object (one ranged GET, resumed if it breaks). Fewer bytes
    come back when the object is shorter, so the caller can say a shard is truncated and where."""
    if end <= start:
        return b""
    if not is_s3(url):
        try:
            with open(url, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
        IO.add(url, len(data), gets=1)
        return data
    # One GET read whole: half the CPU of the resumable reader's chunked reads. If it fails (a body that
    # breaks, a 503...), the resumable reader takes over: it retries, and resumes where a body broke.
    bucket, key = split_s3(url)
    try:
        IO.add(url, 0, gets=1)
        resp = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        data = resp["Body"].read()
        if resp["ResponseMetadata"]["HTTPStatusCode"] != 206:  # a server that ignored the Range
            data = data[start:end]
        IO.add(url, len(data))
        return data
    except _errors() as err:
        if _status(err)[1] == 416:  # the range starts past the end of the object
            return b""
        if not is_transient(err):
            raise _explain(err, url, "read") from err
        log.warning(
            "S3 read %s failed (%s); retrying bytes %d-%d with the resumable reader", url, _cause(err), start, end - 1
        )
    with _S3Reader(url, start, end) as reader:
        return reader.readall()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local writes go to a temporary file and are renamed into place, so a reader
    (or a crash) never sees half a file; an S3 PUT is atomic by itself."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _retry(url, "write", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def upload_file(local_path: str | Path, url: str) -> None:
    """Copy a local file to ``url``: one PUT up to 8 MiB, else a multipart upload whose parts (8 threads) are
    retried one by one, so a reset costs one part, not the file."""
    if not is_s3(url):
        dst = Path(url)
        if dst.resolve() == Path(local_path).resolve():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dst)
        return
    bucket, key = split_s3(url)
    try:
        size = os.path.getsize(local_path)
    except OSError as err:
        raise StorageError(f"cannot upload {local_path} to {url}: {err.strerror}") from err
    if size <= MULTIPART_THRESHOLD:
        data = Path(local_path).read_bytes()
        _retry(url, "upload to", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    # S3 allows 10,000 parts: grow the part size (in MiB steps) for files above ~80 GB.
    part_size = max(PART_SIZE, math.ceil(size / 9000 / (1 << 20)) * (1 << 20))
    n_parts = math.ceil(size / part_size)
    upload_id = _retry(url, "upload to", s3_client().create_multipart_upload, Bucket=bucket, Key=key)["UploadId"]

    def part(i: int) -> dict[str, Any]:
        with open(local_path, "rb") as f:
            f.seek(i * part_size)
            data = f.read(part_size)
        resp = _retry(
            url,
            f"upload part {i + 1}/{n_parts} to",
            lambda: s3_client().upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=data),
        )
        return {"PartNumber": i + 1, "ETag": resp["ETag"]}

    try:
        with ThreadPoolExecutor(min(TRANSFER_THREADS, n_parts)) as pool:
            parts = list(pool.map(part, range(n_parts)))
        _complete_multipart(url, bucket, key, upload_id, parts, size)
    except BaseException:
        # Best effort (the original error is the one to report): an unfinished upload's parts otherwise cost
        # storage until a lifecycle rule removes them.
        with contextlib.suppress(Exception):
            s3_client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _complete_multipart(url: str, bucket: str, key: str, upload_id: str, parts: list, size: int) -> None:
    from botocore import exceptions as bex

    attempts = _Attempts(url, "upload to")
    while True:
        try:
            s3_client().complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            return
        except _errors() as err:
            # A retry after a lost answer finds the upload already completed: that is success.
            if attempts.total and isinstance(err, bex.ClientError) and _status(err)[0] == "NoSuchUpload":
                head = _retry(url, "check", s3_client().head_object, Bucket=bucket, Key=key)
                if head["ContentLength"] == size:
                    return
            attempts.failed(err)


def download_file(url: str, local_path: str | Path) -> None:
    """Copy ``url`` to a local file (written to ``.part`` and renamed). Large objects come down as parallel
    ranged GETs, each resuming where it broke; all must see the same ETag."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(url):
        if not Path(url).exists():
            raise StorageError(f"{url} does not exist.")
        if Path(url).resolve() != local_path.resolve():
            shutil.copyfile(url, local_path)
        return
    bucket, key = split_s3(url)
    tmp = local_path.with_name(f".{local_path.name}.part")
    head = _retry(url, "download", s3_client().head_object, Bucket=bucket, Key=key)
    size, etag = int(head["ContentLength"]), head.get("ETag")

    def fetch(start: int) -> None:
        end = min(size, start + DOWNLOAD_PART_SIZE)
        with _S3Reader(url, start, end, etag) as reader, open(tmp, "r+b") as f:
            f.seek(start)
            while chunk := reader.read(1 << 20):
                f.write(chunk)
            if reader.pos != end:
                raise StorageError(f"{url}: got {reader.pos - start} of {end - start} bytes from byte {start}")

    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        starts = range(0, size, DOWNLOAD_PART_SIZE)
        with ThreadPoolExecutor(max(1, min(TRANSFER_THREADS, len(starts)))) as pool:
            list(pool.map(fetch, starts))
        os.replace(tmp, local_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def list_files(prefix: str) -> list[str]:
    """Every file below ``prefix``, as paths relative to it (sorted). Missing prefix -> empty list."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""

    def collect() -> list[str]:  # a listing that broke half-way starts over
        paginator = s3_client().get_paginator("list_objects_v2")
        return [
            obj["Key"][len(key) :]
            for page in paginator.paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])
        ]

    return sorted(_retry(prefix, "list", collect))


def delete_prefix(prefix: str) -> None:
    """Delete everything below ``prefix`` (a checkpoint directory, typically)."""
    if not is_s3(prefix):
        shutil.rmtree(prefix, ignore_errors=True)
        return
    bucket, key = split_s3(prefix)
    for name in list_files(prefix):
        full = f"{key.rstrip('/')}/{name}"
        _retry(prefix, "delete", lambda k=full: s3_client().delete_object(Bucket=bucket, Key=k))


def iter_lines(url: str) -> Iterator[str]:
    """Text lines of a local or S3 file; ``.gz`` files are decompressed on the fly."""
    import gzip

    raw = open_read(url)
    stream = gzip.GzipFile(fileobj=raw) if str(url).endswith(".gz") else raw
    with io.TextIOWrapper(stream, encoding="utf-8") as text:
        yield from text


def check_writable(url: str) -> None:
    """Fail early, with a clear message, if ``url`` cannot be written (bad endpoint, credentials, bucket)."""
    probe = join(url, ".electra-scale-write-probe")
    write_bytes(probe, b"ok")
    if is_s3(probe):
        bucket, key = split_s3(probe)
        _retry(probe, "delete", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
    else:
        Path(probe).unlink(missing_ok=True)
