"""Whether a failure is worth another try, the loop that tries, and the one line a user reads when it gives up.
Only transient failures are retried (the network, an overloaded server); the rest fail at once, explained."""

from __future__ import annotations

import functools
import http.client
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from electra_scale.infra.storage.client import RetryPolicy, StorageError, split_s3

log = logging.getLogger("electra_scale")
T = TypeVar("T")

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
def retryable_errors() -> tuple[type[BaseException], ...]:
    """What an S3 call can raise that the retry loop looks at (anything else is a bug and propagates)."""
    import urllib3
    from botocore import exceptions as bex

    return (bex.BotoCoreError, bex.ClientError, OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)


class BodyEndedEarly(ConnectionError):
    """The server closed a response before the promised byte count (a killed server can do that cleanly)."""


def error_status(err: BaseException) -> tuple[str, int | None]:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_transient(err: BaseException) -> bool:
    """Worth another try: the network or an overloaded server, not the request or its credentials."""
    import urllib3
    from botocore import exceptions as bex

    if isinstance(err, bex.ClientError):
        code, status = error_status(err)
        return status in (500, 502, 503, 504) or code in _RETRY_CODES
    return isinstance(
        err,
        bex.ConnectionError  # refused, connect timeout, proxy/SSL trouble
        | bex.HTTPClientError  # closed, reset, read timeout, body broke mid-stream
        | bex.IncompleteReadError
        | ConnectionError  # the builtin: reset/refused/aborted, and BodyEndedEarly
        | TimeoutError
        | http.client.HTTPException
        | urllib3.exceptions.HTTPError,
    )


class Attempts:
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
            raise explain(err, self.url, self.action) from err
        self.failures += 1
        self.total += 1
        if self.failures >= self.policy.max_attempts:
            explained = explain(err, self.url, self.action).message
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
            cause(err),
            self.failures + 1,
            self.policy.max_attempts,
            delay,
            note,
        )
        time.sleep(delay)

    def progressed(self) -> None:
        if self.failures:
            self.failures, self.started = 0, time.monotonic()


def retry_call(url: str, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` under the retry budget; errors become one-line ``StorageError``s."""
    attempts = Attempts(url, action)
    while True:
        try:
            return fn(*args, **kwargs)
        except retryable_errors() as err:
            attempts.failed(err)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def label(err: BaseException) -> str:
    """ "SlowDown (HTTP 503)", or "HTTP 503" when the code is only the status (HEAD answers have no body)."""
    code, status = error_status(err)
    return f"{code} (HTTP {status})" if code and code != str(status) else f"HTTP {status}"


def cause(err: BaseException) -> str:
    code, status = error_status(err)
    if code or status:
        message = (getattr(err, "response", None) or {}).get("Error", {}).get("Message", "")
        return one_line(f"{label(err)}{': ' + message if message else ''}")
    return one_line(f"{type(err).__name__}: {err}")


def explain(err: BaseException, url: str, action: str) -> StorageError:
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
            f"cannot reach the S3 endpoint {endpoint} to {action} {url}: {one_line(str(err))}. "
            "Check AWS_ENDPOINT_URL and that the server is running."
        )
    if isinstance(err, bex.NoCredentialsError | bex.PartialCredentialsError):
        return StorageError(
            f"no S3 credentials to {action} {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        )
    if isinstance(err, bex.ClientError):
        code, status = error_status(err)
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
        message = one_line((err.response or {}).get("Error", {}).get("Message", ""))
        return StorageError(f"S3 answered {label(err)} to {action} {url}: {message or one_line(str(err))}")
    if is_transient(err):
        return StorageError(f"the connection to the S3 endpoint {endpoint} failed to {action} {url}: {cause(err)}")
    return StorageError(f"failed to {action} {url}: {cause(err)}")
