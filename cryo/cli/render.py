"""Rendering the core's events: a progress display on a terminal, JSON lines, or quiet.

* ``tty``: a rich progress line on stderr (files, bytes, throughput, elapsed,
  and, once the totals are known, a filling bar and the time remaining).
* ``json``: one JSON object per line on stdout, progress at most twice a second.
* ``plain`` and ``quiet``: nothing while running; warnings go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from cryo.events import Event, FileWarning, Progress, Retry

log = logging.getLogger("cryo")


class Renderer:
    def __init__(
        self, mode: str, stdout: TextIO | None = None, stderr: TextIO | None = None
    ) -> None:
        self.mode = mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._last_json = 0.0
        self._progress: Any = None
        self._task: Any = None
        if mode == "tty":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stderr)
            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[files]} files"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("backup", total=None, files=0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, FileWarning):
            log.warning("%s: %s", event.path, event.message)
            if self.mode == "json":
                self.emit({"type": "warning", "path": event.path, "message": event.message})
            elif self._progress is not None:
                self._progress.console.print(f"warning: {event.path}: {event.message}")
            else:
                self.stderr.write(f"cryo: warning: {event.path}: {event.message}\n")
        elif isinstance(event, Progress):
            if self.mode == "json":
                now = time.monotonic()
                if event.phase == "done" or now - self._last_json >= 0.5:
                    self._last_json = now
                    self.emit(
                        {
                            "type": "progress",
                            "phase": event.phase,
                            "files": event.files,
                            "files_total": event.files_total,
                            "bytes_read": event.bytes_read,
                            "bytes_stored": event.bytes_stored,
                            "bytes_done": event.bytes_done,
                            "bytes_total": event.bytes_total,
                        }
                    )
            elif self._progress is not None:
                files = str(event.files)
                if event.files_total is not None:
                    files += f"/{max(event.files_total, event.files)}"
                total = event.bytes_total
                self._progress.update(
                    self._task, description=event.phase, completed=event.bytes_done,
                    total=None if total is None else max(total, event.bytes_done), files=files,
                )  # fmt: skip
        elif isinstance(event, Retry):
            log.info("retry %d of %s: %s", event.attempt, event.operation, event.error)
            if self.mode == "tty" and self._progress is not None:
                self._progress.console.print(f"retrying {event.operation}: {event.error}")

    def emit(self, record: dict[str, Any]) -> None:
        self.stdout.write(json.dumps(record, sort_keys=True) + "\n")
        self.stdout.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def choose_mode(quiet: bool, as_json: bool, stderr: TextIO | None = None) -> str:
    import os

    if as_json:
        return "json"
    if quiet:
        return "quiet"
    err = stderr or sys.stderr
    if err.isatty() and os.environ.get("TERM") != "dumb":
        return "tty"
    return "plain"
