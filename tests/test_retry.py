"""The retry wrapper: transient failures are retried and counted, permanent ones are not,
and a retried PutChunk resends exactly the same bytes."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cryo.backup import BackupOptions, run_backup
from cryo.errors import (
    IllegalArgumentException,
    ServiceUnavailableException,
    ThrottlingException,
)
from cryo.jobreader import JobReader
from cryo.retry import RetryingBackend, RetryPolicy
from cryo.storage.local import LocalBackend

FAST = RetryPolicy(max_elapsed=10, initial=0.01, maximum=0.05)


class Flaky:
    """A real LocalBackend whose every ``every``-th call fails once with ``error``."""

    def __init__(self, backend: LocalBackend, every: int, error: type[Exception]) -> None:
        self._backend = backend
        self._every = every
        self._error = error
        self._lock = threading.Lock()
        self.calls = 0
        self.faults = 0
        self.put_chunk_bodies: dict[tuple[str, int], list[bytes]] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._backend, name)
        if not callable(target) or name == "close":
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls += 1
                fail = self.calls % self._every == 0
                if name == "put_chunk":
                    key = (args[1], args[2])
                    self.put_chunk_bodies.setdefault(key, []).append(bytes(args[3]))
                if fail:
                    self.faults += 1
            if fail:
                raise self._error(f"injected fault in {name}")
            return target(*args, **kwargs)

        return call


def test_backup_survives_transient_faults_and_counts_retries(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_bytes(os.urandom(3000))
    (src / "big").write_bytes(os.urandom(700 * 1024))
    flaky = Flaky(LocalBackend(tmp_path / "repo"), every=4, error=ThrottlingException)
    summary = run_backup(
        flaky,
        BackupOptions(paths=(os.fsencode(src),), chunk_size=64 * 1024, retry=FAST),
    )
    assert summary.status == "COMPLETED"
    assert summary.retries == flaky.faults > 0
    # every retried PutChunk carried the very same bytes
    for bodies in flaky.put_chunk_bodies.values():
        assert len(set(bodies)) == 1
    reader = JobReader(LocalBackend(tmp_path / "repo"), summary.job_id)
    _, entries = reader.manifest()
    for e in entries:
        if e.kind == "f":
            assert reader.file_bytes(e) == (Path("/") / os.fsdecode(e.path)).read_bytes()


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    flaky = Flaky(LocalBackend(tmp_path / "repo"), every=1, error=IllegalArgumentException)
    r = RetryingBackend(flaky, FAST)
    with pytest.raises(IllegalArgumentException):
        r.create_job()
    assert flaky.calls == 1 and r.retries == 0


def test_retrying_stops_at_the_time_cap(tmp_path: Path) -> None:
    flaky = Flaky(LocalBackend(tmp_path / "repo"), every=1, error=ServiceUnavailableException)
    r = RetryingBackend(flaky, RetryPolicy(max_elapsed=0.3, initial=0.01, maximum=0.05))
    with pytest.raises(ServiceUnavailableException):
        r.list_jobs()
    assert flaky.calls > 2 and r.retries == flaky.calls - 1
