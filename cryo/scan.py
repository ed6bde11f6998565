"""Walking the file system: what a backup will contain, in a fixed order.

``scan`` yields one ``Entry`` per file system object under the given roots,
parents before children, children sorted by the bytes of their names, so
two scans of the same tree yield the same sequence. Paths are bytes (names
that are not UTF-8 survive) and are stored relative to ``/``. Symlinks are
recorded, never followed; a second path to an inode with several links is
recorded as a hard link to the first; FIFOs, sockets and devices are
recorded and never opened. The parents of each root are recorded too, so a
restore can recreate their modes and owners.

Excludes follow restic's rules: a pattern without ``/`` matches any name
component, one with ``/`` matches the whole absolute path (``fnmatch``
syntax). ``exclude_caches`` skips the contents of directories holding a
valid ``CACHEDIR.TAG``; ``one_file_system`` does not descend into other
file systems. An unreadable directory is reported and recorded without its
contents; the walk goes on.

Memory does not grow with the size of the tree: the walk holds, for each
directory on the way down, only the sorted names still to visit, and stats
each entry when it comes to it. Paths longer than one system call takes
(``PATH_MAX``) are reached through directory descriptors (``open_path`` and
the other helpers below), so any depth the file system allows is backed up.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
PATH_MAX = 4096
"""Longest path (with its NUL) a system call takes; longer ones go through directory fds."""
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)

KIND_FILE = "f"
KIND_DIR = "d"
KIND_SYMLINK = "l"
KIND_HARDLINK = "h"
KIND_FIFO = "p"
KIND_SOCKET = "s"
KIND_CHAR = "c"
KIND_BLOCK = "b"


@dataclass(slots=True)
class Entry:
    """One file system object as the backup records it."""

    path: bytes
    """Relative to ``/``, no leading slash."""
    source: bytes
    """Absolute path to read from."""
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    ino: int = 0
    dev: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    blocks: int = 0
    """512-byte blocks allocated (fewer than the size says: perhaps sparse)."""
    target: bytes | None = None
    user: str | None = None
    group: str | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScanOptions:
    excludes: tuple[bytes, ...] = ()
    exclude_caches: bool = False
    one_file_system: bool = False
    xattrs: bool = True


_users: dict[int, str | None] = {}
_groups: dict[int, str | None] = {}


def _user(uid: int) -> str | None:
    if uid not in _users:
        try:
            _users[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _users[uid] = None
    return _users[uid]


def _group(gid: int) -> str | None:
    if gid not in _groups:
        try:
            _groups[gid] = grp.getgrgid(gid).gr_name
        except KeyError:
            _groups[gid] = None
    return _groups[gid]


_KINDS = {
    stat.S_IFREG: KIND_FILE,
    stat.S_IFDIR: KIND_DIR,
    stat.S_IFLNK: KIND_SYMLINK,
    stat.S_IFIFO: KIND_FIFO,
    stat.S_IFSOCK: KIND_SOCKET,
    stat.S_IFCHR: KIND_CHAR,
    stat.S_IFBLK: KIND_BLOCK,
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), KIND_BLOCK)


def _open_dir(path: bytes) -> int:
    """A descriptor (O_PATH) of directory ``path``, however long, opened piece by piece."""
    fd: int | None = None
    rest = path
    try:
        while True:
            if len(rest) < PATH_MAX:
                piece, rest = rest, b""
            else:
                cut = rest.rfind(b"/", 1, PATH_MAX - 1)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
                piece, rest = rest[:cut], rest[cut + 1 :]
            nfd = os.open(piece, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            if fd is not None:
                os.close(fd)
            fd = nfd
            if not rest:
                return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


@contextlib.contextmanager
def _located(path: bytes) -> Iterator[tuple[int | None, bytes]]:
    """``path`` as (directory fd, name) for the ``*at`` calls; (None, path) if it is short."""
    if len(path) < PATH_MAX:
        yield None, path
        return
    parent, name = os.path.split(path)
    fd = _open_dir(parent)
    try:
        yield fd, name
    finally:
        os.close(fd)


# The three below run once per entry: a short path goes straight to the system call.


def lstat_path(path: bytes) -> os.stat_result:
    if len(path) < PATH_MAX:
        return os.lstat(path)
    with _located(path) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def open_path(path: bytes, flags: int, mode: int = 0o777) -> int:
    """``os.open`` for a path of any length (the last component as ``flags`` say)."""
    if len(path) < PATH_MAX:
        return os.open(path, flags, mode)
    with _located(path) as (fd, name):
        return os.open(name, flags, mode, dir_fd=fd)


def readlink_path(path: bytes) -> bytes:
    if len(path) < PATH_MAX:
        return os.readlink(path)
    with _located(path) as (fd, name):
        return os.readlink(name, dir_fd=fd)


def list_names(path: bytes) -> list[bytes]:
    """The names in directory ``path``, sorted by their bytes."""
    if len(path) < PATH_MAX:
        with os.scandir(path) as it:
            return sorted(d.name for d in it)
    fd = open_path(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            return sorted(os.fsencode(d.name) for d in it)
    finally:
        os.close(fd)


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """Extended attributes of ``path`` (not following symlinks); empty where unsupported."""
    if len(path) < PATH_MAX:
        return _xattrs_of(path)
    try:
        with _located(path) as (fd, name):
            assert fd is not None  # a long path is reached through its directory
            return _xattrs_of(b"/proc/self/fd/%d/%s" % (fd, name))
    except OSError:
        return {}


def _xattrs_of(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[name.encode("utf-8", "surrogateescape")] = os.getxattr(
                path, name, follow_symlinks=False
            )
        except OSError:
            continue
    return out


def entry_for(source: bytes, st: os.stat_result, xattrs: bool = True) -> Entry:
    kind = _kind(st.st_mode)
    e = Entry(
        path=source.lstrip(b"/"),
        source=source,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        size=st.st_size if kind == KIND_FILE else 0,
        ino=st.st_ino,
        blocks=st.st_blocks,
        dev=st.st_dev,
        ctime_ns=st.st_ctime_ns,
        user=_users[st.st_uid] if st.st_uid in _users else _user(st.st_uid),
        group=_groups[st.st_gid] if st.st_gid in _groups else _group(st.st_gid),
    )
    if kind == KIND_SYMLINK:
        e.target = readlink_path(source)
    elif kind in (KIND_CHAR, KIND_BLOCK):
        e.rdev = st.st_rdev
    if xattrs and kind != KIND_SYMLINK:
        e.xattrs = read_xattrs(source)
    return e


def _excluded(path: bytes, name: bytes, patterns: tuple[bytes, ...]) -> bool:
    for p in patterns:
        if b"/" in p:
            if fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip(b"/")):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _is_cache_dir(path: bytes) -> bool:
    """Whether ``path`` holds a valid CACHEDIR.TAG; only a regular file is ever opened."""
    try:
        with _located(os.path.join(path, b"CACHEDIR.TAG")) as (dir_fd, name):
            if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd).st_mode):
                return False  # a FIFO would block, a device could be anything
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since: never read it
            return False
        return os.pread(fd, len(CACHEDIR_SIGNATURE), 0) == CACHEDIR_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)


def canonical_roots(roots: list[bytes]) -> list[bytes]:
    """Roots in backup order: normalised, sorted by path components, nested ones dropped.

    Sorting makes two backups of the same paths scan in the same order
    whatever order the paths were given in; a root inside another root is
    already covered by it.
    """
    out: list[bytes] = []
    for root in sorted({os.path.normpath(r) for r in roots}, key=lambda r: r.split(b"/")):
        if out and (root == out[-1] or root.startswith(out[-1].rstrip(b"/") + b"/")):
            continue
        out.append(root)
    return out


def load_xattrs(entry: Entry) -> None:
    """Read ``entry``'s extended attributes (for a scan made with ``lazy_xattrs``)."""
    if entry.kind != KIND_SYMLINK:
        entry.xattrs = read_xattrs(entry.source)


