"""Starting and stopping a server: settings, listen address, signals."""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from cryo.errors import CryoError
from cryo.exitcodes import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7480
DEFAULT_LISTEN = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    repo: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    region: str = DEFAULT_REGION
    credentials: Path | None = None
    log_format: str = "text"
    max_connections: int = 64
    max_requests_per_key: int = 32
    idle_timeout: float = 60.0
    io_timeout: float = 120.0
    shutdown_grace: float = 60.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        raise UsageError(f"--listen must be HOST:PORT, got {text!r}")
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"--listen: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--listen: write an IPv6 address in brackets, e.g. [::1]:{port}")
    return host, port


def is_loopback(host: str) -> bool:
    """True if every address ``host`` stands for is a loopback address."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--listen: cannot resolve {host!r}: {exc.strerror}") from None
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_listen(host: str, allow_public: bool) -> None:
    if not allow_public and not is_loopback(host):
        raise UsageError(
            f"--listen {host or '(all interfaces)'} is not a loopback address; "
            "pass --allow-public to serve other machines (put TLS in front of it)"
        )


def run(
    config: ServerConfig,
    *,
    stdout: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then finish the requests in progress; returns 0."""
    from cryo.server.credentials import load_keys
    from cryo.server.http import CryoHTTPServer
    from cryo.server.log import ServerLog
    from cryo.server.sigv4 import Verifier
    from cryo.storage.local import LocalBackend

    out = stdout if stdout is not None else sys.stdout
    log = ServerLog(config.log_format)
    keys = load_keys(
        config.credentials, environ, warn=lambda message: log.event("warning", message=message)
    )
    verifier = Verifier(keys.secret_for, config.region)
    backend = LocalBackend(config.repo)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        server = CryoHTTPServer(
            (config.host, config.port),
            family,
            backend,
            verifier,
            log,
            max_connections=config.max_connections,
            max_requests_per_key=config.max_requests_per_key,
            idle_timeout=config.idle_timeout,
            io_timeout=config.io_timeout,
        )
    except OSError as exc:
        backend.close()
        raise CryoError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: stop waiting for requests in progress
            server.connections.force_close()
        stop.set()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, on_signal)
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), name="cryo-accept")
    try:
        thread.start()
        out.write(server.url + "\n")
        out.flush()
        log.event(
            "listening",
            url=server.url,
            repo=str(config.repo),
            region=config.region,
            keys=len(keys),
        )
        while not stop.wait(1.0):
            pass
        log.event("stopping", open_connections=server.connections.open_count)
    finally:
        server.shutdown()
        thread.join()
        finished = server.stop(config.shutdown_grace)
        backend.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
    log.event("stopped", clean=finished)
    return 0
