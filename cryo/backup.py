"""The backup pipeline: scan → read → encode+hash → upload, with bounds at every stage.

Algorithm
---------
1. A job is created (idempotent through a client token) and the manifest
   upload is started.
2. The scanner (the calling thread) walks the roots in a fixed order
   (:mod:`cryo.scan`) and gives each entry a sequence number. Entries without
   data (directories, links, devices, empty files) are done at once; regular
   files go to the **read** stage.
3. Readers (``read_workers`` threads) read a file and hash it (xxh3-128 over
   its whole logical content, the end-to-end check a restore verifies).
   Small files are read by the scanner itself: handing each of thousands
   of tiny files to another thread costs more than reading it. Those not
   in the page cache are first read ahead by the kernel (``_SmallFiles``).
   A large file mostly outside the page cache is read with direct I/O
   (:mod:`cryo.directio`).
   Small files (below ``pack_threshold``) are **packed**: their bytes are
   appended to a shared buffer that becomes one chunk of a pack object once
   it reaches ``chunk_size``, so the number of API calls grows with bytes,
   not with files. Packs have encoders of their own, one fewer than
   ``cpu_workers`` (at least one): their producer, the scanning thread,
   needs a processor of its own. Larger files are cut into ``chunk_size`` slices that
   become the indexed chunks of the file's own object (PutObject when one
   chunk suffices). Sparse files are read region by region (SEEK_DATA), so
   holes are neither read nor stored; a small file with holes is therefore
   not packed, so that its holes are holes again when it is restored.
4. Each chunk is **encoded** (zstd when it pays, see :mod:`cryo.encoding`)
   and hashed (SHA-256, the API checksum) by ``cpu_workers`` threads, then
   **uploaded** by ``connections`` threads with PutChunk. The last chunk of
   a sealed object triggers its NotifyObjectComplete.
5. Finished entries are written to the manifest in scan order (a bounded
   reorder buffer); manifest chunks travel through the same stages. Once
   every data object is complete, the manifest is completed, then the job
   is marked COMPLETED, or PARTIAL if some files could not be read as they
   were.

Incremental runs and resumption
-------------------------------
A backup of the same host and paths as an earlier complete job of the same
pool uses it as its **base**: the new job is created as a copy-on-write
copy of the base (every object shared, nothing copied), and the base's
manifest is read alongside the scan. Because both are in the same order
(roots sorted, children sorted by name), a single forward cursor matches
every scanned path to its old entry with constant memory. A regular file
whose size, mtime, ctime and inode are unchanged keeps its old extents and
is neither read nor uploaded. At the end, every object no entry of the new
manifest uses (files deleted or changed since the base) is removed from the
new job with DeleteObject; the base is untouched, and each job remains a
complete snapshot on its own.

Every data object carries the entries whose bytes it holds: a multi-chunk
object in its MetadataBlob (JSON lines, as in the manifest), a PutObject
in a compact MetadataString (path hash, size, times, inode, xxh3). A run
that is retried with the same client token finds the job it left
IN_PROGRESS, reads those entries back from the objects it completed, and
reuses them exactly like base entries, so nothing already committed is
sent again. The client token comes from the caller or from a pending-run
record (:mod:`cryo.runstate`).

Bounds: every stage is a ``BoundedExecutor``; a full stage blocks the one
before it, down to the scanner, so memory stays flat whatever the input
(at most about ``chunk_size`` times 2 * (read + 2 * cpu + connections) bytes). The
reorder buffer holds at most ``MAX_PENDING_ENTRIES`` entries.

Errors: a file that cannot be read, vanishes, or changes while it is read is
reported as a ``FileWarning`` and the run goes on (status PARTIAL). Any other
failure (after the retry wrapper gave up) stops every stage through the
``Coordinator``; the job is left IN_PROGRESS, never marked complete.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import mmap
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryo import __version__
from cryo.checksums import CHUNK_ALGORITHM, chunk_checksum, hash_zeros, summary_checksum
from cryo.directio import ALIGN, cached_fraction, pread_direct_into, refused
from cryo.encoding import encode
from cryo.errors import IllegalArgumentException, ResourceNotFoundException
from cryo.events import EventSink, FileWarning, Progress, Ticker, ignore
from cryo.executor import BoundedExecutor, Coordinator
from cryo.jobreader import CorruptData, JobReader
from cryo.jobs import DEFAULT_POOL, find_base, find_token_job, int_attribute
from cryo.manifest import (
    MANIFEST_OBJECT,
    Extent,
    ManifestEntry,
    ManifestError,
    footer,
    get_bytes,
    header,
    parse_lines,
    raw_entries,
)
from cryo.retry import RetryingBackend, RetryPolicy
from cryo.runstate import PendingRecord, PendingRun
from cryo.scan import (
    KIND_FILE,
    KIND_HARDLINK,
    KIND_SYMLINK,
    Entry,
    ScanOptions,
    canonical_roots,
    load_xattrs,
    open_path,
    scan,
)
from cryo.storage.api import (
    FINAL_STATUSES,
    JOB_COMPLETED,
    JOB_PARTIAL,
    MAX_METADATA_STRING_BYTES,
    Job,
    iter_objects,
)

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * MiB
DEFAULT_PACK_THRESHOLD = 1 * MiB
DEFAULT_PACK_CHUNKS = 16
MAX_PENDING_ENTRIES = 20_000
AHEAD_FILES = 64
AHEAD_SPAN = 1024
MAX_ENTRIES_BLOB = 3 * MiB
"""A pack object is sealed once the entries it describes reach this size."""
ENTRIES_MARKER = "cryo:entries"
"""MetadataString of a data object whose MetadataBlob lists its entries."""


@dataclass(frozen=True, slots=True)
class BackupOptions:
    paths: tuple[bytes, ...] = ()
    """Absolute paths to back up."""
    stdin_name: str | None = None
    """Back up standard input under this name instead of paths."""
    scan: ScanOptions = field(default_factory=ScanOptions)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    pack_threshold: int = DEFAULT_PACK_THRESHOLD
    pack_chunks: int = DEFAULT_PACK_CHUNKS
    compression_level: int | None = 1
    read_workers: int = 2
    cpu_workers: int = 2
    connections: int = 8
    pool_id: str = DEFAULT_POOL
    tags: tuple[str, ...] = ()
    client_token: str | None = None
    """Continue (or, if complete, return) the job created with this token."""
    base_job_id: str | None = None
    """Base of the incremental; None picks the newest matching complete job."""
    full: bool = False
    """Read every file: no base job."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    estimate_totals: bool = False
    """Count files and bytes beside the run, so progress can show totals and an ETA."""


