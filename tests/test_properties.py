"""Property tests: generated trees round-trip, generated histories keep every job restorable.

The core runs in-process (``run_backup``, ``run_restore``, ``select_forget``) against an
embedded ``LocalBackend``, with chunks of a few hundred bytes to a few KiB so that chunk,
pack and manifest-chunk boundaries are cheap to hit. Trees are built on the ordinary
temporary directory (real holes, odd names); the repository goes to ``/dev/shm`` where
there is one, because every stored chunk is fsynced and on a disk that alone would cost
most of an example without bearing on what is tested here (durability is tested elsewhere).

Examples are derandomized and no example database is kept, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cryo.backup import BackupOptions, BackupSummary, run_backup
from cryo.jobs import RetentionPolicy, iter_jobs, select_forget
from cryo.restore import RestoreOptions, iter_bad_files, run_restore
from cryo.storage.local import LocalBackend

BLOCK = 4096
"""Holes are made in whole blocks of this size."""


def _repo_parent() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


# -- what a tree is made of ----------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The backup's size options, small so that every boundary is cheap to reach."""

    chunk_size: int
    pack_threshold: int
    pack_chunks: int

    def options(self, *roots: bytes, **kw: object) -> BackupOptions:
        return BackupOptions(
            paths=roots,
            chunk_size=self.chunk_size,
            pack_threshold=self.pack_threshold,
            pack_chunks=self.pack_chunks,
            connections=4,
            **kw,
        )


