"""Retries in one place: a wrapper around any storage backend.

Every call through ``RetryingBackend`` is retried when the error says a
retry can help (``CryoError.retryable``: throttling, retryable and internal
service errors, unavailability, connection failures and timeouts), with
exponential backoff and full jitter, until a cap on the total time spent on
that call. Errors that a retry cannot fix (illegal argument, access denied,
not found) are raised at once. Arguments are passed again unchanged, so a
retried PutChunk resends exactly the same bytes. Each retry is counted and
reported as an event.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from cryo.errors import CryoError
from cryo.events import EventSink, Retry, ignore


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_elapsed: float = 300.0
    """Seconds one call may spend retrying before its last error is raised."""
    initial: float = 0.25
    """Scale of the first backoff (seconds)."""
    maximum: float = 20.0
    """Longest single backoff (seconds)."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, CryoError) and exc.retryable


class RetryingBackend:
    """A backend whose every method retries transient failures."""

    def __init__(
        self, backend: Any, policy: RetryPolicy | None = None, on_event: EventSink = ignore
    ) -> None:
        self._backend = backend
        self._policy = policy or RetryPolicy()
        self._on_event = on_event
        self._lock = threading.Lock()
        self._wrapped: dict[str, Any] = {}
        self.retries = 0

    def __getattr__(self, name: str) -> Any:
        wrapped = self._wrapped.get(name)
        if wrapped is not None:
            return wrapped
        target = getattr(self._backend, name)
        if not callable(target) or name.startswith("_") or name == "close":
            return target
        import tenacity

        policy = self._policy

        def before_sleep(state: tenacity.RetryCallState) -> None:
            with self._lock:
                self.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            self._on_event(Retry(name, state.attempt_number, str(exc)))

        backoff = tenacity.wait_random_exponential(multiplier=policy.initial, max=policy.maximum)

        def wait(state: tenacity.RetryCallState) -> float:
            # Never sleep past the cap: the last attempt starts at the cap at the latest.
            left = policy.max_elapsed - (state.seconds_since_start or 0.0)
            return max(0.0, min(backoff(state), left))

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_retryable),
            wait=wait,
            stop=tenacity.stop_after_delay(policy.max_elapsed),
            before_sleep=before_sleep,
            reraise=True,
        )

        def call(*args: Any, **kwargs: Any) -> Any:
            return retrying(target, *args, **kwargs)

        # One Retrying per method: tenacity keeps each call's state thread-local.
        self._wrapped[name] = call
        return call

    def close(self) -> None:
        self._backend.close()
