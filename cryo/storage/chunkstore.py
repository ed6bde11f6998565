"""Content-addressed chunk storage behind a small interface.

A chunk store keeps immutable byte strings under their hex SHA-256. It knows
nothing of jobs or objects (the catalog does); it only promises that ``put``
is durable and atomic: once it returns, the bytes survive a crash, and no
reader ever sees a partial chunk under its key.

``FileChunkStore`` keeps one file per chunk, ``chunks/ab/<sha256>``. A write
goes to a temporary file under ``tmp/`` (named after the writing process),
is fsynced, renamed into place, and the directory is fsynced. Temporary files
left by processes that died are removed when the store is opened.

An object-store implementation (S3 and compatible) satisfies the same
protocol, so a server can keep its chunks off its own disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class ChunkWriter(Protocol):
    """A chunk being written; nothing is visible until ``commit``."""

    def write(self, data: bytes | memoryview) -> None: ...

    def seal(self) -> None:
        """Flush the written bytes to stable storage (the slow part of a commit)."""
        ...

    def commit(self, key: str) -> None:
        """Make the written bytes durable under ``key`` (seals first if needed)."""
        ...

    def abort(self) -> None: ...


class ChunkStore(Protocol):
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Durably store ``data`` under ``key`` (atomic, idempotent)."""
        ...

    def writer(self) -> ChunkWriter:
        """Stream a chunk whose key is known only once all of it is written."""
        ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> Iterator[str]: ...


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter:
    __slots__ = ("_fd", "_store", "_tmp")

    def __init__(self, store: FileChunkStore) -> None:
        self._store = store
        self._tmp = store.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}"
        self._fd: int | None = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )

    def write(self, data: bytes | memoryview) -> None:
        if self._fd is None:
            raise ValueError("write to a sealed chunk writer")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def seal(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def commit(self, key: str) -> None:
        self.seal()
        dest = self._store.path_of(key)
        try:
            os.replace(self._tmp, dest)
        except FileNotFoundError:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(dest.parent.parent)
            os.replace(self._tmp, dest)
        fsync_dir(dest.parent)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class FileChunkStore:
    """Chunks as files under ``root/chunks``; temporary files under ``root/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.chunk_dir = root / "chunks"
        self.tmp_dir = root / "tmp"
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        for entry in self.tmp_dir.iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid():
                continue  # this process's own writers
            try:
                os.kill(pid, 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()

    def path_of(self, key: str) -> Path:
        return self.chunk_dir / key[:2] / key

    def writer(self) -> _FileWriter:
        return _FileWriter(self)

    def put(self, key: str, data: bytes | memoryview) -> None:
        w = self.writer()
        try:
            w.write(data)
            w.commit(key)
        except BaseException:
            w.abort()
            raise

    def get(self, key: str) -> bytes:
        return self.path_of(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return self.path_of(key).open("rb")

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_of(key).unlink()

    def keys(self) -> Iterator[str]:
        for sub in sorted(self.chunk_dir.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    yield f.name