@dataclass(frozen=True)
class Content:
    """A file's bytes as a recipe (short to print, shrinks well)."""

    kind: str  # random | zeros | repeat | mixed
    size: int
    seed: int = 0
    unit: bytes = b"a"
    cut: int = 0

    def data(self) -> bytes:
        rnd = random.Random(self.seed)
        if self.kind == "random":
            return rnd.randbytes(self.size)
        if self.kind == "zeros":
            return bytes(self.size)
        if self.kind == "repeat":
            return (self.unit * (self.size // len(self.unit) + 1))[: self.size]
        cut = min(self.cut, self.size)
        return rnd.randbytes(cut) + bytes(self.size - cut)


@dataclass(frozen=True)
class File:
    content: Content
    mode: int = 0o644
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Sparse:
    """A file of ``size`` bytes with data only at ``regions`` (offset, length, seed)."""

    size: int
    regions: tuple[tuple[int, int, int], ...]
    mode: int = 0o644
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Symlink:
    target: bytes
    mtime_ns: int = 0


@dataclass(frozen=True)
class HardLink:
    """Another name for the ``index``-th regular file made (modulo their number)."""

    index: int


@dataclass(frozen=True)
class Dir:
    children: dict[bytes, Node] = field(default_factory=dict)
    mode: int = 0o755
    mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


Node = File | Sparse | Symlink | HardLink | Dir


def write_sparse(path: bytes, spec: Sparse) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, spec.size)
        for offset, length, seed in spec.regions:
            os.pwrite(fd, random.Random(seed).randbytes(length), offset)
    finally:
        os.close(fd)


def set_xattrs(path: bytes, xattrs: tuple[tuple[bytes, bytes], ...]) -> None:
    """Where the file system has no user xattrs, there are none to compare either."""
    for k, v in xattrs:
        with contextlib.suppress(OSError):
            os.setxattr(path, k, v)


def get_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def build(path: bytes, tree: Dir) -> None:
    """Make ``tree`` at ``path``: files first, hard links next, directories' metadata last."""
    files: list[bytes] = []
    links: list[tuple[bytes, int]] = []
    dirs: list[tuple[bytes, Dir]] = []

    def make(p: bytes, node: Node) -> None:
        if isinstance(node, Dir):
            os.mkdir(p, 0o700)
            for name, child in node.children.items():
                make(os.path.join(p, name), child)
            dirs.append((p, node))
        elif isinstance(node, File | Sparse):
            if isinstance(node, File):
                with open(p, "wb") as f:
                    f.write(node.content.data())
            else:
                write_sparse(p, node)
            set_xattrs(p, node.xattrs)
            os.chmod(p, node.mode)
            os.utime(p, ns=(node.mtime_ns, node.mtime_ns))
            files.append(p)
        elif isinstance(node, Symlink):
            os.symlink(node.target, p)
            os.utime(p, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
        else:
            links.append((p, node.index))

    make(path, tree)
    for p, index in links:
        if files:
            os.link(files[index % len(files)], p)
    for p, d in dirs:  # children before parents: a parent's mtime is set last
        set_xattrs(p, d.xattrs)
        os.chmod(p, d.mode)
        os.utime(p, ns=(d.mtime_ns, d.mtime_ns))


Snapshot = dict[bytes, tuple[object, ...]]


def snapshot(root: bytes, only: set[bytes] | None = None) -> Snapshot:
    """Every entry under ``root`` (root itself is ``b""``): kind, mode, mtime, content.

    Regular files also say whether they have holes and which path (the first in
    scan order) their inode was first seen under, so hard links are compared too.
    With ``only``, just those names of the root's are walked.
    """
    out: Snapshot = {}
    first: dict[int, bytes] = {}

    def visit(rel: bytes, full: bytes) -> None:
        st_ = os.lstat(full)
        mode = stat.S_IMODE(st_.st_mode)
        if stat.S_ISDIR(st_.st_mode):
            out[rel] = ("dir", oct(mode), st_.st_mtime_ns, get_xattrs(full))
            for name in sorted(os.listdir(full)):
                if rel or only is None or name in only:
                    visit(rel + b"/" + name if rel else name, os.path.join(full, name))
        elif stat.S_ISLNK(st_.st_mode):
            out[rel] = ("symlink", os.readlink(full), st_.st_mtime_ns)
        elif stat.S_ISREG(st_.st_mode):
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
            group = first.setdefault(st_.st_ino, rel) if st_.st_nlink > 1 else rel
            sparse = st_.st_blocks * 512 < st_.st_size
            out[rel] = (
                "file", oct(mode), st_.st_mtime_ns, st_.st_size, digest, sparse, group,
                get_xattrs(full),
            )  # fmt: skip
        else:
            out[rel] = ("other", oct(mode))

    visit(b"", root)
    return out


def restored_snapshot(
    backend: LocalBackend, job_id: str, root: bytes, scratch: bytes, only: set[bytes] | None = None
) -> Snapshot:
    """Restore ``job_id`` into a fresh directory under ``scratch``; the snapshot of its root."""
    with tempfile.TemporaryDirectory(dir=scratch) as name:  # its clean-up copes with 0o000
        target = os.fsencode(name)
        summary = run_restore(backend, job_id, RestoreOptions(target=target, connections=4))
        assert not summary.failures, summary.failures
        return snapshot(os.path.join(target, root.lstrip(b"/")), only)


# -- strategies ----------------------------------------------------------------------

layouts = st.builds(
    lambda cs, pt, pc: Layout(cs, max(1, int(cs * pt)), pc),
    st.sampled_from([512, 1024, 4096, 4097]),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.sampled_from([1, 2, 16]),
)

mtimes = st.one_of(
    st.sampled_from([0, 1, -1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789]),
    st.integers(-(2**31) * 10**9, 2**33 * 10**9),
)
# Without root, modes that lock the owner out would make the backup's reads fail.
_ROOT = os.geteuid() == 0
file_modes = st.sampled_from(
    [m for m in (0o644, 0o600, 0o755, 0o400, 0o000, 0o4755, 0o2640, 0o1600) if _ROOT or m & 0o400]
)
dir_modes = st.sampled_from(
    [m for m in (0o755, 0o700, 0o555, 0o1777, 0o2750, 0o000) if _ROOT or m & 0o700 == 0o700]
)

names = (
    st.one_of(
        st.binary(min_size=1, max_size=10),
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).map(str.encode),
        st.sampled_from([b"\n", b" ", b"-", b"\xff\xfe", b"a\\b", b"*?[", b"~", b".hidden"]),
        st.integers(240, 255).map(lambda n: b"N" * n),
    )
    .map(lambda n: n.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda n: n not in (b".", b".."))
)

xattr_sets = st.dictionaries(
    st.binary(min_size=1, max_size=10).map(lambda n: b"user." + n.replace(b"\0", b"_")),
    st.binary(max_size=64),
    max_size=3,
).map(lambda d: tuple(sorted(d.items())))

link_targets = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda t: t.replace(b"\0", b"_")),
    st.sampled_from([b"/", b"..", b"../../etc/passwd", b"x" * 1000]),
)