def scan(
    roots: list[bytes],
    options: ScanOptions,
    warn: Callable[[bytes, str], None],
    lazy_xattrs: bool = False,
) -> Iterator[Entry]:
    """Every entry under ``roots`` (absolute paths), in backup order.

    With ``lazy_xattrs`` extended attributes are left for the caller to read
    (``load_xattrs``) for the entries it needs them for.
    """
    if lazy_xattrs:
        options = ScanOptions(
            options.excludes, options.exclude_caches, options.one_file_system, xattrs=False
        )
    seen_parents: set[bytes] = set()
    hardlinks: dict[tuple[int, int], bytes] = {}
    for root in roots:
        parent = os.path.dirname(root)
        parents = []
        while parent not in (b"/", b"") and parent not in seen_parents:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(parents):
            seen_parents.add(p)
            try:
                yield entry_for(p, lstat_path(p), options.xattrs)
            except OSError as exc:
                warn(p, exc.strerror or str(exc))
        try:
            st = lstat_path(root)
        except OSError as exc:
            warn(root, exc.strerror or str(exc))
            continue
        seen_parents.add(root)
        yield from _walk(root, st, st.st_dev, options, warn, hardlinks)


def _walk(
    path: bytes,
    st: os.stat_result,
    root_dev: int,
    options: ScanOptions,
    warn: Callable[[bytes, str], None],
    hardlinks: dict[tuple[int, int], bytes],
) -> Iterator[Entry]:
    # One frame per directory on the way down: its path with a trailing slash
    # and the names still to visit, last first. Children are stat'ed only when their turn comes.
    frames: list[tuple[bytes, list[bytes]]] = []
    item: tuple[bytes, os.stat_result] | None = (path, st)
    while True:
        if item is None:
            while frames and not frames[-1][1]:
                frames.pop()
            if not frames:
                return
            prefix, names = frames[-1]
            child = prefix + names.pop()
            try:
                item = (child, lstat_path(child))
            except FileNotFoundError:
                continue  # vanished between listing and stat: it was never there
            except OSError as exc:
                warn(child, exc.strerror or str(exc))
                continue
        path, st = item
        item = None
        try:
            entry = entry_for(path, st, options.xattrs)
        except OSError as exc:
            warn(path, exc.strerror or str(exc))
            continue
        if entry.kind == KIND_FILE and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = hardlinks.get(key)
            if first is not None:
                entry.kind = KIND_HARDLINK
                entry.target = first
                entry.size = 0
            else:
                hardlinks[key] = entry.path
        yield entry
        if entry.kind != KIND_DIR:
            continue
        if options.one_file_system and st.st_dev != root_dev:
            continue
        cache_dir = options.exclude_caches and _is_cache_dir(path)
        try:
            names = list_names(path)
        except OSError as exc:
            warn(path, f"cannot list directory: {exc.strerror or exc}")
            continue
        if cache_dir:
            names = [n for n in names if n == b"CACHEDIR.TAG"]
        if options.excludes:
            names = [n for n in names if not _excluded(os.path.join(path, n), n, options.excludes)]
        names.reverse()
        frames.append((path if path.endswith(b"/") else path + b"/", names))
