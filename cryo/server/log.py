"""The server's log on stderr: one line per request, plus start, stop and errors.

``text`` lines read ``time remote key operation job status bytes ms``;
``json`` lines are objects with the same facts under fixed names (see
docs/API.md). Neither form ever holds a secret key, a signature, a header
value or a request body.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")


@dataclass(slots=True)
class AccessRecord:
    """The facts of one request, as the access log states them."""

    remote: str
    method: str = "-"
    operation: str | None = None
    key: str | None = None
    job: str | None = None
    status: int | None = None
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    ms: float = 0.0
    request_id: str = ""


def _token(value: str | None) -> str:
    """A field of a text line as one token: what a client sent cannot add blanks or lines."""
    if not value:
        return "-"
    return "".join(c if c.isprintable() and c != " " else _escaped(c) for c in value)


def _escaped(c: str) -> str:
    return "\\x20" if c == " " else c.encode("unicode_escape").decode("ascii")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ServerLog:
    def __init__(self, fmt: str = "text", stream: TextIO | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed or full log must not take requests down with it

    def access(self, rec: AccessRecord) -> None:
        if self.format == "json":
            doc: dict[str, Any] = {"time": _now(), "event": "request"}
            fields = asdict(rec)
            doc.update(
                {
                    "remote": fields["remote"],
                    "key": fields["key"],
                    "method": fields["method"],
                    "operation": fields["operation"],
                    "job": fields["job"],
                    "status": fields["status"],
                    "error": fields["error"],
                    "bytes": rec.bytes_in + rec.bytes_out,
                    "bytes_in": rec.bytes_in,
                    "bytes_out": rec.bytes_out,
                    "ms": round(rec.ms, 3),
                    "request_id": rec.request_id,
                }
            )
            self._write(json.dumps(doc, ensure_ascii=False))
            return
        status = "-" if rec.status is None else str(rec.status)
        error = f" {rec.error}" if rec.error else ""
        self._write(
            f"{_now()} {rec.remote} {_token(rec.key)} {_token(rec.operation or rec.method)} "
            f"{_token(rec.job)} {status}{error} in={rec.bytes_in} out={rec.bytes_out} "
            f"{rec.ms:.1f}ms {rec.request_id}"
        )

    def event(self, message: str, /, **fields: Any) -> None:
        """A server event (started, stopping, a warning about the credentials file...)."""
        if self.format == "json":
            self._write(json.dumps({"time": _now(), "event": message, **fields}))
            return
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        self._write(f"{_now()} {message}{extra}")

    def error(self, message: str, exc: BaseException | None = None) -> None:
        """An unexpected failure, with its traceback."""
        tb = "".join(traceback.format_exception(exc)) if exc is not None else ""
        if self.format == "json":
            self._write(
                json.dumps({"time": _now(), "event": "error", "message": message, "traceback": tb})
            )
            return
        self._write(f"{_now()} ERROR {message}" + (f"\n{tb.rstrip()}" if tb else ""))
