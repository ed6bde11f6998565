"""Bounded executors and a coordinator that stops everything on the first fatal error.

``BoundedExecutor`` puts a semaphore in front of a thread pool: ``submit``
blocks once ``max_in_flight`` tasks are queued or running, so a fast producer
(a disk reader) waits for a slow consumer (the uploads) instead of filling
memory. ``Coordinator`` records the first fatal exception; every stage checks
it between units of work and stops, and ``raise_if_failed`` re-raises it in
the thread that drives the pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Cancelled(Exception):
    """Raised inside a stage that notices the pipeline has failed."""


class Coordinator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.failed = threading.Event()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, Cancelled):
                self.error = exc
            self.failed.set()

    def check(self) -> None:
        if self.failed.is_set():
            raise Cancelled()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self.failed.is_set():
            raise Cancelled()


class BoundedExecutor:
    """A thread pool whose ``submit`` blocks while ``max_in_flight`` tasks are pending."""

    def __init__(
        self, workers: int, max_in_flight: int, coordinator: Coordinator, name: str
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._coordinator = coordinator
        self._lock = threading.Lock()
        self._pending = 0

    def busy(self) -> bool:
        """Whether a submitted task has not finished yet."""
        return self._pending > 0

    def submit(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        while not self._slots.acquire(timeout=0.2):
            self._coordinator.check()
        self._coordinator.check()
        with self._lock:
            self._pending += 1
        try:
            future: Future[R] = self._pool.submit(self._run, fn, *args, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            self._done()
            raise
        return future

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
        self._slots.release()

    def _run(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            self._coordinator.fail(exc)
            raise
        finally:
            self._done()

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