@dataclass(frozen=True, slots=True)
class BackupSummary:
    job_id: str
    status: str
    files: int
    entries: int
    bytes_read: int
    bytes_stored: int
    chunks: int
    retries: int
    warnings: tuple[FileWarning, ...]
    seconds: float
    files_unchanged: int = 0
    """Files reused from the base job or a resumed run, neither read nor uploaded."""
    source_bytes: int = 0
    base_job_id: str | None = None
    resumed: bool = False
    objects_deleted: int = 0
    already_complete: bool = False
    """The client token named a job that was already complete; nothing was done."""


def display_path(path: bytes) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


class _Object:
    """A data object being uploaded: chunks in flight, checksums, completion."""

    __slots__ = (
        "checksums",
        "completed",
        "entries",
        "entries_bytes",
        "lock",
        "name",
        "pending",
        "sealed",
        "upload_id",
    )

    def __init__(self, name: str, upload_id: str) -> None:
        self.name = name
        self.upload_id = upload_id
        self.checksums: dict[int, str] = {}
        self.pending = 0
        self.sealed = False
        self.completed = False
        self.lock = threading.Lock()
        self.entries: list[bytes] = []
        self.entries_bytes = 0

    def describe(self, m: ManifestEntry) -> None:
        """Record that ``m``'s bytes live here (a resumed run can reuse them).

        The encoded line is kept on ``m`` so the manifest does not encode it again.
        """
        if m.warning is None:
            line = m.encoded()
            self.entries.append(line)
            self.entries_bytes += len(line) + 1


