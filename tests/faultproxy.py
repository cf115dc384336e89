"""A small fault-injecting TCP proxy for HTTP traffic, to put between boto3 and a real S3 server.

    proxy = FaultProxy(server.endpoint).start()      # proxy.endpoint is what the client uses
    proxy.reset_after(3000, match="GET /bucket/train-")   # the next matching response: RST after 3000 bytes
    proxy.slowdown(times=2)                           # the next 2 requests get "503 SlowDown" (S3's XML error)
    proxy.reset_on_connect(times=1)                   # the next connection is reset before it says anything
    proxy.delay(2.0) / proxy.blackhole()              # answer late / accept and never answer
    proxy.stall_after(3000, match=...)                # forward 3000 bytes, then hold until proxy.release()
    proxy.at_rates({"reset": 0.02, "slowdown": 0.02, "truncate": 0.02}, seed=0)  # every request, by chance
    proxy.on_request = callback                       # called with each request before it goes on (the soak
                                                      # kills a run at a chosen upload request with it)
    proxy.requests, proxy.applied                     # what it saw, and which faults it applied to what

Faults queue up (first queued, first applied) and can be changed while traffic flows; a request that no queued
fault matches may still get one by chance (``at_rates``). Every connection carries
exactly one request: the proxy rewrites its ``Connection`` header to ``close``, so "the next K requests" means
exactly K requests, whatever the client's connection pooling does. A thread per connection; stdlib only.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Fault:
    kind: str  # reset_on_connect | reset_after | slowdown | delay | blackhole | stall_after | reset | truncate
    times: int
    match: str = ""  # substring of "METHOD /path?query" that the fault applies to ("" = every request)
    nbytes: int = 0
    seconds: float = 0.0
    cut: float = 0.0  # reset / truncate (drawn by at_rates): where the response is cut, as a share of it


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None


SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request '
    "rate.</Message><Resource>{path}</Resource><RequestId>faultproxy-{n}</RequestId></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str):
        self.set_upstream(upstream)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.applied: list[tuple[str, str]] = []  # (fault kind, request line or "connect")
        self.rates: dict[str, float] = {}
        self.rates_match = ""
        self._rng = random.Random(0)
        # Called with each request (from the proxy's thread) before the request goes on.
        self.on_request: Callable[[Request], None] | None = None
        self.stalled, self._release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[_Conn] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    # ------------------------------------------------------------------------------------------ control
    def set_upstream(self, upstream: str) -> None:
        url = urlparse(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)

    def _add(self, fault: Fault) -> FaultProxy:
        with self._lock:
            self.faults.append(fault)
        return self

    def reset_on_connect(self, times: int = 1) -> FaultProxy:
        return self._add(Fault("reset_on_connect", times))

    def reset_after(self, nbytes: int, times: int = 1, match: str = "") -> FaultProxy:
        return self._add(Fault("reset_after", times, match, nbytes=nbytes))

    def slowdown(self, times: int = 1, match: str = "") -> FaultProxy:
        return self._add(Fault("slowdown", times, match))

    def delay(self, seconds: float, times: int = 1, match: str = "") -> FaultProxy:
        return self._add(Fault("delay", times, match, seconds=seconds))

    def blackhole(self, times: int = 1, match: str = "") -> FaultProxy:
        return self._add(Fault("blackhole", times, match))

    def stall_after(self, nbytes: int, match: str = "") -> FaultProxy:
        self.stalled.clear()
        self._release.clear()
        return self._add(Fault("stall_after", 1, match, nbytes=nbytes))

    def at_rates(self, rates: dict[str, float], seed: int, match: str = "") -> FaultProxy:
        """From now on each request that matches ``match`` and no queued fault gets, by chance, one fault:

        - ``reset``: an RST at a uniformly drawn byte of the response (byte 0: the answer is lost);
        - ``slowdown``: S3's 503 SlowDown instead of the answer;
        - ``truncate``: a clean close (FIN) at a uniformly drawn byte of the body, short of its
          Content-Length (only responses that have a body).

        ``rates`` maps each kind to its probability per request. A fault is logged in ``applied`` when it takes
        effect: a cut drawn past the end of its response (a truncation of a HEAD, say) is not a fault."""
        unknown = set(rates) - {"reset", "slowdown", "truncate"}
        if unknown or sum(rates.values()) > 1:
            raise ValueError(f"rates {rates}: kinds are reset, slowdown, truncate; their sum at most 1")
        with self._lock:
            self.rates, self.rates_match, self._rng = dict(rates), match, random.Random(seed)
        return self

    def release(self) -> None:
        self._release.set()

    def clear(self) -> None:
        """Drop the queued faults and the logs; let a stalled response go."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.applied.clear()
        self._release.set()

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k, _ in self.applied if k == kind)

    def pending(self) -> int:
        with self._lock:
            return sum(f.times for f in self.faults)

    def _take(self, kinds: tuple[str, ...], line: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.kind in kinds and fault.times > 0 and fault.match in line:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    if fault.kind != "reset_after":  # logged when it cuts: a response may end before its nbytes
                        self.applied.append((fault.kind, line))
                    return fault
        return None

    def _chance(self, line: str) -> Fault | None:
        with self._lock:
            if not self.rates or self.rates_match not in line:
                return None
            draw, cut = self._rng.random(), self._rng.random()
            for kind, rate in self.rates.items():
                if draw < rate:
                    if kind == "slowdown":
                        self.applied.append((kind, line))
                    return Fault(kind, 1, cut=cut)
                draw -= rate
        return None

    def _log_applied(self, kind: str, line: str) -> None:
        with self._lock:
            self.applied.append((kind, line))

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        self.sock.listen(128)
        thread = threading.Thread(target=self._accept, daemon=True, name="faultproxy")
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # shutdown() wakes a thread blocked in recv(); close() alone may not
            for sock in (conn.client, conn.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)  # a blocked accept() would not notice stop()
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.settimeout(None)
            thread = threading.Thread(target=self._handle, args=(client,), daemon=True)
            thread.start()
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    # ------------------------------------------------------------------------------------------ one connection
    def _handle(self, client: socket.socket) -> None:
        conn = _Conn(client)
        with self._lock:
            self._conns.append(conn)
        try:
            if self._take(("reset_on_connect",), "connect"):
                _reset(client)
                return
            head, rest = _read_head(client)
            if head is None:
                return
            request = _parse(head)
            with self._lock:
                self.requests.append(request)
            if self.on_request is not None:
                self.on_request(request)
            fault = self._take(("reset_after", "slowdown", "delay", "blackhole", "stall_after"), request.line)
            fault = fault or self._chance(request.line)
            if fault is not None and fault.kind == "slowdown":
                self._answer_slowdown(client, request)
                return
            if fault is not None and fault.kind == "blackhole":
                self._wait_for_close(client)
                return
            try:
                conn.upstream = self._connect(small_buffer=fault is not None and fault.kind == "stall_after")
            except OSError:
                _reset(client)  # like a dead server: the client sees its connection reset
                return
            conn.upstream.sendall(_rewrite(head) + rest)
            self._pipe(client, conn.upstream, fault, request)
        except OSError:
            pass
        finally:
            _close(client)
            if conn.upstream is not None:
                _close(conn.upstream)
            with self._lock:
                self._conns.remove(conn)

    def _connect(self, small_buffer: bool) -> socket.socket:
        sock = socket.socket()
        if small_buffer:
            # While a response is held, the kernel would otherwise take in megabytes of it: a server killed
            # then could already have handed over a whole object, and nothing would break.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.settimeout(5)
        try:
            sock.connect(self.upstream)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def _pipe(self, client: socket.socket, upstream: socket.socket, fault: Fault | None, request: Request) -> None:
        sent = 0  # response bytes forwarded
        if fault is not None and fault.kind == "delay":
            self._stop.wait(fault.seconds)
        limit = fault.nbytes if fault is not None and fault.kind in ("reset_after", "stall_after") else None
        # A drawn cut (reset / truncate) is placed once the response's head says how long the response is;
        # until then its bytes are held back.
        cut, held = (fault, b"") if fault is not None and fault.kind in ("reset", "truncate") else (None, b"")
        while not self._stop.is_set():
            ready, _, _ = select.select([client, upstream], [], [], 0.2)
            if client in ready:
                data = client.recv(65536)
                if not data:
                    return
                upstream.sendall(data)
            if upstream in ready:
                data = upstream.recv(65536)
                if not data:
                    client.sendall(held)  # a response that ended before its head did: nothing was cut
                    client.shutdown(socket.SHUT_WR)  # the response is complete (or the server died): FIN
                    self._wait_for_close(client, timeout=2)
                    return
                if cut is not None:
                    held += data
                    while cut is not None and (end := held.find(b"\r\n\r\n")) >= 0:
                        head, held = held[: end + 4], held[end + 4 :]
                        status = int(head.split(b" ", 2)[1])
                        if 100 <= status < 200:  # "100 Continue": the client waits for it to send its body
                            client.sendall(head)
                            sent += len(head)
                            continue
                        offset = _cut_offset(cut, head, request.method, status)
                        if offset is None:
                            fault = None  # this response cannot be cut so: it goes through whole
                        else:
                            limit = sent + offset
                        data, held, cut = head + held, b"", None
                    if cut is not None:
                        continue  # the head is not complete yet
                if limit is not None and sent + len(data) >= limit:
                    client.sendall(data[: limit - sent])
                    sent, data = limit, data[limit - sent :]
                    if fault.kind in ("reset", "truncate", "reset_after"):
                        self._log_applied(fault.kind, request.line)
                    if fault.kind in ("reset_after", "reset"):
                        _reset(client)
                        return
                    if fault.kind == "truncate":  # a clean close, short of the Content-Length
                        client.shutdown(socket.SHUT_WR)
                        self._wait_for_close(client, timeout=2)
                        return
                    self.stalled.set()  # stall_after: hold the rest until the test releases it
                    while not self._release.wait(0.1):
                        if self._stop.is_set():
                            return
                    limit = None
                client.sendall(data)
                sent += len(data)

    def _answer_slowdown(self, client: socket.socket, request: Request) -> None:
        body = SLOWDOWN_BODY.format(path=request.path.split("?")[0], n=len(self.requests)).encode()
        head = (
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        client.sendall(head if request.method == "HEAD" else head + body)
        client.shutdown(socket.SHUT_WR)
        # Read what the client still sends (a request body) until it closes: closing a socket with unread
        # data would turn our answer into a reset.
        self._wait_for_close(client, timeout=5)

    def _wait_for_close(self, client: socket.socket, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            ready, _, _ = select.select([client], [], [], 0.2)
            if ready and not client.recv(65536):
                return


def _cut_offset(fault: Fault, head: bytes, method: str, status: int) -> int | None:
    """Where a drawn reset / truncation cuts a response with this head, in bytes from the head's start; None when
    it cannot (a truncation of a response without a body)."""
    length = None
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = 0 if method == "HEAD" or status in (204, 304) or length is None else length
    if fault.kind == "reset":  # anywhere before the response's last byte
        return int(fault.cut * (len(head) + body))
    return len(head) + int(fault.cut * body) if body > 0 else None


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Request(method, path, headers)


def _rewrite(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if line and not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: what the client sees when a connection is reset by the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
