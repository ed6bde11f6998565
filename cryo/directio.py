"""Direct I/O: reading and writing large runs of bytes around the page cache.

Bytes written through the page cache cost a page allocation and a copy
each, and they push out what the machine keeps cached; on virtual machines
whose host reclaims free guest memory, a fresh page is dearer still (here,
writing 1.25 GiB cost 1.5 to 2.7 s of system time through the page cache and
0.1 to 0.3 s around it). Bytes that are written once and not read again soon,
a backup's chunk files and a restore's large files, are therefore written
with ``O_DIRECT``; and a large file a backup finds mostly outside the page
cache (``cached_fraction``) is read with ``O_DIRECT``, and so is a chunk file
a restore finds on disk: reading a cold 1.3 GiB through the cache cost 2.7 s
of system time here, around it 0.6 s. ``preallocate`` reserves a file's
blocks so that direct writes into it run side by side.

Direct I/O needs the buffer address, the file offset and the length aligned
(``ALIGN`` satisfies every common device), so bytes are copied into a reused
page-aligned staging buffer (``STAGE`` bytes, from a shared pool) and
written from there. A file system that refuses direct I/O (``EINVAL``)
gets ordinary writes: callers fall back, and never fail for it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
from typing import Any

ALIGN = 4096
"""Alignment of buffer addresses, file offsets and lengths for direct I/O."""
STAGE = 1024 * 1024
"""Size of one staging buffer: bytes gathered before one direct write."""


class BufferPool:
    """Page-aligned buffers, reused so their pages are touched once.

    Sizes are powers of two from ``STAGE`` up, and at most ``KEEP`` of each
    size are kept, so the pool stays small whatever sizes are asked for.
    """

    KEEP = 16

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def take(self, size: int = STAGE) -> mmap.mmap:
        """A buffer of at least ``size`` bytes."""
        size = max(STAGE, 1 << (size - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        # Private: an anonymous mapping is shared by default, and a forked process
        # (a restore's helpers) would read into the very pages its parent reads into.
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < self.KEEP:
                free.append(buf)
                return
        with contextlib.suppress(BufferError):  # a view still held (a traceback's): freed with it
            buf.close()


BUFFERS = BufferPool()


def refused(exc: OSError) -> bool:
    """Whether an error means "this file system does not do direct I/O"."""
    return exc.errno == errno.EINVAL


def aligned(view: memoryview) -> bool:
    """Whether ``view``'s memory starts on an ``ALIGN`` boundary (False if it cannot tell)."""
    if view.readonly:
        return False
    try:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0
    except (ImportError, TypeError, ValueError):
        return False