class _Packer:
    """Packs small files into the chunks of shared pack objects.

    The chunk being filled lives in a frame (see ``_Frames``) with room for
    one more file after ``chunk_size``; the encoder takes the frame as it
    is and gives it back, so a file read straight into the pack
    (``room``, then ``commit``) is copied once, by the kernel (a pack's frame has
    a lead of one byte: files land anywhere in it, and a pack stored raw is
    tagged in place).
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._lock = threading.Lock()
        opts = run.options
        # Files land anywhere in a pack: only its first would gain from a lead.
        self.frames = _Frames(
            opts.chunk_size + opts.pack_threshold, aligned=run.frames.aligned, lead=1
        )
        # The current chunk: bytes lead to lead + _size of _frame (made when the
        # first small file comes: an incremental may have none).
        self._frame: Frame | None = None
        self._size = 0
        self._obj: _Object | None = None
        self._index = 0

    def room(self) -> memoryview:
        """Where the next file's bytes go: ``pack_threshold`` bytes, to be ``commit``-ted.

        Only the scanning thread packs; a view not committed is simply overwritten.
        """
        with self._lock:
            frame = self._prepare()
            start = self.frames.lead + self._size
            return memoryview(frame)[start : start + self._run.options.pack_threshold]

    def commit(self, n: int, m: ManifestEntry) -> None:
        """The ``n`` bytes just read into ``room()`` are the whole content of file ``m``."""
        with self._lock:
            self._place(n, m)
            self._size += n
            self._check_full()

    def add(self, data: bytes | memoryview, m: ManifestEntry) -> None:
        """Place the whole content of file ``m`` (complete but for its extent) in a pack."""
        with self._lock:
            frame = self._prepare()
            end = self._size + len(data)
            lead = self.frames.lead
            frame[lead + self._size : lead + end] = data
            self._place(len(data), m)
            self._size = end
            self._check_full()

    def _prepare(self) -> Frame:
        """The frame the next file goes to, once a pack whose entries are many is sealed."""
        if self._obj is not None and self._obj.entries_bytes >= MAX_ENTRIES_BLOB:
            self._seal()
        if self._frame is None:
            self._frame = self.frames.take()
        return self._frame

    def _place(self, n: int, m: ManifestEntry) -> None:
        if self._obj is None:
            self._obj = self._run.new_object()
            self._index = 0
        m.extents.append(Extent(0, self._obj.name, self._index, self._size, n))
        self._obj.describe(m)

    def _check_full(self) -> None:
        if self._size >= self._run.options.chunk_size:
            self._flush()
            if self._index >= self._run.options.pack_chunks:
                self._seal()

    def _flush(self) -> None:
        assert self._obj is not None and self._frame is not None
        frame, self._frame = self._frame, None
        self._run.submit_chunk(
            self._obj,
            self._index,
            memoryview(frame)[self.frames.lead : self.frames.lead + self._size],
            frame,
            pack=True,
        )
        self._size = 0
        self._index += 1

    def _seal(self) -> None:
        assert self._obj is not None
        if self._size:
            self._flush()
        self._run.seal(self._obj)
        self._obj = None

    def close(self) -> None:
        with self._lock:
            if self._obj is not None:
                self._seal()


class _ManifestWriter:
    """Writes finished entries to the manifest object in scan order.

    Entries finish out of order (readers run in parallel); each waits in a
    reorder buffer until all before it are written. ``reserve`` blocks while
    ``MAX_PENDING_ENTRIES`` are reserved but not yet written, so the buffer
    is bounded. An entry that finishes in turn is written at once.
    """

    def __init__(self, run: _Run, head: str) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._pending: dict[int, tuple[bytes, list[str]] | None] = {}
        self._next = 0
        self._issued = 0
        self._waiting = False
        self._index = 0
        self._buf = bytearray(head.encode("utf-8") + b"\n")
        self._limit = run.options.chunk_size
        self.count = 0
        self.referenced: set[str] = set()
        self.obj = run.start_object(MANIFEST_OBJECT)

    def reserve(self) -> int:
        # Only the scanning thread reserves: _issued has one writer.
        if self._issued - self._next >= MAX_PENDING_ENTRIES:
            with self._room:
                self._waiting = True
                while self._issued - self._next >= MAX_PENDING_ENTRIES:
                    self._run.coordinator.check()
                    self._room.wait(0.2)
                self._waiting = False
        seq = self._issued
        self._issued = seq + 1
        return seq

    def complete(self, seq: int, entry: ManifestEntry | None) -> None:
        if entry is None:
            self._put(seq, None)
        else:
            self.complete_raw(seq, entry.encoded(), [x.object_name for x in entry.extents])

    def complete_raw(self, seq: int, line: bytes, objects: list[str]) -> None:
        """An entry already encoded (unchanged since the base job)."""
        with self._lock:
            if seq == self._next and not self._pending:  # in turn: written at once
                self._next = seq + 1
                self._write(line, objects)
                if self._waiting:
                    self._room.notify()
                return
        self._put(seq, (line, objects))

    def _write(self, line: bytes, objects: list[str]) -> None:
        if objects:
            self.referenced.update(objects)
        buf = self._buf
        buf += line
        buf += b"\n"
        self.count += 1
        if len(buf) >= self._limit:
            self._flush()

    def _put(self, seq: int, item: tuple[bytes, list[str]] | None) -> None:
        with self._lock:
            self._pending[seq] = item
            pending = self._pending
            while self._next in pending:
                e = pending.pop(self._next)
                self._next += 1
                if e is not None:
                    self._write(*e)
            if self._waiting:
                self._room.notify()

    def _flush(self) -> None:
        self._run.submit_chunk(self.obj, self._index, bytes(self._buf))
        self._buf.clear()
        self._index += 1

    def close(self) -> None:
        with self._lock:
            assert not self._pending, "entries still pending at manifest close"
            self._buf += footer(self.count).encode("utf-8") + b"\n"
            self._flush()


class _Run:
    """One backup run: the stages, their shared state and the counters."""

    def __init__(self, backend: Any, options: BackupOptions, on_event: EventSink) -> None:
        self.options = options
        self.on_event = on_event
        self.coordinator = Coordinator()
        self.backend = RetryingBackend(backend, options.retry, on_event)
        self.job_id = ""
        self._prefix = f"data/{secrets.token_hex(4)}-"
        self._counter = 0
        self._counter_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.files = 0
        self.files_unchanged = 0
        self.source_bytes = 0
        self.bytes_read = 0
        self.bytes_unchanged = 0
        self.bytes_stored = 0
        self.chunks = 0
        self.files_total: int | None = None
        self.bytes_total: int | None = None
        self.warnings: list[FileWarning] = []
        self.direct_reads = hasattr(os, "O_DIRECT")
        """Whether cold large files are read around the page cache (until refused)."""
        c = self.coordinator
        self.readers = BoundedExecutor(options.read_workers, options.read_workers * 2, c, "read")
        self.cpu = BoundedExecutor(options.cpu_workers, options.cpu_workers * 2, c, "encode")
        # Packs are filled by the scanning thread, then the slowest stage: it
        # needs a processor of its own, so packs get one encoder fewer (here,
        # with two, the scanner spent 0.26 s more of its 2.1 s of CPU).
        packers = max(1, options.cpu_workers - 1)
        self.pack_cpu = BoundedExecutor(packers, packers * 2, c, "pack")
        self.uploads = BoundedExecutor(options.connections, options.connections * 2, c, "upload")
        self.frames = _Frames(
            options.chunk_size, aligned=bool(getattr(backend, "writes_aligned", False))
        )
        self.packer = _Packer(self)

    # -- objects and chunks ---------------------------------------------------
    def pool_of(self, frame: Frame) -> _Frames:
        """The pool ``frame`` came from: large files' slices, or packs (a larger size)."""
        return self.frames if len(frame) == self.frames.size else self.packer.frames

    def give_frame(self, frame: Frame) -> None:
        self.pool_of(frame).give(frame)

    def next_name(self) -> str:
        with self._counter_lock:
            self._counter += 1
            return f"{self._prefix}{self._counter:06d}"

    def start_object(self, name: str) -> _Object:
        return _Object(name, self.backend.start_object(self.job_id, name))

    def new_object(self) -> _Object:
        return self.start_object(self.next_name())

    def submit_chunk(
        self,
        obj: _Object,
        index: int,
        data: Data,
        frame: Frame | None = None,
        pack: bool = False,
    ) -> None:
        """Store ``data`` as chunk ``index`` of ``obj`` (``frame``: see ``_Frames``)."""
        with obj.lock:
            obj.pending += 1
        (self.pack_cpu if pack else self.cpu).submit(self._encode, obj, index, data, frame)

    def _encode(self, obj: _Object, index: int, data: Data, frame: Frame | None) -> None:
        self.coordinator.check()
        stored, frame = self._encoded(data, frame)
        self.uploads.submit(self._put, obj, index, stored, chunk_checksum(stored), frame)

    def _encoded(
        self, data: Data, frame: Frame | None
    ) -> tuple[bytes | bytearray | memoryview, Frame | None]:
        """The stored form of ``data``, and the frame it still occupies (if any)."""
        lead = 1 if frame is None else self.pool_of(frame).lead
        stored = encode(data, self.options.compression_level, frame, lead)
        in_frame = stored is frame or (isinstance(stored, memoryview) and stored.obj is frame)
        if frame is not None and not in_frame:
            self.give_frame(frame)  # compressed (or copied out): the frame is free again
            frame = None
        return stored, frame

    def _put(
        self,
        obj: _Object,
        index: int,
        stored: bytes | bytearray | memoryview,
        checksum: str,
        frame: Frame | None,
    ) -> None:
        try:
            self.coordinator.check()
            self.backend.put_chunk(self.job_id, obj.upload_id, index, stored, len(stored), checksum)
        finally:
            if frame is not None:
                self.give_frame(frame)
        self._stored(len(stored))
        with obj.lock:
            obj.checksums[index] = checksum
            obj.pending -= 1
            finish = obj.sealed and obj.pending == 0 and not obj.completed
            if finish:
                obj.completed = True
        if finish:
            self.complete_object(obj)

    def seal(self, obj: _Object) -> None:
        """No more chunks will be added; the object completes once they are all stored."""
        with obj.lock:
            obj.sealed = True
            finish = obj.pending == 0 and not obj.completed
            if finish:
                obj.completed = True
        if finish:
            self.complete_object(obj)

    def complete_object(self, obj: _Object) -> None:
        summary = summary_checksum(obj.checksums[i] for i in range(len(obj.checksums)))
        if not obj.entries:
            self.backend.notify_object_complete(self.job_id, obj.upload_id, summary, "SUMMARY")
            return
        blob = b"\n".join(obj.entries) + b"\n"
        self.backend.notify_object_complete(
            self.job_id,
            obj.upload_id,
            summary,
            "SUMMARY",
            metadata_string=ENTRIES_MARKER,
            metadata_blob=blob,
            metadata_blob_length=len(blob),
            metadata_blob_checksum=chunk_checksum(blob),
            metadata_blob_checksum_algorithm=CHUNK_ALGORITHM,
        )

    def put_single(
        self, name: str, data: Data, metadata: str | None, frame: Frame | None = None
    ) -> None:
        self.cpu.submit(self._encode_single, name, data, metadata, frame)

    def _encode_single(
        self, name: str, data: Data, metadata: str | None, frame: Frame | None
    ) -> None:
        self.coordinator.check()
        stored, frame = self._encoded(data, frame)
        self.uploads.submit(self._put_single, name, stored, chunk_checksum(stored), metadata, frame)

    def _put_single(
        self,
        name: str,
        stored: bytes | bytearray | memoryview,
        checksum: str,
        metadata: str | None,
        frame: Frame | None,
    ) -> None:
        try:
            self.coordinator.check()
            self.backend.put_object(
                self.job_id, name, stored, len(stored), checksum, metadata_string=metadata
            )
        finally:
            if frame is not None:
                self.give_frame(frame)
        self._stored(len(stored))

    # -- counters -------------------------------------------------------------
    def _stored(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_stored += n
            self.chunks += 1

    def file_done(self, size: int, unchanged: bool = False) -> None:
        with self._stats_lock:
            self.files += 1
            self.source_bytes += size
            if unchanged:
                self.files_unchanged += 1
                self.bytes_unchanged += size

    def read_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_read += n

    def warn(self, path: bytes, message: str) -> None:
        w = FileWarning(display_path(path), message)
        with self._stats_lock:
            self.warnings.append(w)
        self.on_event(w)

    def progress(self, phase: str) -> Progress:
        with self._stats_lock:
            return Progress(
                phase,
                self.files,
                self.bytes_read,
                self.bytes_stored,
                bytes_done=self.bytes_read + self.bytes_unchanged,
                files_total=self.files_total,
                bytes_total=self.bytes_total,
            )

    def estimate(self, roots: list[bytes], stop: threading.Event) -> None:
        """Count the files and bytes the scan will find (for totals and an ETA).

        Runs beside the pipeline on its own walk; the totals are published
        only once the walk is whole, so a partial count never shows as a total.
        """
        o = self.options.scan
        quiet = ScanOptions(o.excludes, o.exclude_caches, o.one_file_system, xattrs=False)
        files = size = 0
        for e in scan(roots, quiet, lambda _path, _message: None):
            if stop.is_set():
                return
            if e.kind == KIND_FILE:
                files += 1
                size += e.size
        with self._stats_lock:
            self.files_total, self.bytes_total = files, size


def _manifest_entry(e: Entry) -> ManifestEntry:
    return ManifestEntry(
        path=e.path,
        kind=e.kind,
        mode=e.mode,
        uid=e.uid,
        gid=e.gid,
        user=e.user,
        group=e.group,
        mtime_ns=e.mtime_ns,
        ctime_ns=e.ctime_ns,
        ino=e.ino,
        dev=e.dev,
        size=e.size,
        rdev=e.rdev,
        target=e.target,
        xattrs=e.xattrs,
    )


def _data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data regions of a sparse file, holes left out."""
    regions = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end))
        pos = end
    return regions


def _has_holes(fd: int, size: int, blocks: int) -> bool:
    """Whether a file has holes: fewer blocks than bytes, and SEEK_DATA finds a gap.

    Compressed or inline data also takes fewer blocks than bytes; only a real gap counts.
    """
    return blocks * 512 < size and _data_regions(fd, size) != [(0, size)]


Data = bytes | bytearray | memoryview
"""The bytes of a slice of a file, as read."""


Frame = bytearray | mmap.mmap


FRAME_LEAD = 64
"""Where a chunk read into a page-aligned frame starts: a cache line in, as the
file's bytes are in the page cache. The kernel copies a file into memory about
three times faster to a destination aligned like its source (here, reading
512 MiB from the page cache cost 0.08 s of CPU into an aligned buffer, 0.23 s
one byte further on); moving a chunk stored raw next to its tag costs less."""


class _Frames:
    """Reused buffers that large files are read into, one chunk each (and packs are made in).

    A frame has room for a chunk after ``lead`` bytes: a chunk stored raw
    becomes its stored form (tag byte, then the bytes) in place, and the
    same pages carry chunk after chunk instead of fresh memory being zeroed
    for each. For a backend that writes chunks from page-aligned memory
    without a copy (``writes_aligned``: the embedded repository's direct
    I/O), frames are page-aligned mappings, and a chunk is read in at byte
    ``FRAME_LEAD`` (see there), then moved next to its tag if it is stored
    raw; otherwise frames are ``bytearray`` (what an HTTP body may be) whose
    byte 1, where a chunk is read in next to its tag, starts a cache line.
    A frame is given back
    once nothing refers to its bytes any more (after its upload, or once
    compressed); a frame never given back (a cancelled run) is simply freed.
    """

    KEEP = 32

    def __init__(self, room: int, aligned: bool, lead: int | None = None) -> None:
        self.lead = lead or (FRAME_LEAD if aligned else 1)
        """Where a chunk's bytes start in a frame."""
        self.size = room + self.lead
        self.aligned = aligned
        self._free: list[Frame] = []
        self._lock = threading.Lock()

    def take(self) -> Frame:
        with self._lock:
            if self._free:
                return self._free.pop()
        if self.aligned:  # private: never shared with a process forked later
            return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return _bytearray_aligned_at_1(self.size)

    def give(self, frame: Frame) -> None:
        with self._lock:
            if len(self._free) < self.KEEP:
                self._free.append(frame)


def _bytearray_aligned_at_1(size: int) -> bytearray:
    """``size`` zero bytes whose second byte starts a cache line (see ``FRAME_LEAD``).

    A ``bytearray`` starts wherever ``malloc`` put it; one a little longer is
    cut to fit (CPython drops bytes at either end without moving the rest).
    """
    frame = bytearray(size + FRAME_LEAD - 1)
    try:
        import ctypes

        probe = ctypes.c_char.from_buffer(frame)
        skew = (-ctypes.addressof(probe) - 1) % FRAME_LEAD
        del probe  # (the export ends: the bytearray may be cut)
    except ImportError:  # a Python built without ctypes: slower reads, the same bytes
        skew = 0
    del frame[:skew]
    del frame[size:]
    return frame


class _Chunker:
    """A file's slices, in file order, as the chunks of its own object.

    The first slice is held back: if no second one follows it is stored with
    PutObject (one request), otherwise the object is started and every slice
    becomes one indexed chunk. Extents are appended to ``extents``.
    """

    def __init__(self, run: _Run, extents: list[Extent]) -> None:
        self._run = run
        self._extents = extents
        self._obj: _Object | None = None
        self._first: tuple[int, Data, Frame | None] | None = None
        self._index = 0

    def add(self, file_offset: int, data: Data, frame: Frame | None = None) -> None:
        """The next slice; ``frame``, where given, holds it (see ``_Frames``)."""
        if self._obj is None:
            if self._first is None:
                self._first = (file_offset, data, frame)
                return
            self._obj = self._run.new_object()
            self._submit(*self._first)
            self._first = None
        self._submit(file_offset, data, frame)

    def _submit(self, file_offset: int, data: Data, frame: Frame | None) -> None:
        assert self._obj is not None
        self._run.submit_chunk(self._obj, self._index, data, frame)
        self._extents.append(Extent(file_offset, self._obj.name, self._index, 0, len(data)))
        self._index += 1

    def close(self, m: ManifestEntry) -> None:
        """All slices added; ``m`` is the file's finished entry (its extents are ours)."""
        if self._first is not None:
            offset, data, frame = self._first
            name = self._run.next_name()
            self._extents.append(Extent(offset, name, 0, 0, len(data)))
            self._run.put_single(name, data, compact_record(m), frame)
        elif self._obj is not None:
            self._obj.describe(m)
            self._run.seal(self._obj)


class _Unreadable(Exception):
    """The file itself could not be opened or read (a warning, not a failure)."""


def _io(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _Unreadable("vanished before it was read") from None
        raise _Unreadable(exc.strerror or str(exc)) from None


def _noatime(open_: Callable[[int], int], flags: int) -> int:
    """``open_(flags)``, without updating the file's atime where that is allowed."""
    try:
        return open_(flags | getattr(os, "O_NOATIME", 0))
    except OSError:  # O_NOATIME needs ownership; retry without it, failing for real
        return open_(flags)


def _open(entry: Entry) -> int:
    """Open a regular file for reading, without following a link, without updating its atime."""
    flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    return int(_io(_noatime, lambda f: open_path(entry.source, f), flags))


class _FileReader:
    """Reads one regular file into chunks (or a pack) and builds its manifest entry."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def read(
        self, seq: int, entry: Entry, manifest: _ManifestWriter, fd: int | None = None
    ) -> None:
        run = self.run
        try:
            m = self._read(entry, fd)
        except _Unreadable as exc:
            run.warn(entry.source, f"not backed up: {exc}")
            manifest.complete(seq, None)
            return
        run.file_done(m.size)
        manifest.complete(seq, m)

    def _read(self, entry: Entry, fd: int | None = None) -> ManifestEntry:
        """Read ``entry`` (from ``fd`` if given, which is then closed)."""
        import xxhash

        run = self.run
        opts = run.options
        m = _manifest_entry(entry)
        if fd is None:
            fd = _open(entry)
        try:
            if entry.size < opts.pack_threshold and not _has_holes(fd, entry.size, entry.blocks):
                # A small file is read whole at once; the scan's stat is its "before".
                data = _io(os.pread, fd, opts.pack_threshold, 0)
                self.pack(entry, m, data, _io(os.fstat, fd))
            else:
                self._read_large(fd, entry, _io(os.fstat, fd), xxhash.xxh3_128(), m)
        finally:
            os.close(fd)
        return m

    def pack(
        self, entry: Entry, m: ManifestEntry, data: bytes | memoryview, after: os.stat_result
    ) -> None:
        """Complete ``m`` for a small file read whole (``data``) and put it in a pack."""
        self.hashed(entry, m, data, after)
        if data:
            self.run.packer.add(data, m)

    def hashed(
        self, entry: Entry, m: ManifestEntry, data: bytes | memoryview, after: os.stat_result
    ) -> None:
        """Complete ``m`` for a small file read whole (``data``), but for where it is packed."""
        import xxhash

        self.run.read_bytes(len(data))
        self._finish(entry, m, len(data), xxhash.xxh3_128(data), None, after)

    def _finish(
        self,
        entry: Entry,
        m: ManifestEntry,
        size: int,
        h: Any,
        before: os.stat_result | None,
        after: os.stat_result,
    ) -> None:
        """Complete ``m`` once its bytes are read: size, hash, and whether it changed.

        It changed if the scan's stat, the one taken when it was opened (if
        any) and the one taken after reading disagree on inode, size or
        mtime, or if the bytes read are not as many as it has.
        """
        m.size = size
        m.xxh3 = h.hexdigest()
        now = (after.st_ino, after.st_size, after.st_mtime_ns)
        changed = (
            (entry.ino, entry.size, entry.mtime_ns) != now
            or (before is not None and (before.st_ino, before.st_size, before.st_mtime_ns) != now)
            or size != after.st_size
        )
        if changed:
            m.warning = "changed while it was read"
            self.run.warn(entry.source, "changed while it was read; the copy may be inconsistent")

    def _read_large(
        self, fd: int, entry: Entry, st: os.stat_result, h: Any, m: ManifestEntry
    ) -> None:
        run = self.run
        size_hint = st.st_size
        sparse = st.st_blocks * 512 < st.st_size
        regions: list[tuple[int, int | None]] = (
            list(_data_regions(fd, size_hint)) if sparse else [(0, None)]
        )
        chunker = _Chunker(run, m.extents)
        dfd = self._open_direct(fd)
        try:
            pos = self._read_regions(fd, dfd, regions, chunker, h)
        finally:
            if dfd is not None:
                os.close(dfd)
        if sparse and pos < size_hint:
            hash_zeros(h, size_hint - pos)
            pos = size_hint
        self._finish(entry, m, pos, h, st, _io(os.fstat, fd))
        chunker.close(m)

    def _open_direct(self, fd: int) -> int | None:
        """The file again, for direct reads, if most of it is not in the page cache.

        Reading a cold file through the page cache costs a page for every 4 KiB
        and evicts what the machine keeps cached; a warm one is read from there.
        """
        run = self.run
        if not run.direct_reads:
            return None
        fraction = cached_fraction(fd)
        if fraction is None or fraction >= 0.5:
            return None
        path = f"/proc/self/fd/{fd}"
        try:
            return _noatime(lambda f: os.open(path, f), os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            run.direct_reads = False  # refused here, or no /proc: read through the cache
            return None

    def _read_regions(
        self,
        fd: int,
        dfd: int | None,
        regions: list[tuple[int, int | None]],
        chunker: _Chunker,
        h: Any,
    ) -> int:
        """Read the data regions into chunks (from ``dfd`` where given); returns the end."""
        run = self.run
        chunk_size = run.options.chunk_size
        pos = 0
        got = 0
        for start, end in regions:
            hash_zeros(h, start - pos)
            pos = start
            while end is None or pos < end:
                run.coordinator.check()
                want = chunk_size if end is None else min(chunk_size, end - pos)
                direct = run.direct_reads and pos % ALIGN == 0
                frame = run.frames.take()
                lead = run.frames.lead
                with memoryview(frame) as whole:
                    into = whole[lead : lead + want]
                    if dfd is not None and direct:
                        try:
                            got = pread_direct_into(dfd, into, pos)
                        except OSError as exc:
                            if not refused(exc):
                                raise _Unreadable(exc.strerror or str(exc)) from None
                            run.direct_reads = direct = False  # read through the cache from now
                    if dfd is None or not direct:
                        got = _io(os.preadv, fd, [into], pos)
                    into.release()
                if not got:
                    run.frames.give(frame)
                    break
                data = memoryview(frame)[lead : lead + got]
                h.update(data)
                run.read_bytes(got)
                chunker.add(pos, data, frame)
                pos += got
                if end is None and got < want:
                    break
        return pos


class _SmallFiles:
    """The scanner's own reader of small files, with the kernel reading ahead.

    Handing each of thousands of tiny files to a reader thread costs more
    than reading it: the threads then contend for the interpreter lock at
    every system call. So the scanning thread reads small files itself.
    A file whose bytes are all in the page cache (a no-wait read tells) is
    read at once. Any other one is opened, the kernel is asked to read it
    ahead (``POSIX_FADV_WILLNEED``, which does not wait), and it is set
    aside; it is read once ``AHEAD_FILES`` more files were set aside or the
    scan is ``AHEAD_SPAN`` entries further, by when its bytes are usually
    in memory. A cold tree is thus read with many requests in flight
    without a second thread. The manifest's reorder buffer (far larger than
    ``AHEAD_SPAN``) never waits on a file set aside.
    """

    def __init__(self, run: _Run, reader: _FileReader, manifest: _ManifestWriter) -> None:
        self._run, self._reader, self._manifest = run, reader, manifest
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._ahead: collections.deque[tuple[int, Entry, int]] = collections.deque()

    def read(self, seq: int, entry: Entry) -> None:
        try:
            fd = _open(entry)
        except _Unreadable:
            self._reader.read(seq, entry, self._manifest)  # fails again, and reports it
            return
        try:
            done = self._read_cached(seq, entry, fd)
        except BaseException:
            os.close(fd)
            raise
        if done:
            os.close(fd)
            return
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        self._ahead.append((seq, entry, fd))
        if len(self._ahead) > AHEAD_FILES:
            self._read_one()

    def due(self, seq: int) -> None:
        """Read the files set aside ``AHEAD_SPAN`` or more entries before ``seq``."""
        ahead = self._ahead
        while ahead and seq - ahead[0][0] >= AHEAD_SPAN:
            self._read_one()

    def flush(self) -> None:
        while self._ahead:
            self._read_one()

    def close(self) -> None:
        """Close the files still set aside (after a failure)."""
        while self._ahead:
            os.close(self._ahead.popleft()[2])

    def _read_one(self) -> None:
        self._run.coordinator.check()
        seq, entry, fd = self._ahead.popleft()
        self._reader.read(seq, entry, self._manifest, fd)

    def _read_cached(self, seq: int, entry: Entry, fd: int) -> bool:
        """Read the file now if the page cache holds all of it; False leaves it for later.

        Anything out of the ordinary (an error, a short read, holes, a file
        that grew) also returns False: the ordinary path handles and reports it.
        """

        if not self._nowait:
            return False
        run = self._run
        try:
            if _has_holes(fd, entry.size, entry.blocks):
                return False
        except OSError:
            return False
        room = run.packer.room()  # (may seal a pack: its errors are the run's, not the file's)
        try:
            try:
                n = os.preadv(fd, [room], 0, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait = False  # this kernel or file system cannot say
                return False
            if n != entry.size:
                return False
            after = os.fstat(fd)
        except OSError:
            return False
        m = _manifest_entry(entry)
        with room[:n] as data:
            self._reader.hashed(entry, m, data, after)
        if n:
            run.packer.commit(n, m)
        run.file_done(n)
        self._manifest.complete(seq, m)
        return True


def _read_stream(run: _Run, stream: BinaryIO, name: str) -> ManifestEntry:
    """A stream of unknown length as one file entry (``cryo backup -``)."""
    import xxhash

    now = time.time_ns()
    m = ManifestEntry(
        path=name.encode("utf-8"),
        kind=KIND_FILE,
        mode=0o600,
        uid=os.getuid(),
        gid=os.getgid(),
        mtime_ns=now,
        ctime_ns=now,
    )
    h = xxhash.xxh3_128()
    chunker = _Chunker(run, m.extents)
    pos = 0
    while True:
        run.coordinator.check()
        data = _read_full(stream, run.options.chunk_size)
        if not data:
            break
        h.update(data)
        run.read_bytes(len(data))
        chunker.add(pos, data)
        pos += len(data)
    m.size = pos
    m.xxh3 = h.hexdigest()
    chunker.close(m)
    return m


def _read_full(stream: BinaryIO, n: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        piece = stream.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def path_key(path: bytes) -> str:
    """A short hash naming a path in object metadata."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(path)


def compact_record(m: ManifestEntry) -> str | None:
    """A one-object file's entry as a MetadataString, or None if it does not fit."""
    if m.warning is not None or len(m.extents) != 1:
        return None
    x = m.extents[0]
    record = {
        "h": path_key(m.path),
        "s": m.size,
        "m": m.mtime_ns,
        "c": m.ctime_ns,
        "i": m.ino,
        "x": m.xxh3,
        "o": x.file_offset,
        "l": x.length,
    }
    text = json.dumps(record, separators=(",", ":"))
    return text if len(text) <= MAX_METADATA_STRING_BYTES else None


def _unchanged(old: ManifestEntry, e: Entry) -> bool:
    return (
        old.kind == KIND_FILE
        and old.warning is None
        and old.xxh3 is not None
        and (old.size, old.mtime_ns, old.ctime_ns, old.ino)
        == (e.size, e.mtime_ns, e.ctime_ns, e.ino)
    )


def _same_inode_state(r: dict[str, Any], e: Entry) -> bool:
    """Whether base record ``r`` still describes ``e`` exactly.

    Any change to an inode's content or metadata (mode, owner, xattrs,
    times, size) moves its ctime, so equal inode, ctime, mtime and size mean
    the old line can be written again as it is, without reading anything.
    """
    return (
        r.get("t") == e.kind
        and e.kind != KIND_HARDLINK
        and r.get("ino") == e.ino
        and r.get("ct") == e.ctime_ns
        and r.get("mt") == e.mtime_ns
        and r.get("s", 0) == e.size
        and (r.get("m"), r.get("u"), r.get("g")) == (e.mode, e.uid, e.gid)
        and "w" not in r
        and (e.kind != KIND_FILE or "xx" in r)
        and (e.kind != KIND_SYMLINK or get_bytes(r, "l") == e.target)
    )


def _order_key(path: bytes) -> list[bytes]:
    return path.split(b"/")


_Raw = tuple[bytes, dict[str, Any]]


class _Reuse:
    """Finds, for each scanned entry, a stored copy that is still current.

    Two sources: the base job's manifest, read with a forward cursor in
    step with the scan (both are in the same order), whose unchanged lines
    are written again as they are; and the entries a resumed run's
    completed objects describe, keyed by path hash.
    """

    def __init__(self, base: Iterator[_Raw] | None, resumed: dict[str, ManifestEntry]) -> None:
        self._base = base
        self._cur: _Raw | None = None
        self._cur_path = b""
        self._cur_key: list[bytes] | None = None
        self._resumed = resumed
        self._advance()

    def _advance(self) -> None:
        item = None
        if self._base is not None:
            try:
                item = next(self._base, None)
            except (ManifestError, CorruptData):  # a damaged base only costs re-reading
                self._base = None
        path = get_bytes(item[1], "p") if item is not None else None
        if item is None or path is None:
            self._cur, self._base = None, None
            return
        self._cur, self._cur_path, self._cur_key = item, path, None

    def find(self, e: Entry) -> _Raw | ManifestEntry | None:
        """The base line to write again, a resumed entry to reuse, or None."""
        if self._cur is not None and self._cur_path != e.path:
            # Out of step (entries added or removed): skip base lines that sort before.
            key = _order_key(e.path)
            while self._cur is not None:
                if self._cur_key is None:
                    self._cur_key = _order_key(self._cur_path)
                if self._cur_key >= key:
                    break
                self._advance()
        cur = self._cur
        if cur is not None and self._cur_path == e.path:
            self._advance()  # each base line matches one entry at most
            if _same_inode_state(cur[1], e):
                return cur
        if e.kind == KIND_FILE and self._resumed:
            mine = self._resumed.get(path_key(e.path))
            if mine is not None and _unchanged(mine, e):
                return mine
        return None


def _resumed_entries(backend: Any, job: Job) -> dict[str, ManifestEntry]:
    """Entries described by the objects an earlier attempt at ``job`` completed."""
    base_names: set[str] = set()
    if job.base_job_id is not None:
        # A base deleted since leaves its objects to be read like ours, then ignored.
        with contextlib.suppress(ResourceNotFoundException):
            base_names = {o.name for o in iter_objects(backend, job.base_job_id)}
    found: dict[str, ManifestEntry] = {}
    for o in iter_objects(backend, job.job_id):
        if o.name == MANIFEST_OBJECT or o.name in base_names:
            continue
        meta = o.metadata_string or ""
        if meta == ENTRIES_MARKER:
            md = backend.get_object_metadata(job.job_id, o.object_token)
            if md.metadata_blob_checksum != chunk_checksum(md.metadata_blob):
                continue
            try:
                for r in parse_lines(iter([md.metadata_blob])):
                    m = ManifestEntry.from_json(r)
                    found[path_key(m.path)] = m
            except ManifestError:
                continue
        elif meta.startswith("{"):
            try:
                r = json.loads(meta)
                found[str(r["h"])] = ManifestEntry(
                    path=b"",
                    kind=KIND_FILE,
                    size=int(r["s"]),
                    mtime_ns=int(r["m"]),
                    ctime_ns=int(r["c"]),
                    ino=int(r["i"]),
                    xxh3=str(r["x"]),
                    extents=[Extent(int(r["o"]), o.name, 0, 0, int(r["l"]))],
                )
            except (ValueError, KeyError, TypeError):
                continue
    return found


