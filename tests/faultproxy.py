"""A fault-injecting HTTP proxy for tests: it sits in front of a real ``cryo server``.

Every request from the client is read by the proxy, which then, with a
seeded ``random.Random`` and at a configurable rate, does one of:

* answers with a modeled retryable error instead of the server's reply:
  ThrottlingException (429), RetryableException (500),
  ServiceUnavailableException (503) or ServiceInternalException (500), in
  the form ``cryo server`` sends (status of ``cryo.errors``,
  ``x-amzn-ErrorType`` header, JSON body with a ``Message``), so botocore
  parses them as those exceptions. Half of them are injected **before**
  forwarding (the server never sees the request), half **after** (the server
  did the work; only its reply is replaced);
* **resets the request**: part of the request is forwarded, then both
  connections are closed with RST (SO_LINGER 0), so the server sees a body
  cut short and the client a reset;
* **resets the reply**: the request is forwarded, the server answers in
  full, the client gets part of that reply and then a reset;
* **delays the reply** (the server did the work; the client waits longer).

Requests and replies are passed on byte for byte, the ``Host`` header
included: the client signs the proxy's ``host:port``, and the server checks
the signature against the Host header it receives, so SigV4 works through
the proxy without any change to the server.

``set_down(True)`` makes the endpoint unreachable: every connection, new or
open, is reset before its next request reaches the server, until
``set_down(False)``. The proxy counts what it injected, by kind.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO

from cryo.errors import (
    RetryableException,
    ServiceInternalException,
    ServiceUnavailableException,
    StorageError,
    ThrottlingException,
)
from cryo.server import routes

#: The modeled errors the proxy answers with, by error code.
ERRORS: dict[str, type[StorageError]] = {
    cls.code: cls
    for cls in (
        ThrottlingException,
        RetryableException,
        ServiceUnavailableException,
        ServiceInternalException,
    )
}
RESET_REQUEST = "reset-request"
RESET_REPLY = "reset-reply"
DELAY = "delay"
#: Every kind of fault, in the order the default mix cycles through them.
KINDS: tuple[str, ...] = (*ERRORS, RESET_REQUEST, RESET_REPLY, DELAY)
#: Faults the client notices (a delay is only slower).
VISIBLE: frozenset[str] = frozenset(KINDS) - {DELAY}
BEFORE = "before"
AFTER = "after"
_LINE = 65536


class _Closed(Exception):
    """The peer closed the connection (between or in the middle of messages)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the proxy does with one request."""

    kind: str | None
    stage: str
    delay: float
    cut: float
    """Fraction of the request or reply that is forwarded before a reset."""


@dataclass(slots=True)
class Counts:
    """What went through the proxy and what it injected."""

    requests: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    """Faults by kind."""
    stages: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Faults by (kind, before|after)."""
    faulted: Counter[str] = field(default_factory=Counter)
    """Faults by operation."""
    down_resets: int = 0
    """Connections reset while the endpoint was down."""

    def copy(self) -> Counts:
        return Counts(
            self.requests,
            Counter(self.operations),
            Counter(self.injected),
            Counter(self.stages),
            Counter(self.faulted),
            self.down_resets,
        )

    @property
    def visible(self) -> int:
        """Faults the client saw as a failed request."""
        return sum(n for kind, n in self.injected.items() if kind in VISIBLE)

    def since(self, earlier: Counts) -> Counts:
        return Counts(
            self.requests - earlier.requests,
            self.operations - earlier.operations,
            self.injected - earlier.injected,
            self.stages - earlier.stages,
            self.faulted - earlier.faulted,
            self.down_resets - earlier.down_resets,
        )


def _reset(sock: socket.socket | None) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _read_head(f: BinaryIO) -> tuple[bytes, dict[str, str]]:
    """A message head (start line and headers) as raw bytes, and its headers by lower name."""
    first = f.readline(_LINE)
    if not first:
        raise _Closed
    raw = bytearray(first)
    headers: dict[str, str] = {}
    while True:
        line = f.readline(_LINE)
        if not line:
            raise _Closed
        raw += line
        if line in (b"\r\n", b"\n"):
            return bytes(raw), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Closed
    return data


