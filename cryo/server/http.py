"""The HTTP/1.1 side of ``cryo server``: connections, framing, authentication, replies.

* A fixed pool of worker threads serves connections, one connection per
  worker at a time, with keep-alive. When every worker holds a connection
  and another arrives, the connection idle the longest is closed to make
  room; otherwise the newcomer waits for a worker.
* Request bodies are read from the socket in pieces of at most 1 MiB as the
  storage engine asks for them, never whole: memory stays flat however many
  chunks are in flight. GetChunk replies go out with ``sendfile`` (a cold chunk
  file: read around the page cache, see ``cryo.directio.send_file``).
* After an error, the rest of a body (up to the largest valid one) is read
  and dropped so the client, still sending, gets the reply; a larger one
  ends the connection.
* ``shutdown`` stops accepting, closes idle connections, lets requests in
  progress finish (their connections close after the reply), then returns.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import hmac
import json
import queue
import secrets
import select
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import IO, Any, cast

from cryo import __version__
from cryo.directio import send_file
from cryo.errors import (
    AccessDeniedException,
    DataAlreadyExistsException,
    IllegalArgumentException,
    ServiceInternalException,
    StorageError,
    ThrottlingException,
)
from cryo.server import routes
from cryo.server.log import AccessRecord, ServerLog
from cryo.server.sigv4 import UNSIGNED_PAYLOAD, Verifier
from cryo.storage.api import MAX_CHUNK_BYTES, MAX_METADATA_BLOB_BYTES
from cryo.storage.local import LocalBackend

#: Largest body of an operation whose body is signed (JSON documents).
MAX_SIGNED_BODY = 1024 * 1024
#: Largest body of a streaming operation (a chunk, or a metadata blob).
MAX_STREAM_BODY = max(MAX_CHUNK_BYTES, MAX_METADATA_BLOB_BYTES)
#: After an error, bodies up to this size are read to the end so the client sees the reply.
DRAIN_LIMIT = MAX_STREAM_BODY + MAX_SIGNED_BODY
_PIECE = 1024 * 1024
_LINE = 65536


class ConnectionLost(ConnectionError):
    """The client went away in the middle of a request."""


class SocketReader:
    """Buffered reads from a socket; unlike ``BufferedReader`` it says what it holds."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def buffered(self) -> int:
        return len(self._buf)

    def readline(self, limit: int = -1) -> bytes:
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                end = i + 1
                break
            if 0 <= limit <= len(self._buf):
                end = limit
                break
            start = len(self._buf)
            data = self._sock.recv(_LINE)
            if not data:
                end = len(self._buf)
                break
            self._buf += data
        if 0 <= limit < end:
            end = limit
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (fewer bytes only at the end of the stream); returns the count.

        The bytes go straight from the socket into the caller's buffer, so a
        server that reuses one buffer per thread allocates nothing per request.
        """
        have = min(len(self._buf), len(view))
        if have:
            view[:have] = self._buf[:have]
            del self._buf[:have]
        while have < len(view):
            got = self._sock.recv_into(view[have:])
            if not got:
                break
            have += got
        return have

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        if n <= len(self._buf):
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        result = bytearray(n)
        with memoryview(result) as view:
            have = self.readinto(view)
        if have < n:
            del result[have:]
        # Large pieces go out as the bytearray they were received into (no copy);
        # every consumer (hashing, os.write, joining) takes any bytes-like object.
        return bytes(result) if have < 4096 else cast(bytes, result)


class Body:
    """One request body (Content-Length or chunked framing), read as the handler asks.

    With ``expect_sha256`` set (the client sent a hex ``X-Amz-Content-SHA256``
    with a streamed payload), the bytes are hashed as they pass and the last
    read raises AccessDeniedException if they are not what was signed.
    """

    def __init__(self, reader: SocketReader, length: int | None, chunked: bool) -> None:
        self._reader = reader
        self.length = length
        self._left = length or 0
        self._chunked = chunked
        self._chunk_left = 0
        self._done = not chunked and not length
        self.consumed = 0
        self._hash: Any = None
        self._expect: str | None = None

    @property
    def empty(self) -> bool:
        return self._done and self.consumed == 0

    @property
    def done(self) -> bool:
        return self._done

    def expect_sha256(self, hex_digest: str) -> None:
        self._hash = hashlib.sha256()
        self._expect = hex_digest
        if self._done:
            self._check()

    def _check(self) -> None:
        if self._hash is not None and self._expect is not None:
            got = self._hash.hexdigest()
            self._hash = None
            if not hmac.compare_digest(got, self._expect):
                raise AccessDeniedException(
                    "the body does not match the X-Amz-Content-SHA256 it was signed with"
                )

    def read(self, n: int = -1, /) -> bytes:
        if self._done or n == 0:
            return b""
        if n < 0:
            return b"".join(iter(lambda: self.read(_PIECE), b""))
        if self._chunked:
            data = self._read_chunked(n)
        else:
            data = self._reader.read(min(n, self._left))
            self._took_plain(len(data))
        self._took(data)
        return data

    def readinto(self, view: memoryview, /) -> int:
        """``read`` into the caller's buffer; 0 only at the end of the body."""
        if self._done or not len(view):
            return 0
        if self._chunked:
            data = self._read_chunked(len(view))
            got = len(data)
            view[:got] = data
        else:
            got = self._reader.readinto(view[: min(len(view), self._left)])
            self._took_plain(got)
        self._took(view[:got])
        return got

    def _took_plain(self, got: int) -> None:
        """``got`` more bytes of a Content-Length body came (none: the client is gone)."""
        if not got:
            raise ConnectionLost("the client closed the connection in the middle of the body")
        self._left -= got
        if not self._left:
            self._done = True

    def _took(self, data: bytes | memoryview) -> None:
        """Count and hash ``data``, just read; check the hash once the body is done."""
        self.consumed += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self._done:
            self._check()

    def _read_chunked(self, n: int) -> bytes:
        if not self._chunk_left:
            line = self._reader.readline(_LINE)
            if not line.endswith(b"\n"):
                raise ConnectionLost("the chunked body ended early")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise IllegalArgumentException("malformed chunked request body") from None
            if size < 0:
                raise IllegalArgumentException("malformed chunked request body")
            if size == 0:
                while self._reader.readline(_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are not used
                self._done = True
                return b""
            self._chunk_left = size
        data = self._reader.read(min(n, self._chunk_left))
        if not data:
            raise ConnectionLost("the client closed the connection in the middle of the body")
        self._chunk_left -= len(data)
        if not self._chunk_left and self._reader.readline(_LINE) not in (b"\r\n", b"\n"):
            raise IllegalArgumentException("malformed chunked request body")
        return data

    def drain(self, limit: int) -> bool:
        """Read and drop the rest of the body; False if more than ``limit`` bytes remain."""
        self._hash = None
        if not self._chunked and self._left > limit:
            return False
        while not self._done:
            if self.consumed > limit:
                return False
            self.read(_PIECE)
        return True


class SpooledBody:
    """A body already read to the end (into memory or a temporary file)."""

    def __init__(self, spool: IO[bytes], length: int) -> None:
        self._spool = spool
        self.length = length

    def read(self, n: int = -1, /) -> bytes:
        return self._spool.read(n)

    def close(self) -> None:
        self._spool.close()


class _Conn:
    __slots__ = ("busy", "closing", "idle_since", "served", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = False
        self.closing = False
        self.served = 0
        self.idle_since = time.monotonic()


class Connections:
    """Which connections the workers hold, and which of them are idle."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.draining = False
        self._lock = threading.Lock()
        self._open: set[_Conn] = set()
        self._queued = 0

    def accepted(self) -> None:
        with self._lock:
            self._queued += 1
            if self._queued + len(self._open) > self.capacity:
                idle = [c for c in self._open if not c.busy and not c.closing and c.served]
                if idle:
                    self._close_locked(min(idle, key=lambda c: c.idle_since))

    def taken(self) -> None:
        """A worker took a queued connection."""
        with self._lock:
            self._queued -= 1

    def start(self, sock: socket.socket) -> _Conn:
        conn = _Conn(sock)
        with self._lock:
            self._open.add(conn)
        return conn

    def end(self, conn: _Conn) -> None:
        with self._lock:
            self._open.discard(conn)

    def to_busy(self, conn: _Conn) -> bool:
        with self._lock:
            if conn.closing:
                return False
            conn.busy = True
            return True

    def to_idle(self, conn: _Conn) -> None:
        with self._lock:
            conn.busy = False
            conn.served += 1
            conn.idle_since = time.monotonic()

    @staticmethod
    def _close_locked(conn: _Conn) -> None:
        conn.closing = True
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RD)  # wakes the worker polling it

    def drain(self) -> None:
        """Stop keep-alive: close idle connections; busy ones close after their reply."""
        with self._lock:
            self.draining = True
            for conn in self._open:
                if conn.busy or conn.closing:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    if select.select([conn.sock], [], [], 0)[0]:
                        continue  # a request has arrived: let the worker serve it
                self._close_locked(conn)

    def force_close(self) -> None:
        with self._lock:
            for conn in self._open:
                conn.closing = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)


class KeyLimiter:
    """At most ``limit`` requests in progress per access key (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}

    @contextlib.contextmanager
    def admit(self, key: str) -> Iterator[None]:
        if self.limit <= 0:
            yield
            return
        with self._lock:
            n = self._active.get(key, 0)
            if n >= self.limit:
                raise ThrottlingException(
                    f"access key {key} has {n} requests in progress, the most this server "
                    f"allows per key; retry later"
                )
            self._active[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._active[key] - 1
                if left:
                    self._active[key] = left
                else:
                    del self._active[key]


class CryoHTTPServer(socketserver.TCPServer):
    """The listening socket, the worker pool and what every request needs."""

    allow_reuse_address = True
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        backend: LocalBackend,
        verifier: Verifier,
        log: ServerLog,
        *,
        max_connections: int = 64,
        max_requests_per_key: int = 0,
        idle_timeout: float = 60.0,
        io_timeout: float = 120.0,
    ) -> None:
        self.address_family = family
        super().__init__(address, Handler)
        self.backend = backend
        self.verifier = verifier
        self.log = log
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.connections = Connections(max_connections)
        self.limiter = KeyLimiter(max_requests_per_key)
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"cryo-worker-{i}", daemon=True)
            for i in range(max_connections)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.accepted()
        self._queue.put((request, client_address))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            request, address = item
            self.connections.taken()
            try:
                self.finish_request(request, address)
            except (ConnectionError, TimeoutError):
                pass
            except Exception as exc:  # noqa: BLE001 - one connection's failure must not end a worker
                self.log.error("unexpected failure on a connection", exc)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.log.error(f"unexpected failure on a connection from {client_address}")

    def stop(self, grace: float) -> bool:
        """Stop serving: no new connections, idle ones closed, requests in progress finished.

        Call after ``shutdown()``. Returns False if requests were still running
        after ``grace`` seconds (their connections are then cut).
        """
        self.server_close()
        self.connections.drain()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + grace
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        finished = not any(w.is_alive() for w in self._workers)
        if not finished:
            self.connections.force_close()
            for worker in self._workers:
                worker.join(5.0)
        return finished


def _header_text(value: str) -> str:
    """A header value as it goes on the wire: UTF-8 bytes, never a line break."""
    value = value.replace("\r", " ").replace("\n", " ")
    return value.encode("utf-8").decode("latin-1")


class Handler(BaseHTTPRequestHandler):
    """One connection: requests in turn, keep-alive, until the client or the server ends it."""

    server: CryoHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"cryo/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        self.connection = self.request
        self.connection.settimeout(self.server.io_timeout)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.reader = SocketReader(self.connection)
        self.rfile = cast(Any, self.reader)
        self.wfile = cast(Any, _SocketWriter(self.connection))
        self._record: AccessRecord | None = None

    def finish(self) -> None:
        pass  # the server closes the socket

    def handle(self) -> None:
        connections = self.server.connections
        self._conn = connections.start(self.connection)
        try:
            while self._await_request():
                self.close_connection = True
                self.handle_one_request()
                connections.to_idle(self._conn)
                if self.close_connection:
                    return
        finally:
            connections.end(self._conn)

    def _await_request(self) -> bool:
        connections = self.server.connections
        if not self.reader.buffered():
            timeout = 0.5 if connections.draining else self.server.idle_timeout
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            if not poller.poll(int(timeout * 1000)):
                return False
        return connections.to_busy(self._conn)

    def handle_one_request(self) -> None:
        self.raw_requestline = self.reader.readline(_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        self._started = time.monotonic()
        self._request_id = secrets.token_hex(8)
        self._record = AccessRecord(remote=str(self.client_address[0]))
        self._reply_status: int | None = None
        try:
            if len(self.raw_requestline) > _LINE:
                self.requestline = ""
                self.request_version = ""
                self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "the request line is too long")
                return
            if not self.parse_request():
                return
            self._record.method = self.command
            self._respond()
        finally:
            self._record.ms = (time.monotonic() - self._started) * 1000
            self._record.request_id = self._request_id
            self._record.status = self._reply_status
            self.server.log.access(self._record)

    # -- replies -------------------------------------------------------------
    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        file: IO[bytes] | None = None,
        file_length: int = 0,
    ) -> None:
        if self.server.connections.draining:
            self.close_connection = True
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            f"Server: {self.server_version}",
            f"x-amzn-RequestId: {self._request_id}",
        ]
        lines += [f"{name}: {_header_text(value)}" for name, value in headers]
        length = file_length if file is not None else len(body)
        if status != 204:
            lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._reply_status = status
        if self._record is not None:
            self._record.bytes_out = length
        if self.command == "HEAD":  # the reply's headers only, never its content (RFC 9110)
            if self._record is not None:
                self._record.bytes_out = 0
            self.connection.sendall(head)
            return
        if file is None:
            self.connection.sendall(head + body)
            return
        self.connection.sendall(head)
        sent = send_file(self.connection, file, file_length)
        if sent != file_length:
            self.close_connection = True
            raise ConnectionLost(f"sent {sent} of {file_length} bytes of a chunk")

    def _send_exception(self, exc: StorageError) -> None:
        doc: dict[str, Any] = {"Message": exc.message or exc.code}
        if isinstance(exc, DataAlreadyExistsException):
            if exc.checksum is not None:
                doc["Checksum"] = exc.checksum
            if exc.checksum_algorithm is not None:
                doc["ChecksumAlgorithm"] = exc.checksum_algorithm
        body = json.dumps(doc).encode("utf-8")
        if self._record is not None:
            self._record.error = exc.code
        self._send(
            exc.http_status,
            [("Content-Type", "application/json"), ("x-amzn-ErrorType", exc.code)],
            body,
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Framing errors found by ``parse_request``: a modeled error, then close."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        if not hasattr(self, "_request_id"):
            self._request_id = secrets.token_hex(8)
        exc: StorageError = (
            IllegalArgumentException(f"bad HTTP request: {text}")
            if code < 500
            else ServiceInternalException(text)
        )
        with contextlib.suppress(OSError):
            self._send_exception(exc)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the access log is written by handle_one_request

    # -- one request ---------------------------------------------------------
    def _open_body(self) -> Body:
        te = self.headers.get("Transfer-Encoding")
        cl = self.headers.get_all("Content-Length") or []
        if te is not None:
            if te.strip().lower() != "chunked" or cl:
                self.close_connection = True
                raise IllegalArgumentException("unsupported Transfer-Encoding")
            return Body(self.reader, None, chunked=True)
        if len(set(cl)) > 1:
            self.close_connection = True
            raise IllegalArgumentException("conflicting Content-Length headers")
        if not cl:
            return Body(self.reader, 0, chunked=False)
        text = cl[0].strip()
        if not text.isdigit() or not text.isascii() or len(text) > 18:
            self.close_connection = True
            raise IllegalArgumentException("Content-Length is not a number")
        return Body(self.reader, int(text), chunked=False)

    def _read_signed_body(self, body: Body) -> bytes:
        if body.length is not None and body.length > MAX_SIGNED_BODY:
            raise IllegalArgumentException(
                f"the request body is larger than {MAX_SIGNED_BODY} bytes"
            )
        data = bytearray()
        while not body.done:
            data += body.read(_PIECE)
            if len(data) > MAX_SIGNED_BODY:
                raise IllegalArgumentException(
                    f"the request body is larger than {MAX_SIGNED_BODY} bytes"
                )
        return bytes(data)

    def _spool(self, body: Body) -> tuple[SpooledBody, str]:
        if body.length is not None and body.length > MAX_STREAM_BODY:
            raise IllegalArgumentException(
                f"the request body is larger than {MAX_STREAM_BODY} bytes"
            )
        spool = tempfile.SpooledTemporaryFile(max_size=_PIECE)  # noqa: SIM115 - closed by the caller
        h = hashlib.sha256()
        try:
            while not body.done:
                piece = body.read(_PIECE)
                h.update(piece)
                spool.write(piece)
                if body.consumed > MAX_STREAM_BODY:
                    raise IllegalArgumentException(
                        f"the request body is larger than {MAX_STREAM_BODY} bytes"
                    )
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return SpooledBody(cast(IO[bytes], spool), body.consumed), h.hexdigest()

    def _respond(self) -> None:
        record = self._record
        assert record is not None
        body: Body | None = None
        spooled: SpooledBody | None = None
        try:
            raw_path, _, raw_query = self.path.partition("?")
            found = routes.match(self.command, raw_path)
            route = found[0] if found else None
            record.operation = route.operation if route else None
            body = self._open_body()
            verifier = self.server.verifier
            claim = verifier.claim(self.headers)
            record.key = claim.authorization.access_key
            streaming = route is not None and route.streaming
            signed_body = b""
            stream: routes.Readable | None = None
            if claim.payload_hash == UNSIGNED_PAYLOAD:
                if not streaming:
                    raise AccessDeniedException(
                        "UNSIGNED-PAYLOAD is accepted only for PutChunk, PutObject and "
                        "NotifyObjectComplete"
                    )
                payload_hash = UNSIGNED_PAYLOAD
            elif streaming and claim.payload_hash is not None:
                payload_hash = claim.payload_hash
            elif streaming:
                spooled, payload_hash = self._spool(body)
            else:
                signed_body = self._read_signed_body(body)
                payload_hash = hashlib.sha256(signed_body).hexdigest()
                if claim.payload_hash is not None and not hmac.compare_digest(
                    claim.payload_hash, payload_hash
                ):
                    raise AccessDeniedException(
                        "the body does not match the X-Amz-Content-SHA256 it was signed with"
                    )
            key = verifier.verify(
                claim, self.command, raw_path, raw_query, self.headers, payload_hash
            )
            if found is None or route is None:
                raise routes.not_found(self.command, raw_path)
            if streaming:
                if spooled is not None:
                    stream = spooled if spooled.length else None
                else:
                    if claim.payload_hash not in (None, UNSIGNED_PAYLOAD):
                        body.expect_sha256(str(claim.payload_hash))
                    stream = None if body.empty else body
            labels = routes.decode_labels(found[1])
            record.job = labels.get("jobId")
            call = routes.Call(
                self.server.backend.for_owner(key),
                labels,
                routes.parse_query(raw_query),
                signed_body,
                stream,
            )
            with self.server.limiter.admit(key):
                reply = route.handler(call)
            try:
                record.job = record.job or reply.job
                self._finish_body(body)
                self._send(reply.status, reply.headers, reply.body, reply.file, reply.file_length)
            finally:
                if reply.file is not None:
                    reply.file.close()
        except StorageError as exc:
            record.error = exc.code
            try:
                self._finish_body(body)
                self._send_exception(exc)
            except (ConnectionError, TimeoutError):
                self.close_connection = True
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            record.error = "ConnectionLost" if isinstance(exc, ConnectionError) else "Timeout"
        except Exception as exc:  # noqa: BLE001 - the client gets a modeled 500, the log the details
            self.close_connection = True
            self.server.log.error(f"request {self._request_id} failed", exc)
            message = (
                f"storage failure: {exc.strerror}"
                if isinstance(exc, OSError) and exc.strerror
                else f"internal error (request id {self._request_id})"
            )
            with contextlib.suppress(OSError):
                self._send_exception(ServiceInternalException(message))
        finally:
            if body is not None and self._record is not None:
                self._record.bytes_in = body.consumed
            if spooled is not None:
                spooled.close()

    def _finish_body(self, body: Body | None) -> None:
        """Consume what the operation left of the body, so the connection can carry on."""
        if body is None:
            self.close_connection = True
            return
        try:
            if not body.drain(DRAIN_LIMIT):
                self.close_connection = True
        except (StorageError, ValueError):
            self.close_connection = True


class _SocketWriter:
    """What ``BaseHTTPRequestHandler`` writes ``100 Continue`` through."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass
