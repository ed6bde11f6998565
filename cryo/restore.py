"""The restore pipeline: rebuild a job's tree, verified, never trusting the job's paths.

Algorithm
---------
The manifest is streamed by one thread, which creates directories, applies
the overwrite policy and gathers files in batches (at most ``batch_files``
files or ``batch_bytes`` of data). For each batch:

1. The batch's extents are grouped by (data object, chunk) and every needed
   chunk is queued **once**; the queue is bounded, so the manifest reader
   waits when ``connections`` fetch workers lag. The next batch is gathered
   while this one is fetched.
2. A worker fetches the chunk, checks its SHA-256 against the listed checksum
   before decoding it (a large file's, when compressed, into a reused
   page-aligned buffer), and writes its slices into every file that needs them,
   with ``os.pwrite`` at their file offsets, in any order. The first piece
   written to a file creates it in its target directory: without a name
   (``O_TMPFILE``) when it is smaller than ``DIRECT_MIN_SIZE`` and the file
   system can, otherwise under a temporary name (``.cryo-restore-...``);
   sized with ``ftruncate`` when it has holes (holes stay holes). Files of
   ``DIRECT_MIN_SIZE`` or more are written with direct I/O (their aligned
   part), around the page cache (:mod:`cryo.directio`), straight from that
   buffer. A chunk that fails its checksum is fetched once more; if it
   fails again, the files that need it are reported and left out, and the
   restore goes on.
3. Each file's xxh3-128 is computed over its bytes in file order
   (``_InOrderHash``: a piece that arrives early waits, copied out of a
   reused buffer, and fetches run at most ``HASH_WINDOW`` bytes ahead of the
   hashed prefix) and compared with the manifest's; a file that is one piece
   is checked in memory before it is even created. Only a file that matches
   gets its owner, mode, extended attributes and times, and then its final
   name (``linkat`` for an unnamed file, ``rename`` for a temporary), from
   the worker that wrote (or gave up on) its last piece. A corrupt or
   partial file never sits under a real name, and a file is never read back.

The short path: most files of a tree are small (under ``DIRECT_MIN_SIZE``,
not empty), one piece of one chunk, without extended attributes, in a
directory the restore made, on a file system that creates unnamed files.
Their records are checked where they are read, without being decoded into
entries, and the worker holding their chunk does all of a file at once
(check its xxh3-128, create it unnamed with its mode, write, owner and
mode unless it has them already, times, name), with no state shared per
file (``_Small``); what a new file gets unasked is seen once per
directory and mode (``_Creation``; the process's umask must not change
during the restore). Anything unusual on the way hands the file to the
general path above.

Directories are created as they come (owner-only at first) and get their
final mode, owner and times last, deepest first, so restoring files into them
does not change their mtime. Hard links are made once their target exists.

Safety: a job's paths are untrusted. Absolute paths, empty, ``.`` or ``..``
components and NUL bytes are refused; every file system operation is
relative to an open directory descriptor and opens each component with
``O_NOFOLLOW | O_DIRECTORY``, so no symlink, not even one this restore
created, is ever followed, and nothing is written outside the target.

Overwrite policies for existing entries: ``never`` skips them, ``if-changed``
skips files whose size, mtime and content hash already match (so an
interrupted restore resumes), ``always`` replaces them.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fnmatch
import itertools
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from cryo.checksums import hash_zeros
from cryo.directio import ALIGN, BUFFERS, preallocate, pwrite_direct, refused
from cryo.errors import CryoError
from cryo.events import EventSink, FileWarning, Progress, Ticker, ignore
from cryo.executor import BoundedExecutor, Cancelled, Coordinator
from cryo.jobreader import CorruptData, JobReader
from cryo.jobs import int_attribute
from cryo.manifest import ManifestEntry, ManifestError, json_int, record_kind_path
from cryo.retry import RetryingBackend, RetryPolicy
from cryo.storage.api import MAX_CHUNK_BYTES

if TYPE_CHECKING:
    from cryo.storage.api import Job
    from cryo.team import Send, Team

OVERWRITE_POLICIES = ("never", "if-changed", "always")
_TEMP_PREFIX = b".cryo-restore-"
DEFAULT_CONNECTIONS = 4
"""Chunks in flight when one process restores (as fast as 8 here, with a third less memory)."""
DIRECT_MIN_SIZE = 1024 * 1024
"""Files this large or larger are written with direct I/O (see :mod:`cryo.directio`)."""
HASH_WINDOW = 32 * 1024 * 1024
"""How far past a file's hashed prefix its pieces may be fetched (bounds pieces held early)."""
_TEMP_RE = re.compile(rb"^\.cryo-restore-[0-9a-f]{16}\.tmp$")


class UnsafePath(CryoError):
    """A path in the job that could escape the target directory."""


class BadEntry(UnsafePath):
    """An entry whose fields no file system could hold (a damaged or crafted job)."""


class TargetNotEmpty(CryoError):
    """The target directory has content and no overwrite policy was given."""


_NO_HARD_LINKS = frozenset((errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS))
"""What ``link`` fails with on a file system that has no hard links (vfat, some FUSE ones)."""

_TARGET_FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))
"""Errors that only the target file system gives: it cannot take any more of the restore."""


class WriteFailed(CryoError):
    """The target cannot take the restore (full, over quota, read-only): nothing more is written."""


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    target: bytes
    includes: tuple[bytes, ...] = ()
    excludes: tuple[bytes, ...] = ()
    overwrite: str | None = None
    connections: int | None = None
    """Chunks in flight (shared among the processes); None: ``DEFAULT_CONNECTIONS`` for
    one process, one per process for several (the files, not the fetches, bound those)."""
    batch_files: int = 512
    batch_bytes: int = 256 * 1024 * 1024
    owners: bool = field(default_factory=lambda: os.geteuid() == 0)
    processes: int = 1
    """Processes restoring files side by side (a job of many files; see ``_Shard``)."""
    files_per_process: int = 1024
    """A job gets a process more per this many regular files, up to ``processes``."""
    unit_files: int = 1024
    unit_bytes: int = 32 * 1024 * 1024
    """Without the job's totals, files are dealt out to the processes in runs of about
    this many (see ``_Shard``)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class RestoreSummary:
    job_id: str
    files: int
    entries: int
    bytes_written: int
    skipped: int
    retries: int
    failures: tuple[FileWarning, ...]
    seconds: float


class _TempDir(NamedTuple):
    """A helper's word, sent before it first names a temporary in directory ``path``."""

    path: bytes


class _Counts(NamedTuple):
    """What one process of a restore has done (helpers send theirs to the first)."""

    files: int = 0
    entries: int = 0
    skipped: int = 0
    bytes_written: int = 0
    bytes_kept: int = 0
    retries: int = 0


_BAD_PARTS = frozenset((b"", b".", b".."))


def check_path(path: bytes) -> list[bytes]:
    """The components of a job path, or UnsafePath."""
    parts = path.split(b"/")
    if not path or not _BAD_PARTS.isdisjoint(parts) or b"\x00" in path:
        shown = path.decode("utf-8", "backslashreplace")
        if not path or path.startswith(b"/"):
            raise UnsafePath(f"refusing absolute or empty path {shown!r}")
        if b"\x00" in path:
            raise UnsafePath(f"refusing path with a NUL byte {shown!r}")
        raise UnsafePath(f"refusing path with an empty, '.' or '..' component {shown!r}")
    return parts


_NAME_MAX = 255
_PATH_MAX = 4096
_MAX_OFFSET = 2**63 - 1
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown
_MAX_DEV = 2**64 - 1
_KINDS = frozenset("fdlhpscb")


def check_entry(entry: ManifestEntry) -> list[bytes]:
    """The components of ``entry``'s path, once every field is one a file system can hold.

    Raises UnsafePath (a path that could escape) or BadEntry (a name, size,
    offset, id, time or device number out of range), so one crafted or
    damaged entry is refused by name while the rest of the job is restored.
    """
    parts = check_path(entry.path)

    def bad(what: str) -> BadEntry:
        return BadEntry(f"refusing {entry.path.decode('utf-8', 'backslashreplace')!r}: {what}")

    if max(map(len, parts)) > _NAME_MAX:
        raise bad(f"a name is longer than {_NAME_MAX} bytes")
    if entry.kind not in _KINDS:
        raise bad(f"unknown kind {entry.kind!r}")
    if not 0 <= entry.mode <= 0o7777:
        raise bad(f"mode {entry.mode} is out of range")
    if not (0 <= entry.uid <= _MAX_ID and 0 <= entry.gid <= _MAX_ID):
        raise bad(f"owner {entry.uid}:{entry.gid} is out of range")
    if not -_MAX_OFFSET <= entry.mtime_ns <= _MAX_OFFSET:
        raise bad(f"mtime {entry.mtime_ns} is out of range")
    if not 0 <= entry.size <= _MAX_OFFSET:
        raise bad(f"size {entry.size} is out of range")
    if not 0 <= entry.rdev <= _MAX_DEV:
        raise bad(f"device number {entry.rdev} is out of range")
    for x in entry.extents:
        if min(x.file_offset, x.chunk_index, x.chunk_offset, x.length) < 0 or (
            x.file_offset + x.length > entry.size
        ):
            raise bad("an extent lies outside the file")
    if entry.kind == "l" and (
        not entry.target or len(entry.target) >= _PATH_MAX or b"\x00" in entry.target
    ):
        raise bad("the symlink's target is missing, empty, too long or holds a NUL byte")
    return parts


def _matches(path: bytes, patterns: tuple[bytes, ...]) -> bool:
    """restic-style: a pattern matches the path, any of its parents, or (without '/') a name."""
    for p in patterns:
        pat = p.strip(b"/")
        if b"/" in pat:
            parts = path.split(b"/")
            for i in range(len(parts), 0, -1):
                if fnmatch.fnmatchcase(b"/".join(parts[:i]), pat):
                    return True
        elif any(fnmatch.fnmatchcase(c, pat) for c in path.split(b"/")):
            return True
    return False


def _is_parent_of_included(path: bytes, includes: tuple[bytes, ...]) -> bool:
    prefix = path + b"/"
    return any(p.strip(b"/").startswith(prefix) for p in includes)


class _Creation:
    """What a file created in one directory gets without being asked: its owner, and
    which modes come out as they were asked for.

    Seen, not predicted (the umask, a default ACL, a set-group-ID directory or
    a mount option decide, in ways no check of them all foresees): the first
    small file of each mode created there is looked at (``fstat``), and later
    ones skip the ``fchown`` and ``fchmod`` that would change nothing. Nothing
    the restore does changes it meanwhile: a directory gets its own owner,
    mode and extended attributes (a default ACL among them) only at the end.
    """

    __slots__ = ("modes", "owner")

    def __init__(self) -> None:
        self.owner: tuple[int, int] | None = None
        self.modes: dict[int, bool] = {}
        """By mode asked for (without special bits): whether it came out as asked."""

    def see(self, st: os.stat_result, mode: int) -> bool:
        """Record what a new file asked to have ``mode`` got; whether that is ``mode``."""
        self.owner = (st.st_uid, st.st_gid)
        exact = self.modes[mode] = stat.S_IMODE(st.st_mode) == mode
        return exact


class _Dirs:
    """Directory descriptors under the target, opened without following any symlink."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._cache: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.fresh: set[bytes] = set()
        """Directories this restore made (or found empty): nothing in them predates it."""
        self.all_fresh = False
        """The target was empty when the restore began: nothing under it predates it."""
        self._pins: dict[int, int] = {}
        """Descriptors in use by files in flight: never closed by ``trim``."""
        self._trim_at = 0
        """The cache size at which ``trim`` next looks (past what was pinned last time)."""
        self._creations: dict[int, _Creation] = {root_fd: _Creation()}
        """By open descriptor: what a new file there gets (dropped when it is closed)."""

    def creation(self, fd: int) -> _Creation:
        """What a new file in directory ``fd`` (one this cache holds open) gets unasked."""
        return self._creations[fd]

    def is_fresh(self, parts: list[bytes]) -> bool:
        return self.all_fresh or b"/".join(parts) in self.fresh

    def open(self, parts: list[bytes], create: bool) -> int:
        """fd of the directory ``parts`` (relative to the target)."""
        key = b"/".join(parts)
        with self._lock:
            fd = self._cache.get(key)
            if fd is not None:
                return fd
            # Start from the deepest directory on the way that is open already.
            start, fd = 0, self.root_fd
            for n in range(len(parts) - 1, 0, -1):
                cached = self._cache.get(b"/".join(parts[:n]))
                if cached is not None:
                    start, fd = n, cached
                    break
        opened: list[int] = []
        try:
            for i in range(start, len(parts)):
                part = parts[i]
                try:
                    nfd = os.open(
                        part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=fd,
                    )  # fmt: skip
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                        with self._lock:
                            self.fresh.add(b"/".join(parts[: i + 1]))
                    nfd = os.open(
                        part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=fd,
                    )  # fmt: skip
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(
                            f"refusing to follow a symlink or non-directory at "
                            f"{b'/'.join(parts).decode('utf-8', 'backslashreplace')!r}"
                        ) from None
                    raise
                opened.append(nfd)
                fd = nfd
        except BaseException:
            for f in opened:
                os.close(f)
            raise
        for f in opened[:-1]:
            os.close(f)
        with self._lock:
            existing = self._cache.get(key)
            if existing is not None:
                if opened:
                    os.close(fd)
                return existing
            if opened:
                self._cache[key] = fd
                self._creations[fd] = _Creation()
        return fd

    def cached(self) -> list[int]:
        with self._lock:
            return list(self._cache.values())

    def pin(self, fd: int) -> None:
        with self._lock:
            self._pins[fd] = self._pins.get(fd, 0) + 1

    def unpin(self, fd: int) -> None:
        self.unpin_all((fd,))

    def unpin_all(self, fds: Iterable[int]) -> None:
        with self._lock:
            pins = self._pins
            for fd in fds:
                n = pins.pop(fd) - 1
                if n:
                    pins[fd] = n

    def trim(self, keep: int = 256) -> None:
        """Once over twice ``keep``, close the oldest unpinned cached descriptors down to ``keep``.

        Call from the thread that opens directories (the only one that adds).
        """
        if len(self._cache) <= max(2 * keep, self._trim_at):
            return  # the common case, without the lock the workers' unpin takes
        with self._lock:
            for key in list(self._cache):
                if len(self._cache) <= keep:
                    break
                if self._cache[key] not in self._pins:
                    fd = self._cache.pop(key)
                    del self._creations[fd]
                    os.close(fd)
            self._trim_at = len(self._cache) + keep  # what is pinned now: not rescanned each call

    def close(self) -> None:
        with self._lock:
            for fd in self._cache.values():
                os.close(fd)
            self._cache.clear()
            self._creations.clear()


@dataclass(slots=True, eq=False)
class _Pending:
    """A file being restored under a temporary name.

    The first piece written creates the temporary; whoever accounts for the
    last piece (written, or given up on) finishes the file.
    """

    entry: ManifestEntry
    parts: list[bytes]
    dir_fd: int
    """Borrowed from the directory cache, pinned there until the file is finished."""
    temp: bytes
    remaining: int
    """Pieces not yet written or given up on."""
    fd: int = -1
    """The temporary, once created."""
    failed: str | None = None
    digest: str | None = None
    """xxh3-128 of the content when one piece is the whole file."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    hasher: _InOrderHash | None = None
    """Hashes the pieces in file order; None when one piece is the whole file."""
    direct_fd: int | None = None
    """The same file opened with O_DIRECT, for its aligned pieces."""
    unnamed: bool = False
    """Created without a name (``O_TMPFILE``); ``temp`` is used only to replace a file."""

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = -1
        self.direct_fd = None


class _Small(NamedTuple):
    """A file on the short path: one piece of one chunk, written once, verified first.

    The manifest reader checks its record (``_Restore.short_path``) without
    decoding it into a ``ManifestEntry``; the fetch worker that holds its
    chunk checks its xxh3-128 in memory, then creates it unnamed, writes it,
    gives it its metadata and names it (``_Restore.write_small``). Anything
    out of the ordinary takes the general path, which decodes the record.
    """

    key: tuple[str, int]
    """The chunk holding the file's bytes: (data object, chunk index)."""
    chunk_offset: int
    length: int
    xxh3: str
    mode: int
    mtime_ns: int
    owner: tuple[int, int] | None
    """The ids to give it (by name where this system knows the name); None: leave them."""
    dir_fd: int
    creation: _Creation
    """What a new file in its directory gets unasked."""
    parts: list[bytes]
    record: dict[str, Any]


class _InOrderHash:
    """xxh3-128 of a file whose pieces are written in any order.

    Pieces are hashed in file order as soon as every piece before them is
    in, the holes between them as the zeros they read as; a piece that comes
    early waits in memory (with the chunk it is part of). A fetch is started
    no more than ``window`` bytes past the hashed prefix (``wait_turn``)
    while earlier fetches are still running, which keeps that memory to
    about the window per large file. The digest is of exactly the bytes
    written, so the file is never read back.
    """

    def __init__(self, offsets: list[int], size: int, window: int) -> None:
        import xxhash

        self._h = xxhash.xxh3_128()
        self._offsets = sorted(offsets)
        self._next = 0
        self._pos = 0
        self._size = size
        self._early: dict[int, memoryview] = {}
        self._window = window
        self._broken = False
        self._cond = threading.Condition()

    def wait_turn(self, offset: int, busy: Callable[[], bool], check: Callable[[], None]) -> None:
        """Wait while ``offset`` is past the window and earlier fetches are still running."""
        with self._cond:
            while not self._broken and offset - self._pos > self._window and busy():
                check()
                self._cond.wait(0.05)

    def add(self, offset: int, piece: memoryview) -> None:
        """Hash ``piece`` (at ``offset``) in its turn: at once, or kept until then, as a
        copy if its memory is a reused buffer (written again by the next chunk)."""
        with self._cond:
            if self._broken:
                return
            early, offsets = self._early, self._offsets
            turn = self._next < len(offsets) and offsets[self._next] == offset
            keep = turn or isinstance(piece.obj, bytes)
            early[offset] = piece if keep else memoryview(bytes(piece))
            while self._next < len(offsets) and offsets[self._next] in early:
                start = offsets[self._next]
                if start < self._pos:  # overlapping pieces: no file holds both
                    self._break()
                    return
                hash_zeros(self._h, start - self._pos)
                data = early.pop(start)
                self._h.update(data)
                self._pos = start + len(data)
                self._next += 1
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._break()

    def _break(self) -> None:
        self._broken = True
        self._early.clear()
        self._cond.notify_all()

    def hexdigest(self) -> str | None:
        """The file's digest; None if a piece is missing or lies past its size."""
        with self._cond:
            if self._broken or self._next < len(self._offsets) or self._pos > self._size:
                return None
            hash_zeros(self._h, self._size - self._pos)
            self._pos = self._size
            return str(self._h.hexdigest())


class _Restore:
    def __init__(
        self,
        backend: Any,
        job_id: str,
        options: RestoreOptions,
        on_event: EventSink,
        member: int = 0,
        temp_prefix: bytes | None = None,
        fresh: bool | None = None,
    ) -> None:
        self.options = options
        self.on_event = on_event
        self.backend = RetryingBackend(backend, options.retry, on_event)
        self.job_id = job_id
        self.reader = JobReader(self.backend, job_id)
        self.coordinator = Coordinator()
        self.failures: list[FileWarning] = []
        self.files = 0
        self.entries = 0
        self.skipped = 0
        self.bytes_written = 0
        self.bytes_kept = 0
        self.files_total: int | None = None
        self.bytes_total: int | None = None
        self._lock = threading.Lock()
        self.dirs_meta: list[tuple[list[bytes], ManifestEntry]] = []
        self.hardlinks: list[tuple[list[bytes], ManifestEntry]] = []
        os.makedirs(options.target, exist_ok=True)
        self.root_fd = os.open(options.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs = _Dirs(self.root_fd)
        self.dirs.all_fresh = _target_is_empty(options.target) if fresh is None else fresh
        self._direct = hasattr(os, "O_DIRECT")
        """Whether large files are written around the page cache (until the file system refuses)."""
        self._temp_names = itertools.count(member << 28)  # distinct names in every process
        self._member = member
        self._temp_prefix = temp_prefix or _TEMP_PREFIX + secrets.token_hex(4).encode()
        probe = b"%s%08x.tmp" % (self._temp_prefix, (member << 28) | 0xFFFFFFF)  # not a counter's
        self._unnamed = _can_name_unnamed_files(self.root_fd, probe)
        """Whether small files are created without a name (until the file system refuses)."""
        self._by_descriptor = True
        """Whether unnamed files are named by descriptor (until the system refuses)."""
        self.owners = _Owners()
        self.helpers: dict[int, _Counts] = {}
        """What each helper process has done so far (see ``_Counts``)."""
        self.shared = False
        """Helper processes restore part of the job (this is the first process)."""
        self.file_dirs: set[bytes] = set()
        """When shared: every directory where a helper named a temporary (``_TempDir``)."""
        self._temp_dirs: set[bytes] = set()
        """In a helper: the directories it said it names temporaries in."""
        self.tell_first: Send | None = None
        """In a helper: its channel to the first process."""
        self._open_files: set[_Pending] = set()
        """Files whose temporary exists and is not finished yet."""
        self.reconfigure(options)

    def reconfigure(self, options: RestoreOptions) -> None:
        """Take ``options`` (their connections above all); only before the first fetch."""
        self.options = options
        connections = options.connections or DEFAULT_CONNECTIONS
        self._writers = threading.Semaphore(min(connections, len(os.sched_getaffinity(0))))
        """Workers writing files at once: one per CPU (more only add hand-offs of the GIL)."""
        self.pool = BoundedExecutor(connections, connections * 2, self.coordinator, "fetch")

    def fail(self, path: bytes, message: str) -> None:
        w = FileWarning(path.decode("utf-8", "backslashreplace"), message)
        with self._lock:
            self.failures.append(w)
        self.on_event(w)

    def counts(self) -> _Counts:
        """This process's work so far, and its helpers'."""
        with self._lock:
            own = _Counts(
                self.files, self.entries, self.skipped, self.bytes_written, self.bytes_kept,
                self.backend.retries,
            )  # fmt: skip
            return _Counts(*map(sum, zip(own, *self.helpers.values(), strict=True)))

    def progress(self) -> Progress:
        c = self.counts()
        return Progress(
            "restore",
            c.files,
            c.bytes_written,
            c.bytes_written,
            bytes_done=c.bytes_written + c.bytes_kept,
            files_total=self.files_total,
            bytes_total=self.bytes_total,
        )

    # -- selection -----------------------------------------------------------------
    def selected(self, path: bytes, kind: str) -> bool:
        """Whether the entry at ``path`` (of type ``kind``) is one the options select."""
        o = self.options
        if o.includes and not (
            _matches(path, o.includes) or (kind == "d" and _is_parent_of_included(path, o.includes))
        ):
            return False
        return not (o.excludes and _matches(path, o.excludes))

    # -- existing entries --------------------------------------------------------------
    def _existing(self, dir_fd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _keep_existing(self, dir_fd: int, name: bytes, entry: ManifestEntry) -> bool:
        """True when the existing entry stays (per overwrite policy)."""
        st = self._existing(dir_fd, name)
        if st is None:
            return False
        policy = self.options.overwrite or "never"
        if policy == "never":
            return True
        if policy == "always":
            return False
        if entry.kind != "f" or not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            return False
        return _xxh3_of(name, dir_fd) == entry.xxh3

    # -- entries without data ------------------------------------------------------------
    def place_simple(self, parts: list[bytes], entry: ManifestEntry) -> None:
        dir_fd = self.dirs.open(parts[:-1], create=True)
        name = parts[-1]
        if entry.kind == "d":
            st = self._existing(dir_fd, name)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                if (self.options.overwrite or "never") != "always":
                    with self._lock:  # (workers count too)
                        self.skipped += 1
                    return
                os.unlink(name, dir_fd=dir_fd)
                st = None
            if st is None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                    with self._lock:
                        self.dirs.fresh.add(b"/".join(parts))
            elif not self.dirs.all_fresh:  # (a helper process may have made it)
                _sweep_temporaries(self.dirs.open(parts, create=False), self._temp_prefix)
            self.dirs_meta.append((parts, entry))
            return
        # In a directory this restore made, nothing is in the way (as for files).
        if not self.dirs.is_fresh(parts[:-1]) and self._keep_existing(dir_fd, name, entry):
            with self._lock:
                self.skipped += 1
            return
        temp = self._temp_name()
        if entry.kind == "l":
            assert entry.target is not None
            os.symlink(entry.target, temp, dir_fd=dir_fd)
        elif entry.kind == "p":
            os.mkfifo(temp, entry.mode, dir_fd=dir_fd)
        elif entry.kind in ("c", "b", "s"):
            kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "s": stat.S_IFSOCK}[entry.kind]
            try:
                os.mknod(temp, kind | entry.mode, entry.rdev, dir_fd=dir_fd)
            except PermissionError:
                self.fail(entry.path, "cannot create a device node without privileges")
                return
        else:
            self.fail(entry.path, f"unknown entry type {entry.kind!r}")
            return
        self._finish(dir_fd, temp, name, entry, fd=None)

    def _finish(
        self,
        dir_fd: int,
        temp: bytes,
        name: bytes,
        entry: ManifestEntry,
        fd: int | None,
        unnamed: bool = False,
    ) -> bool:
        """Metadata, then into place: ``temp`` renamed, or the ``unnamed`` file ``fd`` linked.

        Returns whether it took its name (not when the policy kept what was there, or a
        directory is in the way).
        """
        is_link = entry.kind == "l"
        if self.options.owners:
            uid, gid = self.owners.of_entry(entry)
            with contextlib.suppress(OSError):
                if fd is not None:
                    os.fchown(fd, uid, gid)
                else:
                    os.chown(temp, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if not is_link:
            # Extended attributes before the mode: a read-only file takes none from an
            # unprivileged process.
            for k, v in entry.xattrs.items():
                with contextlib.suppress(OSError):
                    if fd is not None:
                        os.setxattr(fd, k, v)
                    else:
                        os.setxattr(_proc_path(dir_fd, temp), k, v, follow_symlinks=False)
            if fd is not None:
                os.fchmod(fd, entry.mode)
            else:
                os.chmod(temp, entry.mode, dir_fd=dir_fd)
        times = (entry.mtime_ns, entry.mtime_ns)
        if fd is not None:
            os.utime(fd, ns=times)
        else:
            os.utime(temp, ns=times, dir_fd=dir_fd, follow_symlinks=False)
        if unnamed:
            assert fd is not None
            try:  # its first name: nothing of it was ever visible before
                self._link_unnamed(fd, dir_fd, name)
                with self._lock:
                    self.entries += 1
                return True
            except FileExistsError:  # something took the name since it was looked at
                if self.options.overwrite == "never":
                    with self._lock:
                        self.skipped += 1
                    return False
                self._naming_temporary_in(entry.path)
                self._link_unnamed(fd, dir_fd, temp)  # replaced as a temporary would
            except OSError:  # naming it refused here (a sandbox's /proc): a named copy instead
                self._unnamed = False
                self._naming_temporary_in(entry.path)
                self._name_copy(fd, dir_fd, temp)
        try:
            if not self._place_temporary(dir_fd, temp, name):
                return False
        except IsADirectoryError:
            os.unlink(temp, dir_fd=dir_fd)
            self.fail(entry.path, "a directory is in the way; not replaced")
            return False
        with self._lock:
            self.entries += 1
        return True

    def _place_temporary(self, dir_fd: int, temp: bytes, name: bytes) -> bool:
        """Give the temporary ``temp`` its final ``name``; False when ``never`` keeps what
        took the name since it was looked at (``temp`` is then removed, and counted as
        skipped).

        Under ``never`` the name is taken with a hard link, which fails where the name
        exists, as a rename would not; a file system without hard links gets the rename.
        """
        if self.options.overwrite == "never":
            try:
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                os.unlink(temp, dir_fd=dir_fd)
                with self._lock:
                    self.skipped += 1
                return False
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
            else:
                os.unlink(temp, dir_fd=dir_fd)
                return True
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True

    def _link_unnamed(self, fd: int, dir_fd: int, name: bytes) -> None:
        """Give the unnamed file ``fd`` the name ``name`` in ``dir_fd``."""
        if self._by_descriptor:
            if _link_by_descriptor(fd, dir_fd, name):
                return
            self._by_descriptor = False  # not allowed here: by its /proc path from now on
        os.link(_fd_path(fd), name, dst_dir_fd=dir_fd)

    def _name_copy(self, fd: int, dir_fd: int, temp: bytes) -> None:
        """Copy the unnamed file ``fd`` (small, finished) to the temporary ``temp``."""
        st = os.fstat(fd)
        out = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=dir_fd,
        )  # fmt: skip
        try:
            os.ftruncate(out, st.st_size)  # holes stay holes
            pos = 0
            while pos < st.st_size:
                data = os.pread(fd, min(1 << 20, st.st_size - pos), pos)
                if not data:
                    break
                if data.count(0) != len(data):
                    os.pwrite(out, data, pos)
                pos += len(data)
            if self.options.owners:
                with contextlib.suppress(OSError):
                    os.fchown(out, st.st_uid, st.st_gid)
            for k in os.listxattr(fd):
                with contextlib.suppress(OSError):
                    os.setxattr(out, k, os.getxattr(fd, k))
            os.fchmod(out, stat.S_IMODE(st.st_mode))
            os.utime(out, ns=(st.st_mtime_ns, st.st_mtime_ns))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            raise
        finally:
            os.close(out)

    # -- files -----------------------------------------------------------------------
    def _temp_name(self) -> bytes:
        """A name no other temporary of this restore has (a run's prefix and a counter)."""
        return b"%s%08x.tmp" % (self._temp_prefix, next(self._temp_names))

    def short_path(self, record: dict[str, Any], path: bytes) -> _Small | None:
        """The file of ``record`` at ``path``, if it can take the short path (``_Small``).

        That is a file smaller than ``DIRECT_MIN_SIZE`` whose one extent is
        all of it, without extended attributes, in a directory this restore
        made, on a file system that creates unnamed files; and a record whose
        every field has its type and lies in the range ``check_entry`` asks
        for. None sends it the general way (which reports what is wrong).
        Runs in the manifest reader's thread, as ``add_file`` does.
        """
        if not self._unnamed:
            return None
        get = record.get
        size, extents = get("s"), get("d")
        if type(size) is not int or not 0 < size < DIRECT_MIN_SIZE:
            return None
        if type(extents) is not list or len(extents) != 1 or not _SHORT_KEYS.issuperset(record):
            return None
        extent = extents[0]
        if type(extent) is not list or len(extent) != 5:
            return None
        file_offset, name, index, offset, length = extent
        if file_offset != 0 or length != size or type(name) is not str:
            return None
        mode, mtime, uid, gid = get("m", 0), get("mt", 0), get("u", 0), get("g", 0)
        user, group, xx, rdev = get("un"), get("gn"), get("xx"), get("rd", 0)
        types = {type(file_offset), type(index), type(offset), type(length), type(mode)}
        types.update((type(mtime), type(uid), type(gid), type(rdev)))
        types.update((type(get("ct", 0)), type(get("ino", 0)), type(get("dev", 0))))
        if not (
            types == _INT_ONLY  # (not a bool, not a float)
            and index >= 0
            and offset >= 0
            and 0 <= mode <= 0o7777
            and 0 <= uid <= _MAX_ID
            and 0 <= gid <= _MAX_ID
            and -_MAX_OFFSET <= mtime <= _MAX_OFFSET
            and rdev == 0
            and type(xx) is str
            and (user is None or type(user) is str)
            and (group is None or type(group) is str)
        ):
            return None
        try:
            parts = check_path(path)
        except UnsafePath:
            return None
        if max(map(len, parts)) > _NAME_MAX:
            return None
        dir_parts = parts[:-1]
        dir_fd = self.dirs.open(dir_parts, create=True)
        if not self.dirs.is_fresh(dir_parts):
            return None  # something may be in the way: the overwrite policy decides
        owner = self.owners.of(user, uid, group, gid) if self.options.owners else None
        self.dirs.pin(dir_fd)  # until its chunk is written (``fetch``)
        return _Small(
            (name, index), offset, length, xx, mode, mtime, owner,
            dir_fd, self.dirs.creation(dir_fd), parts, record,
        )  # fmt: skip

    def write_small(self, data: bytes | memoryview, smalls: list[_Small]) -> None:
        """Write the files of ``smalls`` from ``data``, the chunk that holds them.

        Each is checked in memory, then created unnamed, written, given its
        owner, mode and times, and named. One that fails its check, or meets
        anything unusual (its name taken, unnamed files refused), goes on the
        general path, which copes or reports it.
        """
        from xxhash import xxh3_128_hexdigest

        view = memoryview(data)
        files = written = 0
        flags = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC
        check = self.coordinator.check
        for s in smalls:
            check()  # (another worker's fatal error: nothing more is named)
            piece = view[s.chunk_offset : s.chunk_offset + s.length]
            if not self._unnamed or len(piece) != s.length or xxh3_128_hexdigest(piece) != s.xxh3:
                written += self._long_path(s, piece)
                continue
            created = s.creation
            # Created with its mode where that comes out as asked (a special bit never:
            # a write may clear it); looked at the first time a mode is asked for here.
            exact = created.modes.get(s.mode) if s.mode <= 0o777 else False
            try:
                fd = os.open(b".", flags, 0o600 if exact is False else s.mode, dir_fd=s.dir_fd)
            except OSError:
                written += self._long_path(s, piece)  # (which says why, or copes)
                continue
            try:
                _pwrite_all(fd, piece, 0)
                if exact is None:
                    exact = created.see(os.fstat(fd), s.mode)
                if s.owner is not None and s.owner != created.owner:
                    with contextlib.suppress(OSError):
                        os.fchown(fd, *s.owner)
                if not exact:
                    os.fchmod(fd, s.mode)
                os.utime(fd, ns=(s.mtime_ns, s.mtime_ns))
                try:
                    self._link_unnamed(fd, s.dir_fd, s.parts[-1])
                except OSError:  # the name is taken, or naming refused: the general way
                    p = self._pending_of(s, remaining=0, fd=fd, digest=s.xxh3, unnamed=True)
                    fd = -1  # (the pending file's now)
                    self.finish_file(p)
                    written += s.length
                    continue
            finally:
                if fd >= 0:
                    os.close(fd)
            files += 1
            written += s.length
        with self._lock:
            self.files += files
            self.entries += files
            self.bytes_written += written

    def _pending_of(self, s: _Small, **fields: Any) -> _Pending:
        """``s`` as a file of the general path: its record decoded, its directory pinned
        once more (``_release`` gives that back)."""
        entry = ManifestEntry.from_json(s.record, ("f", b"/".join(s.parts)))
        p = _Pending(entry, s.parts, s.dir_fd, self._temp_name(), **fields)
        self.dirs.pin(s.dir_fd)
        return p

    def _long_path(self, s: _Small, piece: memoryview) -> int:
        """``s`` the general way, from its ``piece`` of the chunk; returns the bytes written."""
        p = self._pending_of(s, remaining=1)
        written = 0
        if len(piece) != s.length:
            with p.lock:
                name, index = s.key
                self._give_up(p, f"chunk {index} of {name!r} is shorter than its extent")
        else:
            written = self._write_whole(p, piece)
        self._account(p)
        return written

    def small_failed(self, s: _Small, why: str) -> None:
        """``s`` cannot be restored (its chunk is corrupt): reported, as the general path does."""
        self.fail(b"/".join(s.parts), f"not restored: {why}")

    def add_file(self, parts: list[bytes], entry: ManifestEntry) -> _Pending | None:
        """A file to restore; None when there is nothing to fetch for it.

        Runs in the thread that reads the manifest: the file's directory, the
        overwrite policy, and files without data (empty, or all holes), which
        are finished at once. The fetch workers create and finish the others.
        """
        dir_fd = self.dirs.open(parts[:-1], create=True)
        if not self.dirs.is_fresh(parts[:-1]) and self._keep_existing(dir_fd, parts[-1], entry):
            with self._lock:
                self.skipped += 1
                self.bytes_kept += entry.size
            return None
        self.dirs.pin(dir_fd)
        p = _Pending(entry, parts, dir_fd, self._temp_name(), remaining=len(entry.extents))
        if not (len(entry.extents) == 1 and _written_whole(entry)):
            p.hasher = _InOrderHash([e.file_offset for e in entry.extents], entry.size, HASH_WINDOW)
        if entry.extents:
            return p
        with p.lock:
            self._create(p)
        self.finish_file(p)
        return None

    def _create(self, p: _Pending) -> None:
        """Create ``p``'s temporary (sized, when it has holes); call with ``p.lock`` held.

        A file smaller than ``DIRECT_MIN_SIZE`` is created without a name
        (``O_TMPFILE``) where the file system can: it gets its one name once
        finished (``linkat``), one directory update instead of a create and a
        rename, and nothing is left behind if the restore is killed.
        """
        fd = -1
        if self._unnamed and p.entry.size < DIRECT_MIN_SIZE:
            try:
                fd = os.open(b".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=p.dir_fd)
                p.unnamed = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._unnamed = False  # this file system names every file it creates
        if fd < 0:
            self._naming_temporary_in(p.entry.path)
            fd = os.open(
                p.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                dir_fd=p.dir_fd,
            )  # fmt: skip
        p.fd = fd
        with self._lock:
            self._open_files.add(p)
        size = p.entry.size
        if not _written_whole(p.entry):
            try:
                os.ftruncate(fd, size)  # holes stay holes; a size too large fails here
            except OSError as exc:
                if exc.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                self._give_up(p, f"{exc.strerror} ({size} bytes)")
                return
        if self._direct and size >= DIRECT_MIN_SIZE and p.entry.extents:
            p.direct_fd = self._open_direct(p.temp, p.dir_fd)
            if p.direct_fd is not None and sum(e.length for e in p.entry.extents) == size:
                preallocate(fd, size)  # a file without holes: its pieces written side by side

    def _naming_temporary_in(self, path: bytes) -> None:
        """Before a helper names a temporary beside ``path``: the first process learns of the
        directory (``_TempDir``), and sweeps it should this helper die."""
        if self.tell_first is None:
            return
        parent = path.rpartition(b"/")[0]
        with self._lock:
            if parent in self._temp_dirs:
                return
            self._temp_dirs.add(parent)
        self.tell_first(_TempDir(parent))  # sent (written to the pipe) before the name exists

    def _open_direct(self, temp: bytes, dir_fd: int) -> int | None:
        """The temporary again, for direct writes; None writes it through the page cache."""
        try:
            return os.open(
                temp, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            if refused(exc):
                self._direct = False  # this file system writes through the page cache only
            return None  # any other failure (no descriptor left...): this file only

    def _give_up(self, p: _Pending, why: str) -> None:
        """Mark ``p`` as not restorable (the first reason stays)."""
        if p.failed is None:
            p.failed = why
        if p.hasher is not None:
            p.hasher.fail()

    def _account(self, p: _Pending) -> None:
        """One more of ``p``'s pieces is written or given up on; the last finishes it."""
        with p.lock:
            p.remaining -= 1
            last = p.remaining == 0
        if last:
            self.finish_file(p)

    def finish_file(self, p: _Pending) -> None:
        """Verify, then metadata and the final name; or report the file and remove it."""
        try:
            if p.failed is None:
                digest = p.hasher.hexdigest() if p.hasher is not None else p.digest
                if digest != p.entry.xxh3:
                    p.failed = "content does not match its xxh3-128 checksum"
            if p.failed is not None:
                self.fail(p.entry.path, f"not restored: {p.failed}")
                if p.fd >= 0 and not p.unnamed:
                    os.unlink(p.temp, dir_fd=p.dir_fd)
                return
            if self._finish(p.dir_fd, p.temp, p.parts[-1], p.entry, p.fd, p.unnamed):
                with self._lock:
                    self.files += 1
        except BaseException:
            if p.fd >= 0:  # (the temporary name, if an unnamed file got one to replace a file)
                with contextlib.suppress(OSError):
                    os.unlink(p.temp, dir_fd=p.dir_fd)
            raise
        finally:
            self._release(p)

    def _release(self, p: _Pending) -> None:
        p.close()
        with self._lock:
            self._open_files.discard(p)
        self.dirs.unpin(p.dir_fd)

    def fetch(
        self,
        key: tuple[str, int],
        users: list[tuple[_Pending, int, int, int]],
        smalls: list[_Small],
    ) -> None:
        """Fetch one chunk and write its slices into every file that needs it."""
        try:
            self._fetch(key, users, smalls)
        finally:
            if smalls:
                self.dirs.unpin_all([s.dir_fd for s in smalls])

    def _fetch(
        self,
        key: tuple[str, int],
        users: list[tuple[_Pending, int, int, int]],
        smalls: list[_Small],
    ) -> None:
        self.coordinator.check()
        # A chunk of a large file is decoded into a reused page-aligned buffer: its piece
        # goes to the disk from there (direct I/O) without a copy. (Small files' chunks
        # gain nothing from it: buffers of their size then only add to the memory held.)
        if not any(p.entry.size >= DIRECT_MIN_SIZE for p, *_ in users):
            self._fetch_into(key, users, smalls, None)
            return
        # Sized from the extents, which are untrusted: no real chunk is larger than the
        # largest stored one (a longer extent is reported as such, for its file only).
        buf = BUFFERS.take(min(max(c + n for _, _, c, n in users), MAX_CHUNK_BYTES))
        try:
            self._fetch_into(key, users, smalls, buf)
        finally:
            BUFFERS.give(buf)

    def _fetch_into(
        self,
        key: tuple[str, int],
        users: list[tuple[_Pending, int, int, int]],
        smalls: list[_Small],
        buf: Any,
    ) -> None:
        name, index = key
        try:
            try:
                data = self.reader.chunk_view(name, index, buf)
            except CorruptData:
                data = self.reader.chunk_view(name, index, buf)  # a second fetch: transient faults
        except CorruptData as exc:
            for p, *_ in users:
                with p.lock:
                    self._give_up(p, str(exc))
                self._account(p)
            for s in smalls:
                self.small_failed(s, str(exc))
            return
        written = 0
        # Many files from one chunk: per-file system calls, one writer per CPU. One
        # piece of one file: a large write that keeps the disk busy, not the GIL.
        with self._writers if len(users) + len(smalls) > 1 else contextlib.nullcontext():
            for p, file_offset, chunk_offset, length in users:
                piece = memoryview(data)[chunk_offset : chunk_offset + length]
                if len(piece) != length:
                    with p.lock:
                        self._give_up(p, f"chunk {index} of {name!r} is shorter than its extent")
                elif p.hasher is None:
                    written += self._write_whole(p, piece)
                else:
                    written += self._write_piece(p, piece, file_offset)
                self._account(p)
            if smalls:
                self.write_small(data, smalls)
        with self._lock:
            self.bytes_written += written

    def _write_whole(self, p: _Pending, piece: memoryview) -> int:
        """A file that is one piece: checked in memory first, so a bad one is never created.

        Returns the bytes written.
        """
        import xxhash

        p.digest = xxhash.xxh3_128_hexdigest(piece)
        if p.digest != p.entry.xxh3:
            return 0  # finish_file reports it
        with p.lock:
            self._create(p)
        self._write(p, piece, 0)
        return len(piece)

    def _write_piece(self, p: _Pending, piece: memoryview, offset: int) -> int:
        """One piece of a file of several (or with holes); returns the bytes written."""
        assert p.hasher is not None
        with p.lock:
            if p.fd < 0 and p.failed is None:
                self._create(p)
            if p.failed is not None:
                return 0
        self._write(p, piece, offset)
        p.hasher.add(offset, piece)
        return len(piece)

    def _write(self, p: _Pending, piece: memoryview, offset: int) -> None:
        """Write ``piece`` at ``offset``: its aligned part around the page cache if possible."""
        if p.direct_fd is not None and offset % ALIGN == 0:
            n = len(piece) - len(piece) % ALIGN
            done = 0
            if n:
                try:
                    done = pwrite_direct(p.direct_fd, piece[:n], offset)
                except OSError as exc:
                    if not refused(exc):
                        raise
                    self._direct = False
            piece, offset = piece[done:], offset + done
        _pwrite_all(p.fd, piece, offset)

    def submit(self, batch: list[_Pending], smalls: list[_Small] | None = None) -> None:
        """Queue the fetches of ``batch``'s and ``smalls``' chunks, each chunk once for all
        its files."""
        by_chunk: dict[tuple[str, int], list[tuple[_Pending, int, int, int]]] = defaultdict(list)
        for p in batch:
            for e in p.entry.extents:
                by_chunk[(e.object_name, e.chunk_index)].append(
                    (p, e.file_offset, e.chunk_offset, e.length)
                )
        small_by_chunk: dict[tuple[str, int], list[_Small]] = defaultdict(list)
        for s in smalls or ():
            small_by_chunk[s.key].append(s)
        pool, check = self.pool, self.coordinator.check
        for key, users in by_chunk.items():
            for p, file_offset, _, _ in users:
                if p.hasher is not None:
                    p.hasher.wait_turn(file_offset, pool.busy, check)
            pool.submit(self.fetch, key, users, small_by_chunk.pop(key, []))
        for key, group in small_by_chunk.items():
            pool.submit(self.fetch, key, [], group)

    def drain(self) -> None:
        """Wait for every fetch; re-raise the first fatal error."""
        self.pool.shutdown(wait=True)
        self.coordinator.raise_if_failed()

    def give_up(self, exc: BaseException) -> BaseException:
        """After ``exc`` stopped the restore: clean up, and return what really stopped it.

        A ``Cancelled`` is only a worker noticing the failure: the worker's own
        error (the first fatal one) is the cause.
        """
        with contextlib.suppress(OSError):  # cleaning up must not hide why it stopped
            self.abandon(exc)
        if isinstance(exc, Cancelled) and self.coordinator.error is not None:
            return self.coordinator.error
        return exc

    def abandon(self, exc: BaseException) -> None:
        """Stop the fetches and remove every temporary still open (after a fatal error)."""
        self.coordinator.fail(exc)
        self.pool.shutdown(wait=True)
        for p in list(self._open_files):
            if not p.unnamed:
                with contextlib.suppress(OSError):
                    os.unlink(p.temp, dir_fd=p.dir_fd)
            self._release(p)
        self.remove_own_temporaries()

    def link(self, parts: list[bytes], entry: ManifestEntry) -> None:
        if entry.target is None:
            self.fail(entry.path, "not restored: the hard link names no target")
            return
        try:
            target_parts = check_path(entry.target)
        except UnsafePath as exc:
            self.fail(entry.path, str(exc))
            return
        try:
            src_dir = self.dirs.open(target_parts[:-1], create=False)
        except FileNotFoundError:  # e.g. left out by --include / --exclude
            self.fail(entry.path, "not restored: its hard link target was not restored")
            return
        dir_fd = self.dirs.open(parts[:-1], create=True)
        if self._keep_existing(dir_fd, parts[-1], entry):
            with self._lock:
                self.skipped += 1
            return
        temp = self._temp_name()
        try:
            os.link(
                target_parts[-1], temp, src_dir_fd=src_dir, dst_dir_fd=dir_fd,
                follow_symlinks=False,
            )  # fmt: skip
        except FileNotFoundError:
            self.fail(entry.path, "not restored: its hard link target was not restored")
            return
        except OSError as exc:  # e.g. the target is a directory
            self.fail(entry.path, f"not restored: cannot link to its target: {exc.strerror}")
            return
        try:
            if not self._place_temporary(dir_fd, temp, parts[-1]):
                return
        except IsADirectoryError:
            os.unlink(temp, dir_fd=dir_fd)
            self.fail(entry.path, "a directory is in the way; not replaced")
            return
        # rename() does nothing when both names are links to one inode (an earlier restore's).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        with self._lock:
            self.entries += 1

    def finish_dirs(self) -> None:
        for parts, entry in sorted(self.dirs_meta, key=lambda d: len(d[0]), reverse=True):
            fd = self.dirs.open(parts, create=True)
            if self.options.owners:
                uid, gid = self.owners.of_entry(entry)
                with contextlib.suppress(OSError):
                    os.fchown(fd, uid, gid)
            for k, v in entry.xattrs.items():  # before the mode, as for files
                with contextlib.suppress(OSError):
                    os.setxattr(fd, k, v)
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            with self._lock:
                self.entries += 1

    def remove_own_temporaries(self) -> None:
        """Unlink this process's temporaries: an interrupted run leaves none behind.

        A temporary lives only in a directory that is open at that moment (a
        file in flight pins its directory's descriptor in the cache). The first
        process of a shared restore, once its helpers are gone, removes the
        whole run's, wherever they are (a helper may have been killed): in
        every directory a helper said it names temporaries in (``_TempDir``).
        """
        prefix = os.fsdecode(self._temp_prefix)
        if self.shared:  # helpers' temporaries may sit where this process never looked
            for d in self.file_dirs:
                try:
                    fd = self.dirs.open(check_path(d) if d else [], create=False)
                    _remove_prefixed(fd, prefix)
                except (OSError, UnsafePath):
                    continue  # never made, or not a directory of this restore's
                self.dirs.trim()
        else:
            prefix += f"{self._member:x}"  # this process's own, not another member's
        for fd in [self.root_fd, *self.dirs.cached()]:
            _remove_prefixed(fd, prefix)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.dirs.close()
        os.close(self.root_fd)


def _written_whole(entry: ManifestEntry) -> bool:
    """Whether one write of one extent makes the whole file (or it is empty)."""
    extents = entry.extents
    if not extents:
        return entry.size == 0
    return len(extents) == 1 and extents[0].file_offset == 0 and extents[0].length == entry.size


_INT_ONLY = frozenset({int})
"""The types of a record's integer fields, all of them (a bool or a float is not one)."""

_SHORT_KEYS = frozenset(("p", "pb", "t", "m", "u", "g", "un", "gn", "mt", "ct", "ino", "dev", "s",
                         "rd", "d", "xx", "w"))  # fmt: skip
"""The fields a record on the short path may have: no extended attributes (``x``), no link
target (``l``, ``lb``), nothing ``ManifestEntry.from_json`` could still refuse."""


def _pwrite_all(fd: int, piece: memoryview, offset: int) -> None:
    """Write all of ``piece`` at ``offset`` (a short write is continued)."""
    while piece:
        n = os.pwrite(fd, piece, offset)
        if n == 0:
            raise OSError(errno.EIO, "the file system wrote nothing")
        piece, offset = piece[n:], offset + n


def _remove_prefixed(dir_fd: int, prefix: str) -> None:
    with os.scandir(dir_fd) as it:
        names = [d.name for d in it if d.name.startswith(prefix)]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _sweep_temporaries(dir_fd: int, own_prefix: bytes) -> None:
    """Remove files an interrupted restore left under temporary names (not this run's)."""
    with os.scandir(dir_fd) as it:
        names = [os.fsencode(d.name) for d in it if d.is_file(follow_symlinks=False)]
    for name in names:
        if _TEMP_RE.match(name) and not name.startswith(own_prefix):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)


def _proc_path(dir_fd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/" % dir_fd + name


def _can_name_unnamed_files(dir_fd: int, probe: bytes) -> bool:
    """Whether ``dir_fd`` takes unnamed files (``O_TMPFILE``) that ``linkat`` can name.

    Tried once, with an unnamed file linked as ``probe`` and unlinked again.
    """
    if not hasattr(os, "O_TMPFILE"):
        return False
    try:
        fd = os.open(b".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if not _link_by_descriptor(fd, dir_fd, probe):
            os.link(_fd_path(fd), probe, dst_dir_fd=dir_fd)
        os.unlink(probe, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_AT_EMPTY_PATH = 0x1000
_linkat: Any = None
"""libc's ``linkat`` once looked up (``(ctypes, function)``); False where there is none."""


def _link_by_descriptor(fd: int, dir_fd: int, name: bytes) -> bool:
    """Name the unnamed file ``fd`` ``name`` in ``dir_fd``: ``linkat`` with ``AT_EMPTY_PATH``.

    It takes about a third less system time than a link from the file's
    /proc path, which the kernel must resolve first. False where it is not
    allowed (most kernels ask for ``CAP_DAC_READ_SEARCH``, which root has);
    any other failure raises, as ``os.link`` would.
    """
    global _linkat
    if _linkat is None:
        _linkat = _load_linkat()  # (two threads may both look it up: the same result)
    if _linkat is False:
        return False
    ctypes, fn = _linkat
    while fn(fd, b"", dir_fd, name, _AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.EPERM, errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EACCES):
            return False
        raise OSError(err, os.strerror(err), os.fsdecode(name))
    return True


def _load_linkat() -> Any:
    """libc's ``linkat`` with its argument types (``(ctypes, function)``); False if none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).linkat
    except (ImportError, OSError, AttributeError):  # (a Python built without ctypes)
        return False
    c_int, c_path = ctypes.c_int, ctypes.c_char_p
    fn.argtypes = [c_int, c_path, c_int, c_path, c_int]
    return (ctypes, fn)


def _fd_path(fd: int) -> bytes:
    """The file open as ``fd``, through /proc (how an unnamed file is given a name)."""
    return b"/proc/self/fd/%d" % fd


class _Owners:
    """Local ids for an entry's owner: by name where this system knows the name (a
    user or group that is not a string, or holds a NUL byte, is no name here), else
    the numeric ids. Each distinct owner is looked up once per restore."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str | None, int, str | None, int], tuple[int, int]] = {}

    def of(self, user: str | None, uid: int, group: str | None, gid: int) -> tuple[int, int]:
        key = (user, uid, group, gid)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = (_id_by_name("u", user, uid), _id_by_name("g", group, gid))
        return ids

    def of_entry(self, entry: ManifestEntry) -> tuple[int, int]:
        return self.of(entry.user, entry.uid, entry.group, entry.gid)


def _id_by_name(kind: str, name: object, fallback: int) -> int:
    """The local id of a user (``kind`` "u") or group ("g") name; ``fallback`` if unknown."""
    import grp
    import pwd

    if not isinstance(name, str) or not name or "\x00" in name:
        return fallback
    try:
        return pwd.getpwnam(name).pw_uid if kind == "u" else grp.getgrnam(name).gr_gid
    except (KeyError, ValueError, UnicodeError):
        return fallback


def _xxh3_fd(fd: int, size: int) -> str:
    """xxh3-128 of the first ``size`` bytes of ``fd`` (of fewer if the file is shorter).

    Holes are hashed as the zeros they read as, without reading them
    (SEEK_DATA), so a sparse file costs what its data costs, whatever its size.
    """
    import xxhash

    h = xxhash.xxh3_128()
    size = min(size, os.fstat(fd).st_size)
    pos = 0
    while pos < size:
        try:
            start = min(os.lseek(fd, pos, os.SEEK_DATA), size)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:  # ENXIO: only a hole remains; otherwise no SEEK_DATA here
            start, end = (size, size) if exc.errno == errno.ENXIO else (pos, size)
        hash_zeros(h, start - pos)
        pos = max(pos, start)
        while pos < end:
            data = os.pread(fd, min(4 * 1024 * 1024, end - pos), pos)
            if not data:
                return str(h.hexdigest())
            h.update(data)
            pos += len(data)
    return str(h.hexdigest())


def _xxh3_of(name: bytes, dir_fd: int) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return _xxh3_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _target_is_empty(target: bytes) -> bool:
    try:
        with os.scandir(target) as it:
            return next(it, None) is None
    except FileNotFoundError:
        return True


class _Shard:
    """Which entries of the job one process restores, when several share it.

    Every entry but a regular file (directories, links, special files) is the
    first process's. Regular files are split in manifest order into one
    contiguous run per process, each about the same work: a file costs one
    creation plus its bytes (see ``_BYTES_PER_FILE``), and the first process's
    run is shorter by the other entries it places (``_OTHER_ENTRY_WORK``). The
    job's recorded totals (``files``, ``entries``, ``source_bytes``) size the
    runs before the manifest is read. Contiguous runs keep the processes in
    different directories: two processes creating files in one directory at
    the same time contend for it, and the file system then spends several
    times the work it spends creating the same files from one process.

    Without the totals (a job recorded without them, or a selection of its
    entries), files go in units of about ``unit_bytes`` or ``unit_files``
    instead, each to the process with the least work dealt so far.

    Either way a run ends only where a file starts in a chunk the file
    before it did not use, so files that share a chunk stay together and
    each chunk is fetched once. Every process reads the same manifest with
    the same selection, so they all agree on who does what without talking
    to each other.
    """

    def __init__(
        self, index: int, count: int, options: RestoreOptions, totals: _Totals | None = None
    ) -> None:
        self.index, self.count = index, count
        self._max_files, self._max_bytes = options.unit_files, options.unit_bytes
        self._bytes = self._files = 0
        self._owner = -1
        self._last: tuple[str, int] | None = None
        self._work = [0.0] * count
        self._starts: list[float] | None = None
        """Where each process after the first starts, in file work (contiguous runs)."""
        self._done = 0.0
        if totals is not None:
            files, entries, source_bytes = totals
            others = max(0, entries - files) * _OTHER_ENTRY_WORK
            share = (files + source_bytes / _BYTES_PER_FILE + others) / count
            first = max(0.0, share - others)
            self._starts = [first + share * k for k in range(count - 1)]

    def mine(self, kind: str, record: dict[str, Any]) -> bool:
        """Whether the entry of manifest ``record`` (of type ``kind``) is this process's
        to restore; call it for every selected entry.

        It reads only the record's size and first and last extents, so an entry
        another process restores is never decoded here.
        """
        if kind != "f":
            self._work[0] += 1
            return self.index == 0
        try:
            size = json_int(record.get("s", 0))
            extents = record.get("d") or ()
            first = (str(extents[0][1]), json_int(extents[0][2])) if extents else None
            last = (str(extents[-1][1]), json_int(extents[-1][2])) if extents else None
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ManifestError(f"manifest entry with a malformed field: {exc}") from None
        work = 1 + size / _BYTES_PER_FILE
        if self._starts is not None:
            due = bisect.bisect_right(self._starts, self._done)
            if due != self._owner and (self._owner < 0 or first != self._last):
                self._owner = due
            self._done += work
        else:
            full = self._bytes >= self._max_bytes or self._files >= self._max_files
            if self._owner < 0 or (full and first != self._last):
                self._owner = min(range(self.count), key=self._work.__getitem__)
                self._bytes = self._files = 0
            self._bytes += size
            self._files += 1
            self._work[self._owner] += work
        if last is not None:
            self._last = last
        return self._owner == self.index


_BYTES_PER_FILE = 96 * 1024
"""Bytes that take a restore about as long as creating one file does."""

_OTHER_ENTRY_WORK = 1.75
"""Files whose creation takes about as long as placing one other entry: a
directory is made, then given its metadata at the end; a link is made, then
given its owner and times. (Measured on the ``small`` benchmark dataset: with
it, the first process finishes its run as its helper finishes.)"""


class _Totals(NamedTuple):
    """What a job recorded of itself: regular files, entries and their bytes."""

    files: int
    entries: int
    source_bytes: int


def _totals(job: Job, options: RestoreOptions) -> _Totals | None:
    """The job's totals, when they describe what this restore selects (all of it)."""
    if options.includes or options.excludes:
        return None
    totals = (int_attribute(job, k) for k in ("files", "entries", "source_bytes"))
    files, entries, source_bytes = (v if v is not None and 0 <= v < 2**63 else None for v in totals)
    if files is None or entries is None or source_bytes is None:
        return None  # not recorded, or not believable
    return _Totals(files, entries, source_bytes)


def _restore_entries(r: _Restore, shard: _Shard | None) -> None:
    """Stream the manifest and restore this process's share of it, then wait for its fetches.

    Without a ``shard``, everything. The first process places everything but
    regular files (directories, symlinks, special files) and collects hard
    links and directories for later; every process restores the regular
    files its ``shard`` gives it.
    """
    options = r.options
    _, records = r.reader.manifest_records()
    batch: list[_Pending] = []
    smalls: list[_Small] = []
    batch_bytes = 0
    for record in records:
        r.coordinator.raise_if_failed()  # a fetch worker's fatal error stops the reading
        kind, path = record_kind_path(record)
        if not r.selected(path, kind):
            continue
        if shard is not None and not shard.mine(kind, record):
            continue
        r.dirs.trim()
        try:
            small = r.short_path(record, path) if kind == "f" else None
            if small is not None:
                smalls.append(small)
                batch_bytes += small.length
            else:
                batch_bytes += _place(r, record, kind, path, batch)
        except UnsafePath as exc:
            r.fail(path, str(exc))
            continue
        if len(batch) + len(smalls) >= options.batch_files or batch_bytes >= options.batch_bytes:
            r.submit(batch, smalls)
            batch, smalls, batch_bytes = [], [], 0
    if batch or smalls:
        r.submit(batch, smalls)
    r.drain()


def _place(
    r: _Restore, record: dict[str, Any], kind: str, path: bytes, batch: list[_Pending]
) -> int:
    """The general path for one record: decoded, checked, then placed, or gathered into
    ``batch`` (a file to fetch); returns the bytes it adds to the batch.

    Raises UnsafePath for an entry that is refused.
    """
    entry = ManifestEntry.from_json(record, (kind, path))
    parts = check_entry(entry)
    if kind == "f":
        p = r.add_file(parts, entry)
        if p is None:
            return 0
        batch.append(p)
        return entry.size
    if kind == "h":
        r.hardlinks.append((parts, entry))
    else:
        r.place_simple(parts, entry)
    return 0


def _process_count(options: RestoreOptions, job_files: int | None) -> int:
    if job_files is None or options.processes <= 1:
        return 1
    return max(1, min(options.processes, _MAX_PROCESSES, job_files // options.files_per_process))


_MAX_PROCESSES = 8
"""At most this many processes share a restore (their temporaries' names need it)."""


def _helper_work(
    open_backend: Callable[[], Any],
    job_id: str,
    options: RestoreOptions,
    count: int,
    temp_prefix: bytes,
    fresh: bool,
    totals: _Totals | None,
) -> Callable[[int, Send], None]:
    """What helper process ``index`` of a restore does: its share of the regular files."""

    def work(index: int, send: Send) -> None:
        backend = open_backend()
        r = _Restore(backend, job_id, options, send, index, temp_prefix, fresh)
        r.tell_first = send
        # A failing send (the pipe is gone) stops this share like any fatal error.
        ticker = Ticker(lambda: send(r.counts()), on_error=r.coordinator.fail)
        ticker.start()
        try:
            _restore_entries(r, _Shard(index, count, options, totals))
        except BaseException as exc:  # noqa: BLE001 - re-raised as its cause, below
            raise r.give_up(exc) from None
        finally:
            ticker.stop()
            r.close()
        send(r.counts())

    return work


def _start_team(
    r: _Restore,
    backend: Any,
    job_id: str,
    count: int,
    totals: _Totals | None,
    on_event: EventSink,
) -> Team | None:
    """Fork ``count - 1`` helpers for ``r``'s restore; None (one process) if the system refuses."""
    options = r.options
    r.reconfigure(replace(options, connections=max(1, (options.connections or 0) // count)))

    def on_message(index: int, message: Any) -> None:
        if isinstance(message, _Counts):
            with r._lock:
                r.helpers[index] = message
        elif isinstance(message, _TempDir):
            with r._lock:
                r.file_dirs.add(message.path)
        elif isinstance(message, FileWarning):
            with r._lock:
                r.failures.append(message)
            on_event(message)
        else:
            on_event(message)

    work = _helper_work(
        backend.reopen, job_id, r.options, count, r._temp_prefix, r.dirs.all_fresh, totals
    )
    backend.before_fork()
    try:
        from cryo.team import Team  # (multiprocessing's modules: only for a shared restore)

        team = Team.start(count, work, on_message, r.coordinator.fail)
    except OSError:  # no process to spare (EAGAIN, ENOMEM): this one does it all
        r.reconfigure(options)
        return None
    r.shared = True
    return team


def run_restore(
    backend: Any,
    job_id: str,
    options: RestoreOptions,
    on_event: EventSink = ignore,
    clock: Callable[[], float] = time.monotonic,
) -> RestoreSummary:
    """Restore job ``job_id`` into ``options.target``.

    With ``options.processes`` above one, a job of many files is restored by
    several processes, each with its share of the files and its own
    connection to the storage (``backend.reopen()``, in the new process).
    """
    started = clock()
    if options.overwrite is None and not _target_is_empty(options.target):
        raise TargetNotEmpty(
            f"{os.fsdecode(options.target)} is not empty; choose --overwrite never, "
            "if-changed or always"
        )
    r = _Restore(backend, job_id, options, on_event)
    team: Team | None = None
    ticker = Ticker(lambda: on_event(r.progress()))
    try:
        job = r.backend.describe_job(job_id)
        if not options.includes and not options.excludes:
            r.files_total = int_attribute(job, "files")
            r.bytes_total = int_attribute(job, "source_bytes")
        count = _process_count(options, int_attribute(job, "files"))
        totals = _totals(job, options)
        # Replacing what is in the way of a directory is the first process's work, which
        # the helpers would race: into a target that had content, "always" runs alone.
        if count > 1 and (options.overwrite != "always" or r.dirs.all_fresh):
            team = _start_team(r, backend, job_id, count, totals, on_event)
        ticker.start()  # threads only once every helper is forked
        _restore_entries(r, None if team is None else _Shard(0, count, options, totals))
        if team is not None:
            team.wait(r.coordinator.raise_if_failed)
        for parts, entry in r.hardlinks:
            try:
                r.link(parts, entry)
            except UnsafePath as exc:
                r.fail(entry.path, str(exc))
        r.finish_dirs()
    except BaseException as exc:
        r.coordinator.fail(exc)  # this process's own workers stop at once
        try:
            if team is not None:
                team.stop()  # each helper removes its own temporaries
        finally:
            cause = r.give_up(exc)
        if isinstance(cause, OSError) and cause.errno in _TARGET_FULL:
            raise WriteFailed(
                f"cannot write under {os.fsdecode(options.target)}: "
                f"{cause.strerror or cause}; the files restored so far are complete, "
                "the others were not written"
            ) from cause
        if cause is not exc:
            raise cause from cause.__cause__  # the worker's error, not the Cancelled it caused
        raise
    finally:
        ticker.stop()
        r.close()
    on_event(r.progress())
    c = r.counts()
    return RestoreSummary(
        job_id=job_id,
        files=c.files,
        entries=c.entries,
        bytes_written=c.bytes_written,
        skipped=c.skipped,
        retries=c.retries,
        failures=tuple(r.failures),
        seconds=clock() - started,
    )


def restore_one_to_stream(
    backend: Any, job_id: str, path: bytes, out: BinaryIO, on_event: EventSink = ignore
) -> int:
    """Write one file of a job to ``out`` (``--to -``); returns the bytes written.

    The file is streamed in file order, one chunk in memory at a time; each
    chunk's SHA-256 is verified before any of its bytes are written, and the
    file's xxh3-128 is checked at the end (CorruptData if it differs, so the
    command fails rather than report success).
    """
    import xxhash

    reader = JobReader(RetryingBackend(backend, RetryPolicy(), on_event), job_id)
    _, entries = reader.manifest()
    wanted = path.strip(b"/")
    shown = path.decode("utf-8", "backslashreplace")
    entry = next((e for e in entries if e.path == wanted), None)
    if entry is None:
        raise FileNotFoundError(shown)
    if entry.kind != "f":
        raise CryoError(f"{shown} is not a regular file")
    h = xxhash.xxh3_128()
    pos = 0

    def emit(data: bytes | memoryview) -> None:
        h.update(data)
        out.write(data)

    for e in sorted(entry.extents, key=lambda x: x.file_offset):
        if e.file_offset < pos:
            raise CorruptData(f"{shown}: extents overlap")
        _stream_zeros(emit, e.file_offset - pos)
        piece = memoryview(reader.chunk_view(e.object_name, e.chunk_index))[
            e.chunk_offset : e.chunk_offset + e.length
        ]
        if len(piece) != e.length:
            raise CorruptData(f"{shown}: an extent runs past its chunk")
        emit(piece)
        pos = e.file_offset + e.length
    _stream_zeros(emit, entry.size - pos)
    out.flush()
    if h.hexdigest() != entry.xxh3:
        raise CorruptData(f"{shown}: content fails its xxh3-128 checksum")
    return entry.size


def _stream_zeros(emit: Callable[[bytes], None], n: int) -> None:
    zeros = bytes(min(n, 1024 * 1024))
    while n > 0:
        step = min(n, len(zeros))
        emit(zeros[:step])
        n -= step


def iter_bad_files(
    backend: Any, job_id: str, connections: int = 8, on_event: EventSink = ignore
) -> Iterator[FileWarning]:
    """``verify --read-data``: every chunk fetched and verified; yields files that fail."""
    reader = JobReader(RetryingBackend(backend, RetryPolicy(), on_event), job_id)
    _, entries = reader.manifest()
    coordinator = Coordinator()
    users: dict[tuple[str, int], list[bytes]] = defaultdict(list)
    for entry in entries:
        for e in entry.extents:
            users[(e.object_name, e.chunk_index)].append(entry.path)
    bad: dict[bytes, str] = {}
    lock = threading.Lock()

    def check(key: tuple[str, int]) -> None:
        try:
            reader.chunk_view(*key)
        except CorruptData as exc:
            with lock:
                for p in users[key]:
                    bad.setdefault(p, str(exc))

    pool = BoundedExecutor(connections, connections * 2, coordinator, "verify")
    try:
        for key in users:
            pool.submit(check, key)
    finally:
        pool.shutdown(wait=True)
    coordinator.raise_if_failed()
    for p in sorted(bad):
        yield FileWarning(p.decode("utf-8", "backslashreplace"), bad[p])
