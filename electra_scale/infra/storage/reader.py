"""A GET body that survives broken connections: resumed with a Range GET from the byte where it broke."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from electra_scale.infra.storage.client import IO, StorageError, s3_client, split_s3
from electra_scale.infra.storage.retry import Attempts, BodyEndedEarly, error_status, retryable_errors

READ_CHUNK = 64 << 10  # reads without urllib3's read1: the most a broken GET body loses


class S3Reader(io.RawIOBase):
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
        self.attempts = Attempts(url, "read")
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
            except retryable_errors() as err:
                if self.bounded and error_status(err)[1] == 416:  # the range starts past the object's end
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
                        raise BodyEndedEarly(f"the body ended before byte {self.pos}")
                    self.discard -= len(dropped)
                n = self._read_some(view)
                if n == 0:
                    if self.end is None:
                        return 0
                    raise BodyEndedEarly(f"the body ended at byte {self.pos} of {self.end}")
                self.pos += n
                IO.add(self.url, n)
                self.attempts.progressed()
                return n
            except retryable_errors() as err:
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