def pwrite_direct(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write ``data`` at ``offset`` of ``fd`` (opened with ``O_DIRECT``); returns bytes written.

    ``offset`` and ``len(data)`` must be multiples of ``ALIGN``. Fewer bytes
    than asked are returned when the kernel writes less (the caller writes
    the rest another way); ``EINVAL`` is raised when direct I/O is refused.
    """
    view = memoryview(data).cast("B")
    assert offset % ALIGN == 0 and len(view) % ALIGN == 0, "unaligned direct write"
    if aligned(view):  # straight from the caller's memory
        done = 0
        while done < len(view):
            wrote = os.pwrite(fd, view[done:], offset + done)
            done += wrote
            if wrote == 0 or wrote % ALIGN:
                break
        return done
    buf = BUFFERS.take()
    done = 0
    try:
        with memoryview(buf) as staged:
            while done < len(view):
                n = min(STAGE, len(view) - done)
                staged[:n] = view[done : done + n]
                wrote = os.pwrite(fd, staged[:n], offset + done)
                done += wrote
                if wrote != n:
                    break
    finally:
        BUFFERS.give(buf)
    return done


def pread_direct(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` of ``fd`` (opened with ``O_DIRECT``); fewer at the end.

    One request for all of it (large requests are what keep a device busy
    without the kernel's read-ahead). ``offset`` must be a multiple of
    ``ALIGN``; ``n`` need not be. ``EINVAL`` is raised when direct I/O is
    refused.
    """
    assert offset % ALIGN == 0, "unaligned direct read"
    ask = -(-n // ALIGN) * ALIGN
    buf = BUFFERS.take(ask)
    try:
        with memoryview(buf) as staged:
            return bytes(staged[: _read_aligned(fd, staged, n, offset)])
    finally:
        BUFFERS.give(buf)


def pread_direct_into(fd: int, out: memoryview, offset: int) -> int:
    """``pread_direct`` into ``out`` (any alignment); returns the bytes read."""
    assert offset % ALIGN == 0, "unaligned direct read"
    n = len(out)
    buf = BUFFERS.take(-(-n // ALIGN) * ALIGN)
    try:
        with memoryview(buf) as staged:
            got = _read_aligned(fd, staged, n, offset)
            out[:got] = staged[:got]
            return got
    finally:
        BUFFERS.give(buf)


def _read_aligned(fd: int, staged: memoryview, n: int, offset: int) -> int:
    """Read up to ``n`` bytes at ``offset`` into the aligned ``staged``; returns how many."""
    ask = -(-n // ALIGN) * ALIGN
    got = 0
    while got < n:
        k = os.preadv(fd, [staged[got:ask]], offset + got)
        got += k
        if k == 0 or got % ALIGN:
            break  # the end of the file
    return min(got, n)


_send_direct = True
"""Whether ``send_file`` reads cold files with ``O_DIRECT`` (until it is refused)."""


def send_file(sock: Any, file: Any, length: int) -> int:
    """Send the first ``length`` bytes of ``file`` on ``sock``; returns the bytes sent.

    A file mostly in the page cache goes out with ``sendfile``. A cold one
    is read with ``O_DIRECT`` into a reused buffer and sent from there: the
    pages the kernel would read it into are fresh ones, and on a virtual
    machine the first touch of a fresh page is dear (here, 1.3 GiB of cold
    chunk files sent with ``sendfile`` cost the receiving process over a
    second more system time than the same bytes sent from a reused buffer).
    """
    global _send_direct
    fd = file.fileno()
    share = cached_fraction(fd, length) if length >= ALIGN and _send_direct else None
    if share is not None and share < 0.5:
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError:
            dfd = None  # refused here, or no /proc: through the page cache from now on
            _send_direct = False
        if dfd is not None:
            buf = BUFFERS.take(-(-length // ALIGN) * ALIGN)
            try:
                with memoryview(buf) as staged:
                    try:
                        got = _read_aligned(dfd, staged, length, 0)
                    except OSError as exc:
                        if not refused(exc):
                            raise
                        got = -1  # refused at the read: through the page cache from now on
                        _send_direct = False
                    if got >= 0:
                        sock.sendall(staged[:got])
                        return got
            finally:
                BUFFERS.give(buf)
                os.close(dfd)
    return int(sock.sendfile(file, 0, length)) if length else 0


_fallocate: Any = None


def preallocate(fd: int, size: int) -> bool:
    """Allocate the first ``size`` bytes of ``fd`` (``fallocate``); False where unsupported.

    Direct writes into allocated (unwritten) blocks can run side by side in
    one file, where writes that must allocate take the file's lock in turn;
    the blocks also come out contiguous. A full file system raises ENOSPC
    here, before any byte is written. Never emulated by writing zeros.
    """
    global _fallocate
    if _fallocate is None:
        _fallocate = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = getattr(libc, "fallocate64", None) or libc.fallocate  # a 64-bit off_t
            except (OSError, AttributeError):
                pass
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                _fallocate = (ctypes, fn)
    if _fallocate is False or size <= 0:
        return False
    ctypes, fn = _fallocate
    while fn(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    return True


_CACHESTAT = 451
"""The cachestat system call (Linux 6.5 and later; one number on every architecture)."""
_cachestat: Any = None


def cached_fraction(fd: int, size: int | None = None) -> float | None:
    """The share of a file's pages in the page cache, or None where the kernel cannot say.

    Asks ``cachestat``, which, unlike a no-wait read, starts no read-ahead.
    ``size``: the file's size, when the caller has it already.
    """
    global _cachestat
    if _cachestat is False:
        return None
    if _cachestat is None:
        _cachestat = _load_cachestat()
        if _cachestat is False:
            return None
    ctypes, syscall, range_type, stat_type = _cachestat
    if size is None:
        size = os.fstat(fd).st_size
    if size == 0:
        return 1.0
    rng, stat = range_type(0, 0), stat_type()
    if syscall(_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() == errno.ENOSYS:  # an older kernel: never ask again
            _cachestat = False
        return None  # e.g. EPERM for a file neither ours nor writable: this file only
    return min(1.0, float(stat.nr_cache) * mmap.PAGESIZE / size)


def _load_cachestat() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]  # len 0: to the end

    class Stat(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_uint64)
            for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently")
        ]

    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return False
    return ctypes, syscall, Range, Stat
