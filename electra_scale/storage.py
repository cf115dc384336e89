"""One small interface over local paths and ``s3://bucket/key`` URLs.

Every read and write of shards, manifests, checkpoints and metrics goes through here, so there is exactly one
place that knows about boto3, retries and the error messages a user sees when S3 is misconfigured.

S3 settings come from boto3's own environment variables, so the same run works against AWS, a cluster's
object store or the demo's local SeaweedFS without code changes:

    AWS_ENDPOINT_URL          e.g. http://127.0.0.1:8333 (unset for AWS itself)
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (or a profile / instance role)
    ELECTRA_S3_MAX_ATTEMPTS   botocore retry budget per request (default 5, "standard" mode: backoff + jitter)
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class StorageError(RuntimeError):
    """A storage problem explained in one line: what failed, on which object, and how to fix it."""


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


# --------------------------------------------------------------------------------------------- S3 client
@functools.lru_cache(maxsize=1)
def s3_client():
    import boto3
    from botocore.config import Config

    attempts = int(os.environ.get("ELECTRA_S3_MAX_ATTEMPTS", "5"))
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=float(os.environ.get("ELECTRA_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=float(os.environ.get("ELECTRA_S3_READ_TIMEOUT", "60")),
        # Path-style addressing works with every S3-compatible server (SeaweedFS, MinIO, Ceph) and AWS.
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", config=config)


def _explain(err: Exception, url: str, action: str) -> StorageError:
    """Turn a botocore exception into one readable line that names the object and the fix."""
    from botocore import exceptions as bex

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the AWS default endpoint")
    if isinstance(err, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ReadTimeoutError):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} to {action} {url}: {err}. "
            "Check AWS_ENDPOINT_URL and that the server is running."
        )
    if isinstance(err, bex.NoCredentialsError | bex.PartialCredentialsError):
        return StorageError(
            f"no S3 credentials to {action} {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        )
    if isinstance(err, bex.ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
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
        return StorageError(f"S3 error {code or status} to {action} {url}: {err}")
    return StorageError(f"failed to {action} {url}: {type(err).__name__}: {err}")


def _s3_call(url: str, action: str, fn, *args, **kwargs):
    from botocore import exceptions as bex

    try:
        return fn(*args, **kwargs)
    except (bex.BotoCoreError, bex.ClientError) as err:
        raise _explain(err, url, action) from err


# --------------------------------------------------------------------------------------------- operations
def exists(url: str) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    from botocore import exceptions as bex

    bucket, key = split_s3(url)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except bex.ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise _explain(err, url, "check") from err
    except bex.BotoCoreError as err:
        raise _explain(err, url, "check") from err


def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    bucket, key = split_s3(url)
    resp = _s3_call(url, "read", s3_client().get_object, Bucket=bucket, Key=key)
    return _s3_call(url, "read", resp["Body"].read)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local writes go to a temporary file and are renamed into place, so a reader
    (or a crash) never sees half a file; an S3 PUT is atomic by itself."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _s3_call(url, "write", s3_client().put_object, Bucket=bucket, Key=key, Body=data)
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
    """Copy a local file to ``url``. boto3's transfer manager switches to multipart above 8 MiB."""
    if is_s3(url):
        bucket, key = split_s3(url)
        _s3_call(url, "upload to", s3_client().upload_file, str(local_path), bucket, key)
        return
    dst = Path(url)
    if dst.resolve() == Path(local_path).resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(local_path, tmp)
    os.replace(tmp, dst)


def download_file(url: str, local_path: str | Path) -> None:
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
    _s3_call(url, "download", s3_client().download_file, bucket, key, str(tmp))
    os.replace(tmp, local_path)


def list_files(prefix: str) -> list[str]:
    """Every file below ``prefix``, as paths relative to it (sorted). Missing prefix -> empty list."""
    if not is_s3(prefix):
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    names: list[str] = []

    def _collect():
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            names.extend(obj["Key"][len(key) :] for obj in page.get("Contents", []))

    _s3_call(prefix, "list", _collect)
    return sorted(names)


def delete_prefix(prefix: str) -> None:
    """Delete everything below ``prefix`` (a checkpoint directory, typically)."""
    if not is_s3(prefix):
        shutil.rmtree(prefix, ignore_errors=True)
        return
    bucket, key = split_s3(prefix)
    for name in list_files(prefix):
        full = f"{key.rstrip('/')}/{name}"
        _s3_call(prefix, "delete", s3_client().delete_object, Bucket=bucket, Key=full)


def open_read(url: str) -> BinaryIO:
    """A streaming, file-like reader: a local file, or the body of an S3 GET (read sequentially)."""
    if not is_s3(url):
        try:
            return open(url, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as err:
            raise StorageError(f"{url} does not exist.") from err
    bucket, key = split_s3(url)
    resp = _s3_call(url, "open", s3_client().get_object, Bucket=bucket, Key=key)
    return resp["Body"]


def iter_lines(url: str) -> Iterator[str]:
    """Text lines of a local or S3 file; ``.gz`` files are decompressed on the fly."""
    import gzip
    import io

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
        _s3_call(probe, "delete", s3_client().delete_object, Bucket=bucket, Key=key)
    else:
        Path(probe).unlink(missing_ok=True)