def _resolve_base(backend: Any, options: BackupOptions, host: str, paths: list[str]) -> str | None:
    if options.stdin_name is not None or options.full:
        return None
    if options.base_job_id is not None:
        return options.base_job_id
    base = find_base(backend, host, paths, options.pool_id)
    return base.job_id if base is not None else None


def _continues(rec: PendingRun, options: BackupOptions) -> bool:
    """Whether this run asks for the same pool and base as the unfinished one."""
    if rec.pool != options.pool_id:
        return False
    if options.full:
        return rec.base_job_id is None
    return options.base_job_id in (None, rec.base_job_id)


def _start_job(
    run: _Run,
    options: BackupOptions,
    pending: PendingRecord | None,
    host: str,
    paths: list[str],
    attributes: dict[str, object],
) -> Job:
    """Create the job, or find the unfinished one this run continues."""
    backend = run.backend
    if options.client_token is not None:
        earlier = find_token_job(backend, options.client_token)
        if earlier is not None:  # a rerun: the job keeps the base it was created with
            base = earlier.base_job_id
        else:
            base = _resolve_base(backend, options, host, paths)
        return backend.create_job(options.client_token, base, options.pool_id, attributes)  # type: ignore[no-any-return]
    for _ in range(2):
        rec = pending.load() if pending is not None else None
        if rec is not None and _continues(rec, options):
            token, base = rec.token, rec.base_job_id
        else:
            token, base = str(uuid.uuid4()), _resolve_base(backend, options, host, paths)
            if pending is not None:
                pending.save(PendingRun(token, base, options.pool_id))
        try:
            job: Job = backend.create_job(token, base, options.pool_id, attributes)
        except IllegalArgumentException:
            if rec is None or pending is None:
                raise
            pending.clear()  # the recorded job was deleted or is unusable: start anew
            continue
        if job.status in FINAL_STATUSES and pending is not None:
            pending.clear()  # it completed after all; this run makes a new job
            continue
        return job
    raise IllegalArgumentException("could not create a job for this backup")


def _summary_of(job: Job) -> BackupSummary:
    """The summary of a job an earlier run with the same client token completed."""

    def n(key: str) -> int:
        return int_attribute(job, key) or 0

    return BackupSummary(
        job_id=job.job_id,
        status=job.status,
        files=n("files"),
        entries=n("entries"),
        bytes_read=0,
        bytes_stored=0,
        chunks=0,
        retries=0,
        warnings=(),
        seconds=0.0,
        files_unchanged=n("files_unchanged"),
        source_bytes=n("source_bytes"),
        base_job_id=job.base_job_id,
        already_complete=True,
    )


