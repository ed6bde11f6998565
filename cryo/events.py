"""Events the core emits; the CLI decides how (and whether) to show them.

The core never prints. A pipeline takes an ``on_event`` callback and calls it
from any thread; callbacks must be quick and thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Progress:
    """Running totals; emitted at most a few times per second.

    ``bytes_done`` counts every byte dealt with (read, or found unchanged and
    skipped), so it moves towards ``bytes_total``; the totals are None until
    they are known (a backup counts them beside the run when asked to).
    """

    phase: str
    files: int
    bytes_read: int
    bytes_stored: int
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None


@dataclass(frozen=True, slots=True)
class FileWarning:
    """A file that could not be backed up or restored as it was; the run goes on."""

    path: str
    message: str


@dataclass(frozen=True, slots=True)
class Retry:
    """A storage call failed transiently and will be tried again."""

    operation: str
    attempt: int
    error: str


Event = Progress | FileWarning | Retry
EventSink = Callable[[Event], None]


def ignore(_: Event) -> None:
    """An event sink that drops everything."""


class Ticker:
    """Calls ``fn`` every ``interval`` seconds from a thread of its own, until ``stop``.

    ``stopped`` is set by ``stop``, so other threads of the run can watch it.
    An exception of ``fn`` ends the ticking and goes to ``on_error`` (raised in
    the ticking thread when there is none).
    """

    def __init__(
        self,
        fn: Callable[[], None],
        interval: float = 0.25,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.stopped = threading.Event()
        self._fn, self._interval, self._on_error = fn, interval, on_error
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stopped.wait(self._interval):
                self._fn()
        except BaseException as exc:
            if self._on_error is None:
                raise
            self._on_error(exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking (and wait for a tick in progress); harmless if never started."""
        self.stopped.set()
        if self._thread.ident is not None:
            self._thread.join()
