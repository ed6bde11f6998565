"""Client-side run state: pending-run records and run locks.

A backup is identified by where it goes (the repository or endpoint), the
host and the paths it covers: its **run key**. For each run key cryo keeps,
in its state directory (``$XDG_STATE_HOME/cryo``, by default
``~/.local/state/cryo``):

* a **pending-run record** (``pending/KEY.json``), written and fsynced
  before the job is created and removed once the job is committed. It holds
  the client token, base job and pool of the unfinished run, so the next
  run of the same backup after a crash, a kill or an outage sends the same
  client token and continues the same job instead of starting over;
* a **lock** (``locks/KEY.lock``, ``flock``), held for the whole run, so
  two runs of the same backup never interleave; the second waits up to
  ``lock_wait`` seconds, then gives up with ``LockHeld`` (exit 13).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryo.exitcodes import LockHeld
from cryo.storage.chunkstore import fsync_dir


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "cryo"


def run_key(target: str, host: str, paths: Sequence[str]) -> str:
    """A stable name for the backup of ``paths`` on ``host`` to ``target``."""
    text = json.dumps([target, host, list(paths)], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PendingRun:
    token: str
    base_job_id: str | None
    pool: str | None


class PendingRecord:
    """The pending-run record of one run key."""

    def __init__(self, state_dir: Path, key: str) -> None:
        self.path = state_dir / "pending" / f"{key}.json"

    def load(self) -> PendingRun | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return PendingRun(str(data["token"]), data.get("base"), data.get("pool"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable record: start a new run rather than fail

    def save(self, run: PendingRun) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        data = {"token": run.token, "base": run.base_job_id, "pool": run.pool}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def run_lock(state_dir: Path, key: str, wait: float, describe: str) -> Iterator[None]:
    """Hold the lock of ``key`` for the body; waits up to ``wait`` seconds for it."""
    locks = state_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    raise LockHeld(
                        f"another backup of {describe} is running{holder}; "
                        "wait for it, or pass --lock-wait SECONDS"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