def run_backup(
    backend: Any,
    options: BackupOptions,
    on_event: EventSink = ignore,
    stdin: BinaryIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    pending: PendingRecord | None = None,
) -> BackupSummary:
    """Back up ``options.paths`` (or ``stdin``) into a new job; returns its summary.

    With ``pending`` (paths only), the client token is taken from, or saved
    to, that record, so a rerun after a failure continues the same job.
    """
    started = clock()
    run = _Run(backend, options, on_event)
    host = socket.gethostname()
    roots = canonical_roots(list(options.paths))
    paths = (
        [options.stdin_name or "stdin"] if options.stdin_name is not None
        else [display_path(p) for p in roots]
    )  # fmt: skip
    attempt = secrets.token_hex(8)
    job = _start_job(
        run,
        options,
        pending if options.stdin_name is None else None,
        host,
        paths,
        {
            "host": host,
            "paths": paths,
            "tags": list(options.tags),
            "cryo": __version__,
            "stdin": options.stdin_name is not None,
            "attempt": attempt,
        },
    )
    if job.status in FINAL_STATUSES:
        return _summary_of(job)
    run.job_id = job.job_id
    resumed = job.attributes.get("attempt") != attempt
    reuse = None
    if options.stdin_name is None and (job.base_job_id is not None or resumed):
        base_lines = None
        if job.base_job_id is not None:
            reader = JobReader(run.backend, job.job_id)
            if MANIFEST_OBJECT in reader.objects:
                base_lines = raw_entries(reader.manifest_chunks())
        reuse = _Reuse(base_lines, _resumed_entries(run.backend, job) if resumed else {})
    manifest = _ManifestWriter(
        run,
        header(
            job=job.job_id,
            host=host,
            paths=paths,
            chunk_size=options.chunk_size,
            created=job.created.isoformat(),
            base=job.base_job_id,
        ),
    )
    ticker = Ticker(lambda: on_event(run.progress("backup")))
    ticker.start()
    if options.estimate_totals and options.stdin_name is None:
        threading.Thread(
            target=run.estimate, args=(roots, ticker.stopped), name="estimate", daemon=True
        ).start()
    reader_ = _FileReader(run)
    small = _SmallFiles(run, reader_, manifest)
    deleted = 0
    try:
        try:
            if options.stdin_name is not None:
                stream = stdin if stdin is not None else sys.stdin.buffer
                seq = manifest.reserve()
                entry = _read_stream(run, stream, options.stdin_name)
                run.file_done(entry.size)
                manifest.complete(seq, entry)
            else:
                # With a base, extended attributes are read only for entries that changed.
                lazy = reuse is not None and options.scan.xattrs
                check, reserve = run.coordinator.check, manifest.reserve
                find = reuse.find if reuse is not None else None
                for e in scan(roots, options.scan, run.warn, lazy_xattrs=lazy):
                    check()
                    seq = reserve()
                    small.due(seq)
                    old = find(e) if find is not None else None
                    if isinstance(old, tuple):
                        if e.kind == KIND_FILE:
                            run.file_done(e.size, unchanged=True)
                        extents = old[1].get("d")
                        manifest.complete_raw(
                            seq, old[0], [d[1] for d in extents] if extents else []
                        )
                        continue
                    if lazy:
                        load_xattrs(e)
                    if e.kind == KIND_FILE and old is None:
                        if e.size >= options.pack_threshold:
                            run.readers.submit(reader_.read, seq, e, manifest)
                        else:
                            small.read(seq, e)
                    else:
                        m = _manifest_entry(e)
                        if old is not None:
                            m.extents = list(old.extents)
                            m.xxh3 = old.xxh3
                            run.file_done(m.size, unchanged=True)
                        manifest.complete(seq, m)
            small.flush()
            run.readers.shutdown(wait=True)
            run.coordinator.raise_if_failed()
            run.packer.close()
            manifest.close()
            run.pack_cpu.shutdown(wait=True)
            run.cpu.shutdown(wait=True)
            run.coordinator.raise_if_failed()
            run.uploads.shutdown(wait=True)
            run.coordinator.raise_if_failed()
            if reuse is not None:
                deleted = _drop_unreferenced(run, manifest.referenced)
            with manifest.obj.lock:
                manifest.obj.completed = True
            run.complete_object(manifest.obj)
        except BaseException as exc:
            run.coordinator.fail(exc)
            small.close()
            for ex in (run.readers, run.pack_cpu, run.cpu, run.uploads):
                ex.shutdown(wait=False)
            if run.coordinator.error is not None and run.coordinator.error is not exc:
                raise run.coordinator.error from None
            raise
    finally:
        ticker.stop()
    status = JOB_PARTIAL if run.warnings else JOB_COMPLETED
    seconds = clock() - started
    run.backend.complete_job(
        job.job_id,
        status=status,
        attributes={
            "files": run.files,
            "files_unchanged": run.files_unchanged,
            "entries": manifest.count,
            "source_bytes": run.source_bytes,
            "bytes_read": run.bytes_read,
            "bytes_stored": run.bytes_stored,
            "objects_deleted": deleted,
            "warnings": len(run.warnings),
            "seconds": round(seconds, 3),
        },
    )
    if pending is not None and options.client_token is None:
        pending.clear()
    on_event(run.progress("done"))
    return BackupSummary(
        job_id=job.job_id,
        status=status,
        files=run.files,
        entries=manifest.count,
        bytes_read=run.bytes_read,
        bytes_stored=run.bytes_stored,
        chunks=run.chunks,
        retries=run.backend.retries,
        warnings=tuple(run.warnings),
        seconds=seconds,
        files_unchanged=run.files_unchanged,
        source_bytes=run.source_bytes,
        base_job_id=job.base_job_id,
        resumed=resumed,
        objects_deleted=deleted,
    )


def _drop_unreferenced(run: _Run, referenced: set[str]) -> int:
    """DeleteObject every object of the job that no entry uses; returns how many."""
    names = [
        o.name
        for o in iter_objects(run.backend, run.job_id)
        if o.name != MANIFEST_OBJECT and o.name not in referenced
    ]
    for name in names:
        # Not found: a retry whose first attempt deleted it, though its reply was lost.
        with contextlib.suppress(ResourceNotFoundException):
            run.backend.delete_object(run.job_id, name)
    return len(names)