def sizes(layout: Layout) -> st.SearchStrategy[int]:
    """File sizes at and around the chunk and pack edges, and anywhere up to three chunks."""
    cs, pt = layout.chunk_size, layout.pack_threshold
    edges = {0, 1, pt - 1, pt, pt + 1, cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs, 2 * cs + 1, 3 * cs}
    edges |= {cs // 2, cs // 4, cs - pt}
    return st.one_of(
        st.sampled_from(sorted(e for e in edges if e >= 0)), st.integers(0, 3 * cs + 17)
    )


@st.composite
def contents(draw: st.DrawFn, layout: Layout) -> Content:
    size = draw(sizes(layout))
    kind = draw(st.sampled_from(["random", "zeros", "repeat", "mixed"]))
    if kind in ("random", "mixed"):
        seed = draw(st.integers(0, 2**16))
        cut = draw(st.integers(0, size)) if kind == "mixed" else 0
        return Content(kind, size, seed=seed, cut=cut)
    if kind == "repeat":
        return Content(kind, size, unit=draw(st.binary(min_size=1, max_size=7)))
    return Content(kind, size)


@st.composite
def sparse_files(draw: st.DrawFn) -> Sparse:
    blocks = draw(st.integers(1, 40))
    size = blocks * BLOCK + draw(st.integers(0, BLOCK - 1))
    at = draw(st.lists(st.integers(0, blocks), max_size=4, unique=True))
    regions = []
    for b in sorted(at):
        length = min(draw(st.integers(1, 2 * BLOCK)), size - b * BLOCK)
        if length > 0:
            regions.append((b * BLOCK, length, draw(st.integers(0, 2**16))))
    return Sparse(size, tuple(regions), draw(file_modes), draw(mtimes), draw(xattr_sets))


def trees(layout: Layout) -> st.SearchStrategy[Dir]:
    files = st.builds(File, contents(layout), file_modes, mtimes, xattr_sets)
    leaves = st.one_of(
        files,
        files,
        files,
        sparse_files(),
        st.builds(Symlink, link_targets, mtimes),
        st.builds(HardLink, st.integers(0, 50)),
    )

    def dirs(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        return st.builds(
            Dir, st.dictionaries(names, children, max_size=5), dir_modes, mtimes, xattr_sets
        )

    nodes = st.recursive(leaves, dirs, max_leaves=14)
    return st.builds(Dir, st.dictionaries(names, nodes, max_size=8), dir_modes, mtimes, xattr_sets)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Layout, Dir, tuple[int, ...]]:
    """A layout, a tree, and which of the tree's top entries are the backup's roots
    (none: the tree itself; -1: the tree as well, so the others are nested roots)."""
    layout = draw(layouts)
    picks = draw(st.lists(st.integers(-1, 7), max_size=3).map(tuple))
    return layout, draw(trees(layout)), picks


# -- 1. any tree round-trips --------------------------------------------------------------


@contextlib.contextmanager
def workspace() -> Iterator[tuple[bytes, LocalBackend]]:
    """A scratch directory (bytes) and a fresh repository."""
    with (
        tempfile.TemporaryDirectory(prefix="cryo-prop-") as scratch,
        tempfile.TemporaryDirectory(prefix="cryo-prop-repo-", dir=_repo_parent()) as repo,
    ):
        backend = LocalBackend(repo)
        try:
            yield os.fsencode(scratch), backend
        finally:
            backend.close()


def backed_up(backend: LocalBackend, layout: Layout, *roots: bytes, **kw: object) -> BackupSummary:
    summary = run_backup(backend, layout.options(*roots, **kw))
    assert summary.status == "COMPLETED", summary
    assert not summary.warnings, summary.warnings
    return summary


ROUND_TRIP = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@ROUND_TRIP
@given(cases())
@example(  # a file exactly one chunk long, a packed file filling a pack chunk to its edge
    (
        Layout(512, 128, 1),
        Dir(
            {
                b"one-chunk": File(Content("random", 512, seed=1)),
                b"p1": File(Content("random", 127, seed=2)),
                b"p2": File(Content("random", 127, seed=3)),
                b"p3": File(Content("random", 127, seed=4)),
                b"p4": File(Content("random", 131, seed=5)),
                b"two-chunks+1": File(Content("repeat", 1025, unit=b"ab")),
            }
        ),
        (),
    )
)
@example(  # holes at both ends, data straddling a chunk edge
    (
        Layout(1024, 256, 2),
        Dir({b"sparse": Sparse(9 * BLOCK + 7, ((2 * BLOCK, BLOCK + 1, 9),), 0o600, -1)}),
        (),
    )
)
@example(  # a file below the pack threshold that is all hole (was packed, so restored allocated)
    (Layout(4097, 4097, 1), Dir({b"s": Sparse(4096, ())}), ())
)
@example(  # two roots of three, a hard link from one into the other
    (
        Layout(512, 128, 2),
        Dir(
            {
                b"a": Dir({b"x": File(Content("random", 600, seed=7))}),
                b"b": File(Content("zeros", 3)),
                b"c": Dir({b"y": HardLink(0)}),
            }
        ),
        (0, 2),
    )
)
def test_any_tree_round_trips(case: tuple[Layout, Dir, tuple[int, ...]]) -> None:
    layout, tree, picks = case
    with workspace() as (scratch, backend):
        root = os.path.join(scratch, b"src")
        build(root, tree)
        top = sorted(os.listdir(root))
        chosen = {top[i % len(top)] for i in picks if i >= 0 and top}
        only = chosen if chosen and -1 not in picks else None
        roots = [os.path.join(root, n) for n in sorted(chosen)] + ([root] if only is None else [])
        before = snapshot(root, only)
        summary = backed_up(backend, layout, *reversed(roots))
        assert list(iter_bad_files(backend, summary.job_id, connections=4)) == []
        assert restored_snapshot(backend, summary.job_id, root, scratch, only) == before
        assert snapshot(root, only) == before  # the backup changed nothing it read


def test_a_small_sparse_file_keeps_its_holes() -> None:
    """Found by the test above: a sparse file below the pack threshold was packed whole,
    its holes read as zeros and restored as data."""
    with workspace() as (scratch, backend):
        root = os.path.join(scratch, b"src")
        build(root, Dir({b"s": Sparse(64 * 1024, ((2 * BLOCK, 10, 1),))}))
        before = snapshot(root)
        assert before[b"s"][5] is True  # it has holes
        summary = run_backup(backend, BackupOptions(paths=(root,)))  # the default layout
        assert summary.bytes_read <= BLOCK  # the block holding data, not the holes
        assert restored_snapshot(backend, summary.job_id, root, scratch) == before


def test_read_only_entries_keep_their_xattrs_without_privileges() -> None:
    """Found writing the test above for runs without root: a restore set a file's mode
    before its user xattrs, and the kernel refuses those on a read-only file to all but
    a privileged process, so read-only files and directories lost them silently."""
    with workspace() as (scratch, backend):
        root = os.path.join(scratch, b"src")
        attrs = ((b"user.origin", b"https://example.org/a"), (b"user.\xff", b""))
        build(
            root,
            Dir(
                {
                    b"ro-file": File(Content("random", 10), 0o444, 7, attrs),
                    b"ro-dir": Dir({b"f": File(Content("zeros", 1))}, 0o555, 8, attrs),
                }
            ),
        )
        before = snapshot(root)
        if before[b"ro-file"][-1] != attrs:
            pytest.skip("no user xattrs on this file system")
        job = run_backup(backend, BackupOptions(paths=(root,))).job_id
        backend.close()
        target = os.path.join(scratch, b"out")
        drop = "-dac_override,-dac_read_search,-fowner,-chown"
        cmd = [sys.executable, "-m", "cryo", "restore", job, "--repo", backend.root, "--to"]
        if os.geteuid() == 0:  # file permissions then apply to this root as to anyone
            cmd = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *cmd]
        r = subprocess.run([*cmd, os.fsdecode(target)], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert snapshot(os.path.join(target, root.lstrip(b"/"))) == before


# -- 2. any history keeps every job restorable ---------------------------------------------


def _fs_now(probe: bytes) -> int:
    """The file system's clock, as it stamps ctimes."""
    with open(probe, "wb"):
        pass
    return os.lstat(probe).st_ctime_ns


class History(RuleBasedStateMachine):
    """Changes to one tree, backups of it (incremental, full, on a chosen base), forget and
    job deletion; every job left must restore exactly the tree it was made of."""

    def __init__(self) -> None:
        super().__init__()
        self._scratch = tempfile.TemporaryDirectory(prefix="cryo-hist-")
        self._repo = tempfile.TemporaryDirectory(prefix="cryo-hist-repo-", dir=_repo_parent())
        self.scratch = os.fsencode(self._scratch.name)
        self.root = os.path.join(self.scratch, b"src")
        self.probe = os.path.join(self.scratch, b"clock")
        os.mkdir(self.root)
        self.backend = LocalBackend(self._repo.name)
        self.layout = Layout(1024, 256, 2)
        self.expected: dict[str, Snapshot] = {}
        self.newest: str | None = None
        self.clean: str | None = None
        """The job made of the tree as it is now, if nothing changed since."""

    # -- the tree ------------------------------------------------------------------------
    def _entries(self, kind: str | None = None) -> list[bytes]:
        """Paths under the root (root itself is ``b""``) of the given kind, in scan order."""
        return sorted(rel for rel, v in snapshot(self.root).items() if kind is None or v[0] == kind)

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    def _remove(self, path: bytes) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def _writable(self, path: bytes) -> None:
        """Without root, the owner of a read-only file makes it writable first."""
        if not _ROOT:
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o200)

    def _new_path(self, data: st.DataObject) -> bytes:
        parent = data.draw(st.sampled_from(self._entries("dir")), label="parent")
        return os.path.join(self._abs(parent), data.draw(names, label="name"))

    @initialize(layout=layouts)
    def choose_layout(self, layout: Layout) -> None:
        self.layout = layout

    @rule(
        data=st.data(),
        ops=st.lists(
            st.sampled_from(
                ["write", "write", "write", "rewrite", "sparse", "metadata", "xattr", "mkdir",
                 "symlink", "link", "delete", "delete"]
            ),
            min_size=1,
            max_size=4,
        ),
    )  # fmt: skip
    def change_tree(self, data: st.DataObject, ops: list[str]) -> None:
        for op in ops:
            getattr(self, "_" + op)(data)
        self.clean = None

    def _write(self, data: st.DataObject) -> None:
        existing = self._entries("file")
        if existing and data.draw(st.booleans(), label="existing file"):
            path = self._abs(data.draw(st.sampled_from(existing), label="file"))
        else:
            path = self._new_path(data)
        old = os.lstat(path) if os.path.lexists(path) else None
        if old is not None and not stat.S_ISREG(old.st_mode):
            self._remove(path)  # a directory or a link becomes a file
            old = None
        if old is not None:
            self._writable(path)
        content = data.draw(contents(self.layout), label="content").data()
        how = data.draw(st.sampled_from(["in place", "replace", "append"]), label="how")
        if how == "replace":
            tmp = os.path.join(self.scratch, b"replacement")
            with open(tmp, "wb") as f:
                f.write(content)
            if old is not None:
                os.chmod(tmp, stat.S_IMODE(old.st_mode))
            os.rename(tmp, path)
        else:
            with open(path, "ab" if how == "append" else "wb") as f:
                f.write(content)
        when = data.draw(st.sampled_from(["now", "old", "random"]), label="mtime")
        if when == "old" and old is not None:  # as rsync -t or tar do: only ctime tells
            os.utime(path, ns=(old.st_mtime_ns, old.st_mtime_ns))
        elif when == "random":
            t = data.draw(mtimes, label="mtime_ns")
            os.utime(path, ns=(t, t))

    def _rewrite(self, data: st.DataObject) -> None:
        """Change bytes in place, keeping size and mtime: only the ctime tells."""
        files = [f for f in self._entries("file") if os.lstat(self._abs(f)).st_size]
        if not files:
            return
        path = self._abs(data.draw(st.sampled_from(files), label="file"))
        self._writable(path)
        old = os.lstat(path)
        at = data.draw(st.integers(0, old.st_size - 1), label="offset")
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(path, ns=(old.st_mtime_ns, old.st_mtime_ns))

    def _sparse(self, data: st.DataObject) -> None:
        path = self._new_path(data)
        spec = data.draw(sparse_files(), label="sparse")
        self._remove(path)
        write_sparse(path, spec)
        os.utime(path, ns=(spec.mtime_ns, spec.mtime_ns))

    def _metadata(self, data: st.DataObject) -> None:
        path = self._abs(data.draw(st.sampled_from(self._entries()), label="path"))
        if not os.path.islink(path) and data.draw(st.booleans(), label="chmod"):
            modes = dir_modes if os.path.isdir(path) else file_modes
            os.chmod(path, data.draw(modes, label="mode"))
        else:
            t = data.draw(mtimes, label="mtime_ns")
            os.utime(path, ns=(t, t), follow_symlinks=False)

    def _xattr(self, data: st.DataObject) -> None:
        entries = [e for e in self._entries() if not os.path.islink(self._abs(e))]
        path = self._abs(data.draw(st.sampled_from(entries), label="path"))
        present = [k for k, _ in get_xattrs(path)]
        if present and data.draw(st.booleans(), label="remove"):
            with contextlib.suppress(OSError):  # without root, a read-only file keeps its own
                os.removexattr(path, data.draw(st.sampled_from(present), label="xattr"))
        else:
            set_xattrs(path, data.draw(xattr_sets, label="xattrs"))

    def _mkdir(self, data: st.DataObject) -> None:
        path = self._new_path(data)
        if not os.path.lexists(path):
            os.mkdir(path)

    def _symlink(self, data: st.DataObject) -> None:
        path = self._new_path(data)
        self._remove(path)
        os.symlink(data.draw(link_targets, label="target"), path)

    def _link(self, data: st.DataObject) -> None:
        files = self._entries("file")
        path = self._new_path(data)
        if files and not os.path.lexists(path):
            os.link(self._abs(data.draw(st.sampled_from(files), label="file")), path)

    def _delete(self, data: st.DataObject) -> None:
        entries = self._entries()[1:]  # not the root
        if entries:
            self._remove(self._abs(data.draw(st.sampled_from(entries), label="path")))

    # -- jobs ------------------------------------------------------------------------------
    @rule(data=st.data(), how=st.sampled_from(["incremental", "incremental", "full", "base"]))
    def backup(self, data: st.DataObject, how: str) -> None:
        base = None
        if how == "base" and self.expected:
            base = data.draw(st.sampled_from(sorted(self.expected)), label="base")
        elif how == "base":
            how = "incremental"
        before = snapshot(self.root)
        summary = backed_up(
            self.backend, self.layout, self.root, full=how == "full", base_job_id=base
        )
        assert snapshot(self.root) == before
        if how == "full":
            assert summary.base_job_id is None
        elif how == "base":
            assert summary.base_job_id == base
        else:  # the newest job of these paths, whichever way it was made
            assert summary.base_job_id == (self.newest if self.expected else None)
        if summary.base_job_id is not None and summary.base_job_id == self.clean:
            assert summary.bytes_read == 0, "an unchanged tree was read again"
        self.expected[summary.job_id] = before
        self.newest = self.clean = summary.job_id
        # Whatever happens to the tree next gets a later ctime than the backup saw.
        seen = max(os.lstat(self._abs(r)).st_ctime_ns for r in before)
        deadline = time.monotonic() + 10
        while _fs_now(self.probe) <= seen and time.monotonic() < deadline:
            time.sleep(0.001)

    @precondition(lambda self: self.expected)
    @rule(
        last=st.integers(0, 3),
        daily=st.integers(0, 2),
        weekly=st.integers(0, 2),
        monthly=st.integers(0, 2),
    )
    def forget(self, last: int, daily: int, weekly: int, monthly: int) -> None:
        policy = RetentionPolicy(last, daily, weekly, monthly)
        if policy.empty():
            policy = RetentionPolicy(keep_last=1)  # as the command line: never no rule at all
        decisions = select_forget(list(iter_jobs(self.backend)), policy)
        assert {d.job.job_id for d in decisions} == set(self.expected)
        assert decisions[0].keep and decisions[0].job.job_id == self.newest
        for d in decisions:
            if not d.keep:
                self.backend.delete_job(d.job.job_id)
                del self.expected[d.job.job_id]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def delete_job(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.expected)), label="job")
        self.backend.delete_job(job_id)
        del self.expected[job_id]
        if job_id == self.newest:
            self.newest = next((j.job_id for j in iter_jobs(self.backend)), None)
        if job_id == self.clean:
            self.clean = None

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.expected)), label="job")
        got = restored_snapshot(self.backend, job_id, self.root, self.scratch)
        assert got == self.expected[job_id]

    @invariant()
    def jobs_are_the_expected_ones(self) -> None:
        assert {j.job_id for j in iter_jobs(self.backend)} == set(self.expected)

    def teardown(self) -> None:
        try:
            for job_id, expected in sorted(self.expected.items()):
                assert list(iter_bad_files(self.backend, job_id, connections=4)) == []
                got = restored_snapshot(self.backend, job_id, self.root, self.scratch)
                assert got == expected, job_id
            for job in list(iter_jobs(self.backend)):
                self.backend.delete_job(job.job_id)
            chunks = os.path.join(self._repo.name, "chunks")
            left = [f for _, _, fs in os.walk(chunks) for f in fs]
            assert left == [], f"{len(left)} chunk files outlive every job"
        finally:
            self.backend.close()
            self._repo.cleanup()
            self._scratch.cleanup()


History.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_any_history_keeps_every_job_restorable = History.TestCase