def _read_chunked(f: BinaryIO) -> bytes:
    """A chunked body, kept in its chunked form so it is forwarded unchanged."""
    raw = bytearray()
    while True:
        line = f.readline(_LINE)
        if not line:
            raise _Closed
        raw += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = f.readline(_LINE)
                if not trailer:
                    raise _Closed
                raw += trailer
                if trailer in (b"\r\n", b"\n"):
                    return bytes(raw)
        raw += _read_exact(f, size + 2)


def _body_length(headers: dict[str, str]) -> int:
    return int(headers.get("content-length", "0") or "0")


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 (port 0) that injects faults into a share of requests.

    ``rate`` is the share of requests that get a fault; ``kinds`` the faults
    to choose from (drawn from a seeded shuffled bag, so every ``len(kinds)``
    faults in a row hold each kind once). ``delay`` bounds the extra wait of
    a delayed reply, in seconds. ``operations`` limits faults to those
    operations (names of ``cryo.server.routes``), ``stage`` forces modeled
    errors before or after the server's work, and ``per_operation`` caps the
    faults of each operation (1: each is failed once, then goes through).
    Every request draws the same number of random values, so the faults of
    the n-th request depend on the seed only, not on thread timing.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        delay: tuple[float, float] = (0.05, 0.4),
        operations: frozenset[str] | None = None,
        stage: str | None = None,
        per_operation: int | None = None,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        host, port = upstream_url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self.kinds = kinds
        self.delay = delay
        self.operations = operations
        self.stage = stage
        self.per_operation = per_operation
        self._rng = random.Random(seed)
        self._bag: list[str] = []
        self._lock = threading.Lock()
        self._counts = Counts()
        self._down = threading.Event()
        self._closing = threading.Event()
        self._open: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._acceptor.start()

    # -- control ---------------------------------------------------------------
    @property
    def counts(self) -> Counts:
        with self._lock:
            return self._counts.copy()

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def set_down(self, down: bool) -> None:
        """Make the endpoint unreachable (every connection reset) or reachable again."""
        if down:
            self._down.set()
        else:
            self._down.clear()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(10)
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decisions ---------------------------------------------------------------
    def _decide(self, operation: str) -> Decision:
        """Draw this request's fault; the same number of draws for every request."""
        with self._lock:
            self._counts.requests += 1
            self._counts.operations[operation] += 1
            roll, stage, delay, cut = (self._rng.random() for _ in range(4))
            if (
                roll >= self.rate
                or not self.kinds
                or (self.operations is not None and operation not in self.operations)
                or (
                    self.per_operation is not None
                    and self._counts.faulted[operation] >= self.per_operation
                )
            ):
                return Decision(None, BEFORE, 0.0, 0.0)
            if not self._bag:
                self._bag = list(self.kinds)
                self._rng.shuffle(self._bag)
            kind = self._bag.pop()
            where = self.stage or (BEFORE if stage < 0.5 else AFTER)
            if kind == RESET_REQUEST:
                where = BEFORE
            elif kind in (RESET_REPLY, DELAY):
                where = AFTER
            self._counts.injected[kind] += 1
            self._counts.stages[(kind, where)] += 1
            self._counts.faulted[operation] += 1
            low, high = self.delay
            return Decision(kind, where, low + delay * (high - low), 0.1 + 0.8 * cut)

    def _count_down(self) -> None:
        with self._lock:
            self._counts.down_resets += 1

    # -- connections -------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self._count_down()
                _reset(client)
                continue
            threading.Thread(
                target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
            ).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _untrack(self, sock: socket.socket | None) -> None:
        if sock is not None:
            with self._lock:
                self._open.discard(sock)

    def _connect_upstream(self) -> tuple[socket.socket, BinaryIO]:
        sock = socket.create_connection(self.upstream, timeout=300)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(sock)
        return sock, sock.makefile("rb")

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        client.settimeout(300)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cfile = client.makefile("rb")
        up: socket.socket | None = None
        ufile: BinaryIO | None = None
        try:
            while True:
                try:
                    head, headers = _read_head(cfile)
                except (_Closed, OSError, ValueError):
                    return
                if self._down.is_set():
                    self._count_down()
                    return self._abort(client, up)
                method, target = head.split(b" ", 2)[:2]
                raw_path = target.decode("latin-1").partition("?")[0]
                found = routes.match(method.decode("latin-1"), raw_path)
                decision = self._decide(found[0].operation if found else "unknown")
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                length = 0 if chunked else _body_length(headers)
                if decision.kind == RESET_REQUEST:
                    # Part of the request reaches the server, then both sides are reset.
                    part = int(length * decision.cut) if length else 0
                    sent = head + _read_exact(cfile, part) if part else head[: len(head) // 2]
                    with contextlib.suppress(OSError):
                        if up is None:
                            up, ufile = self._connect_upstream()
                        up.sendall(sent)
                    return self._abort(client, up)
                body = _read_chunked(cfile) if chunked else _read_exact(cfile, length)
                if decision.kind in ERRORS and decision.stage == BEFORE:
                    self._send_error(client, decision.kind)
                    continue
                try:
                    if up is None or ufile is None:
                        up, ufile = self._connect_upstream()
                    reply_head, reply_headers, reply_body = self._exchange(
                        up, ufile, head + body, method == b"HEAD"
                    )
                except (_Closed, OSError, ValueError):
                    return self._abort(client, up)  # the server went away: so does the proxy
                if reply_headers.get("connection", "").lower() == "close":
                    self._untrack(up)
                    with contextlib.suppress(OSError):
                        up.close()
                    up, ufile = None, None
                if self._down.is_set():
                    self._count_down()
                    return self._abort(client, up)
                if decision.kind in ERRORS:
                    self._send_error(client, decision.kind)
                    continue
                reply = reply_head + reply_body
                if decision.kind == RESET_REPLY:
                    cut = len(reply_head) + int(len(reply_body) * decision.cut)
                    if not reply_body:
                        cut = len(reply_head) // 2
                    with contextlib.suppress(OSError):
                        client.sendall(reply[:cut])
                    # Give the client time to read what came (a reset discards unread data).
                    time.sleep(0.05)
                    return self._abort(client, up)
                if decision.kind == DELAY:
                    time.sleep(decision.delay)
                client.sendall(reply)
                if up is None:  # the server closed its side: end the client's connection too
                    return
        except OSError:
            return
        finally:
            self._untrack(client)
            self._untrack(up)
            with contextlib.suppress(OSError):
                client.close()
            if up is not None:
                with contextlib.suppress(OSError):
                    up.close()

    def _exchange(
        self, up: socket.socket, ufile: BinaryIO, request: bytes, head_only: bool
    ) -> tuple[bytes, dict[str, str], bytes]:
        up.sendall(request)
        while True:
            reply_head, headers = _read_head(ufile)
            status = int(reply_head.split(b" ", 2)[1])
            if status >= 200:
                break  # 1xx (100 Continue) replies are passed over
        if head_only or status in (204, 304):
            return reply_head, headers, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return reply_head, headers, _read_chunked(ufile)
        return reply_head, headers, _read_exact(ufile, _body_length(headers))

    def _abort(self, client: socket.socket, up: socket.socket | None) -> None:
        self._untrack(client)
        self._untrack(up)
        _reset(up)
        _reset(client)

    @staticmethod
    def _send_error(client: socket.socket, code: str) -> None:
        """A modeled error in the form ``cryo server`` itself sends (docs/API.md, Errors)."""
        exc = ERRORS[code]
        body = json.dumps({"Message": f"injected {code}"}).encode("utf-8")
        head = (
            f"HTTP/1.1 {exc.http_status} Injected\r\n"
            "Content-Type: application/json\r\n"
            f"x-amzn-ErrorType: {exc.code}\r\n"
            "x-amzn-RequestId: 0000000000faults\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        client.sendall(head.encode("latin-1") + body)
