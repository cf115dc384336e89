"""What the rest of the package calls: read, write, list, upload, download and delete, on local paths and
``s3://`` URLs alike, each S3 operation under the retry loop."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from electra_scale.infra.storage.client import (
    IO,
    TRANSFER_THREADS,
    ConditionsUnsupported,
    PreconditionFailed,
    StorageError,
    is_s3,
    join,
    s3_client,
    split_s3,
)
from electra_scale.infra.storage.reader import S3Reader
from electra_scale.infra.storage.retry import (
    Attempts,
    cause,
    error_status,
    explain,
    is_transient,
    retry_call,
    retryable_errors,
)

log = logging.getLogger("electra_scale")

MULTIPART_THRESHOLD = 8 << 20  # files above this go up in parts, as boto3's transfer manager does
PART_SIZE = 8 << 20
DOWNLOAD_PART_SIZE = 32 << 20  # larger objects come down as parallel ranged GETs


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
            if error_status(err)[1] == 404:
                return False
            raise

    return retry_call(url, "check", head)


def object_size(url: str) -> int:
    """Bytes of a local file or S3 object (one HEAD)."""
    if not is_s3(url):
        try:
            return Path(url).stat().st_size
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    bucket, key = split_s3(url)
    return int(retry_call(url, "check", s3_client().head_object, Bucket=bucket, Key=key)["ContentLength"])


def _open_local(url: str) -> BinaryIO:
    try:
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError as err:
        raise StorageError(f"{url} does not exist.") from err


def open_read(url: str, start: int = 0) -> BinaryIO:
    """A streaming, file-like reader from byte ``start`` to the end: a local file, or an S3 object whose body
    (one GET, ranged when ``start`` > 0) resumes where it broke."""
    if not is_s3(url):
        f = _open_local(url)
        f.seek(start)
        return f
    return io.BufferedReader(S3Reader(url, start), buffer_size=1 << 20)  # type: ignore[return-value]


class RangedReader(io.RawIOBase):
    """A seekable reader of an S3 object in which every read is one ranged GET (``read_range``: retried, and
    resumed if a body breaks). For formats read by offset rather than front to back, such as Parquet (its
    footer, then one column's chunk per row group): only the bytes asked for are fetched."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.pos, self.length = url, 0, object_size(url)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        data = read_range(self.url, self.pos, end)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


def open_seekable(url: str) -> BinaryIO:
    """A seekable, file-like reader: a local file, or an S3 object read by ranged GETs (``RangedReader``)."""
    if not is_s3(url):
        return _open_local(url)
    return RangedReader(url)  # type: ignore[return-value]


def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    with S3Reader(url) as reader:
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
    except retryable_errors() as err:
        if error_status(err)[1] == 416:  # the range starts past the end of the object
            return b""
        if not is_transient(err):
            raise explain(err, url, "read") from err
        log.warning(
            "S3 read %s failed (%s); retrying bytes %d-%d with the resumable reader", url, cause(err), start, end - 1
        )
    with S3Reader(url, start, end) as reader:
        return reader.readall()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local writes go to a temporary file and are renamed into place, so a reader
    (or a crash) never sees half a file; an S3 PUT is atomic by itself."""
    if is_s3(url):
        bucket, key = split_s3(url)
        retry_call(url, "write", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
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


# ------------------------------------------------------------------------------ conditional (S3 only)
# One object that several processes may race to write (the run's lease, engine/lease.py): S3's conditional
# requests (If-None-Match: * creates only if absent, If-Match: <etag> replaces or deletes only what was read)
# make each write a compare-and-swap on the server. Local disk has no such request; the lease uses its own
# exclusive-create scheme there.
def read_versioned(url: str) -> tuple[bytes, str, float] | None:
    """An S3 object's bytes, its ETag, and its age in seconds by the *store's* clock (the response's ``Date``
    minus ``LastModified``, 1 s resolution), so that hosts whose clocks differ agree on it. None if absent."""
    from email.utils import parsedate_to_datetime

    from botocore import exceptions as bex

    bucket, key = split_s3(url)

    def get() -> tuple[bytes, str, float] | None:
        try:
            resp = s3_client().get_object(Bucket=bucket, Key=key)
        except bex.ClientError as err:
            if error_status(err)[1] == 404:
                return None
            raise
        data = resp["Body"].read()
        date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else None
        modified = resp["LastModified"].timestamp()
        return data, resp["ETag"], max(0.0, (now if now is not None else time.time()) - modified)

    return retry_call(url, "read", get)


def _conditional(url: str, action: str, call) -> Any:
    from botocore import exceptions as bex

    def attempt() -> Any:
        try:
            return call()
        except bex.ClientError as err:
            code, status = error_status(err)
            if status in (409, 412):
                raise PreconditionFailed(f"{url} changed before the {action} ({code or status})") from err
            if status == 501 or code == "NotImplemented":
                raise ConditionsUnsupported(
                    f"the store does not implement conditional requests ({action} {url})"
                ) from err
            raise

    return retry_call(url, action, attempt)


def put_if(url: str, data: bytes, etag: str | None) -> str:
    """Write an S3 object only if it is absent (``etag=None``) or still has ``etag``; returns the new ETag.
    Raises ``PreconditionFailed`` otherwise. A retry after a lost answer can also fail the precondition on the
    write that did land: the caller re-reads to tell (the lease compares the record)."""
    bucket, key = split_s3(url)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    put = lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)  # noqa: E731
    return _conditional(url, "conditional write", put)["ETag"]


def delete_if(url: str, etag: str) -> None:
    """Delete an S3 object only if it still has ``etag`` (``PreconditionFailed`` otherwise)."""
    bucket, key = split_s3(url)
    _conditional(url, "conditional delete", lambda: s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=etag))


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
        retry_call(url, "upload to", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    # S3 allows 10,000 parts: grow the part size (in MiB steps) for files above ~80 GB.
    part_size = max(PART_SIZE, math.ceil(size / 9000 / (1 << 20)) * (1 << 20))
    n_parts = math.ceil(size / part_size)
    upload_id = retry_call(url, "upload to", s3_client().create_multipart_upload, Bucket=bucket, Key=key)["UploadId"]

    def part(i: int) -> dict[str, Any]:
        with open(local_path, "rb") as f:
            f.seek(i * part_size)
            data = f.read(part_size)
        resp = retry_call(
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

    attempts = Attempts(url, "upload to")
    while True:
        try:
            s3_client().complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            return
        except retryable_errors() as err:
            # A retry after a lost answer finds the upload already completed: that is success.
            if attempts.total and isinstance(err, bex.ClientError) and error_status(err)[0] == "NoSuchUpload":
                head = retry_call(url, "check", s3_client().head_object, Bucket=bucket, Key=key)
                if head["ContentLength"] == size:
                    return
            attempts.failed(err)


def download_file(url: str, local_path: str | Path, size: int | None = None) -> None:
    """Copy ``url`` to a local file (written to ``.part`` and renamed). Large objects come down as parallel
    ranged GETs, each resuming where it broke; all must see the same ETag. ``size``: the object's bytes when the
    caller knows them (a checkpoint's marker lists them), which saves the HEAD; the ETag is then the first GET's,
    and the caller checks what it got (the marker's sha256)."""
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
    etag = None
    if size is None:
        head = retry_call(url, "download", s3_client().head_object, Bucket=bucket, Key=key)
        size, etag = int(head["ContentLength"]), head.get("ETag")

    def fetch(start: int) -> None:
        end = min(size, start + DOWNLOAD_PART_SIZE)
        with S3Reader(url, start, end, etag) as reader, open(tmp, "r+b") as f:
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

    return sorted(retry_call(prefix, "list", collect))


def delete_prefix(prefix: str) -> None:
    """Delete everything below ``prefix`` (a checkpoint directory, typically): one listing, then
    ``delete_files``."""
    if not is_s3(prefix):
        shutil.rmtree(prefix, ignore_errors=True)
        return
    delete_files(prefix, list_files(prefix))


DELETE_BATCH = 1000  # S3's DeleteObjects takes at most 1,000 keys a request


def delete_files(prefix: str, names: list[str]) -> None:
    """Delete ``names`` (paths relative to ``prefix``): on S3 one DeleteObjects per 1,000 keys, each retried as
    a whole (deleting a key twice, or one already gone, is no error)."""
    if not is_s3(prefix):
        for name in names:
            Path(prefix, name).unlink(missing_ok=True)
        return
    bucket, key = split_s3(prefix)
    keys = [f"{key.rstrip('/')}/{name}" if key else name for name in names]
    for i in range(0, len(keys), DELETE_BATCH):
        batch = keys[i : i + DELETE_BATCH]

        def delete(batch=batch) -> None:
            objects = {"Objects": [{"Key": k} for k in batch], "Quiet": True}
            errors = s3_client().delete_objects(Bucket=bucket, Delete=objects).get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{prefix}: {len(errors)} of {len(batch)} deletes failed, the first "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

        retry_call(prefix, "delete", delete)


def iter_lines(url: str) -> Iterator[str]:
    """Text lines of a local or S3 file; ``.gz`` files are decompressed on the fly."""
    import gzip

    raw = open_read(url)
    stream = gzip.GzipFile(fileobj=raw) if str(url).endswith(".gz") else raw
    with io.TextIOWrapper(stream, encoding="utf-8") as text:
        yield from text


def file_in_the_way(url: str) -> Path | None:
    """The file (``url`` itself or a parent) that stops a local directory from being made at ``url``; None if
    there is none, and always for S3, whose prefixes are no objects."""
    if is_s3(url):
        return None
    target = Path(url)
    return next((p for p in (target, *target.parents) if p.exists() and not p.is_dir()), None)


def check_writable(url: str) -> None:
    """Fail early, with a clear message, if ``url`` cannot be written (bad endpoint, credentials, bucket; a
    local path that is a file, or unwritable). Leaves ``url`` as it found it: a local directory the probe had to
    create is removed again, so that a run which then fails on its input leaves nothing behind."""
    probe = join(url, ".electra-scale-write-probe")
    if is_s3(probe):
        write_bytes(probe, b"ok")
        bucket, key = split_s3(probe)
        retry_call(probe, "delete", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    target = Path(url)
    blocker = file_in_the_way(url)
    if blocker is not None:
        raise StorageError(f"{url} cannot be a directory: {blocker} is a file")
    created = [p for p in (target, *target.parents) if not p.exists()]
    try:
        write_bytes(probe, b"ok")
        Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise StorageError(f"cannot write to {url}: {err.strerror or err}") from err
    finally:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
