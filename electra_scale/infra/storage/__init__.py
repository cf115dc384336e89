"""One small interface over local paths and ``s3://bucket/key`` URLs: the package's only door to storage.

client.py   the boto3 client, StorageError, URLs, the retry budget and the I/O counters
retry.py    which failures are retried, the retry loop, and the one-line explanation when it gives up
reader.py   a GET body that resumes where a broken connection left it
ops.py      the operations everything else calls (re-exported here)


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

from electra_scale.infra.storage.client import (
    IO,
    ConditionsUnsupported,
    IOStats,
    PreconditionFailed,
    RetryPolicy,
    StorageError,
    is_s3,
    join,
    reset_client,
    reset_io_stats,
    s3_client,
    split_s3,
)
from electra_scale.infra.storage.ops import (
    check_writable,
    delete_files,
    delete_if,
    delete_prefix,
    download_file,
    exists,
    file_in_the_way,
    iter_lines,
    list_files,
    object_size,
    open_read,
    open_seekable,
    put_if,
    read_bytes,
    read_range,
    read_text,
    read_versioned,
    upload_file,
    write_bytes,
    write_text,
)
from electra_scale.infra.storage.retry import is_transient

__all__ = [
    "IO",
    "ConditionsUnsupported",
    "IOStats",
    "PreconditionFailed",
    "RetryPolicy",
    "StorageError",
    "check_writable",
    "delete_files",
    "delete_if",
    "delete_prefix",
    "download_file",
    "exists",
    "file_in_the_way",
    "is_s3",
    "is_transient",
    "iter_lines",
    "join",
    "list_files",
    "object_size",
    "open_read",
    "open_seekable",
    "put_if",
    "read_bytes",
    "read_range",
    "read_text",
    "read_versioned",
    "reset_client",
    "reset_io_stats",
    "s3_client",
    "split_s3",
    "upload_file",
    "write_bytes",
    "write_text",
]
