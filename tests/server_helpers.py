"""Start a real ``cryo server`` process on 127.0.0.1 (port 0) and talk to it."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryo.storage.remote import RemoteBackend

REGION = "us-east-1"


class ServerProcess:
    """A ``cryo server`` child process, its credentials file and its log."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        credentials_file: bool = True,
    ) -> None:
        self.workdir = workdir
        self.repo = workdir / "repo"
        self.credentials = workdir / "credentials"
        self.log_path = workdir / "server.log"
        self._lock = threading.Lock()
        if not self.credentials.exists():
            self.credentials.write_text("# access keys of the test server\n")
            self.credentials.chmod(0o600)
        self.first_key = self.new_key()
        cmd = [
            sys.executable, "-m", "cryo", "server",
            "--repo", str(self.repo),
            "--listen", "127.0.0.1:0",
            "--region", REGION,
            *(["--credentials", str(self.credentials)] if credentials_file else []),
            *args,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRYO_")}
        full_env.update(env or {})
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, env=full_env, cwd=workdir
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"cryo server did not start ({line!r}):\n{self.log()}")
        self.url = line

    def new_key(self) -> tuple[str, str]:
        """A fresh access key, added to the credentials file the server re-reads."""
        key_id = "AKCRYO" + secrets.token_hex(7).upper()
        secret = secrets.token_urlsafe(30)
        with self._lock, self.credentials.open("a") as f:
            f.write(f"{key_id} {secret}\n")
        return key_id, secret

    def revoke(self, key_id: str) -> None:
        """Remove a key from the credentials file (replaced atomically)."""
        with self._lock:
            lines = self.credentials.read_text().splitlines(keepends=True)
            tmp = self.credentials.with_suffix(".new")
            tmp.write_text("".join(x for x in lines if not x.startswith(key_id + " ")))
            tmp.chmod(0o600)
            tmp.replace(self.credentials)

    def secrets(self) -> list[str]:
        lines = self.credentials.read_text().splitlines()
        return [x.split()[1] for x in lines if x.strip() and not x.startswith("#")]

    def client(self, key: tuple[str, str] | None = None, **kwargs: object) -> RemoteBackend:
        key_id, secret = key or self.new_key()
        return RemoteBackend(
            self.url,
            region=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            **kwargs,  # type: ignore[arg-type]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()
            if self.process.stdout is not None:
                self.process.stdout.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


# -- hand-made requests -------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def error_type(self) -> str | None:
        return self.headers.get("x-amzn-errortype")

    def json(self) -> Any:
        return json.loads(self.body)


def signed_headers(
    url: str,
    method: str,
    target: str,
    key: tuple[str, str],
    *,
    body: bytes = b"",
    payload: str | None = None,
    when: datetime | None = None,
    region: str = REGION,
    service: str = "backup-storage",
    headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Headers that sign a request as botocore would (at time ``when``).

    ``payload`` goes into X-Amz-Content-SHA256 (e.g. UNSIGNED-PAYLOAD); with
    None, the SHA-256 of ``body`` is signed and no such header is sent.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    moment = when or datetime.now(UTC)

    class Signer(SigV4Auth):
        def add_auth(self, request: AWSRequest) -> None:
            request.context["timestamp"] = moment.strftime("%Y%m%dT%H%M%SZ")
            self._modify_request_before_signing(request)
            canonical = self.canonical_request(request)
            signature = self.signature(self.string_to_sign(request, canonical), request)
            self._inject_signature_to_request(request, signature)

    all_headers = dict(headers or {})
    if payload is not None:
        all_headers["X-Amz-Content-SHA256"] = payload
    request = AWSRequest(method=method, url=url + target, data=body, headers=all_headers)
    Signer(Credentials(*key), service, region).add_auth(request)
    return {k: str(v) for k, v in request.headers.items()}


def send(
    url: str, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> Response:
    """One request over a new connection; the reply as it came."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, target, body=body, headers=headers)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def raw_exchange(url: str, request: bytes) -> Response:
    """Send ``request`` bytes as they are on a new socket and parse the reply."""
    with connect(url) as sock:
        sock.sendall(request)
        return read_response(sock)


def read_response(sock: socket.socket) -> Response:
    f = sock.makefile("rb")
    status_line = f.readline().decode("latin-1")
    if not status_line:
        raise ConnectionError("the server closed the connection without a reply")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline().decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return Response(status, headers, body)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=60)


def request_head(url: str, method: str, target: str, headers: dict[str, str], length: int) -> bytes:
    """The request line and headers of a request whose body the caller sends itself."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.removeprefix('http://')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
