"""cryo backup: what a job keeps, packing and chunking, excludes, stdin, partial runs,
fatal errors and memory bounds. Jobs are read back through the verified job reader."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from cryo.backup import BackupOptions, run_backup
from cryo.directio import cached_fraction
from cryo.jobreader import JobReader
from cryo.manifest import ManifestEntry
from cryo.scan import ScanOptions
from cryo.storage.api import Backend
from cryo.storage.local import LocalBackend

from .storage_helpers import refuse_direct_io

KiB = 1024
MiB = 1024 * KiB
CLI = [sys.executable, "-c", "from cryo.cli import main; main()"]


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=300, **kw)  # type: ignore[call-overload, no-any-return]


def entries_of(backend: LocalBackend, job_id: str) -> dict[bytes, ManifestEntry]:
    head, entries = JobReader(backend, job_id).manifest()
    assert head["job"] == job_id
    return {e.path: e for e in entries}


def rel(p: Path) -> bytes:
    return os.fsencode(p).lstrip(b"/")


def xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.cryo", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with every kind of entry a backup must keep."""
    src = tmp_path / "src"
    (src / "dir" / "nested").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    (src / "small.txt").write_bytes(b"hello world\n")
    (src / "empty").write_bytes(b"")
    (src / "dir" / "text.log").write_bytes(b"compressible line\n" * 20_000)
    (src / "dir" / "nested" / "random.bin").write_bytes(os.urandom(300 * KiB + 7))
    (src / "mid.bin").write_bytes(os.urandom(90 * KiB))
    os.symlink("small.txt", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.link(src / "small.txt", src / "dir" / "hardlink")
    os.mkfifo(src / "fifo")
    weird = os.fsencode(src) + b"/caf\xe9-\xff.bin"  # not UTF-8
    with open(weird, "wb") as f:
        f.write(b"latin-1 name")
    with open(src / "sparse", "wb") as f:
        f.truncate(5 * MiB)
        f.seek(2 * MiB)
        f.write(b"island of data" * 100)
    os.chmod(src / "small.txt", 0o640)
    os.utime(src / "mid.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    if xattrs_supported(src):
        os.setxattr(src / "small.txt", "user.comment", b"\x00binary\xffvalue")
    return src


def small_chunks(**kw: object) -> BackupOptions:
    defaults: dict[str, object] = {
        "chunk_size": 64 * KiB,
        "pack_threshold": 32 * KiB,
        "pack_chunks": 4,
    }
    defaults.update(kw)
    return BackupOptions(**defaults)  # type: ignore[arg-type]


def walk(root: Path) -> Iterator[bytes]:
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in dirnames + filenames:
            yield os.path.join(dirpath, n)


def test_large_files_read_into_reused_buffers_come_back_exact(
    tmp_path: Path, backend: Backend
) -> None:
    """Chunks stored raw and compressed, full and short, in flight together: each one's bytes,
    from the page-aligned buffers of the embedded repository (a raw chunk moved next to its
    tag) and from the byte arrays an HTTP body is sent from."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    parts = [
        rng.randbytes(64 * KiB) if i % 3 else (b"line %d\n" % i) * (64 * KiB // 7)
        for i in range(40)
    ]
    files = {
        "mixed.bin": b"".join(parts) + rng.randbytes(1000),
        "one-full-chunk.bin": rng.randbytes(64 * KiB),
        "one-short-chunk.bin": rng.randbytes(40 * KiB),
        "two-chunks.txt": b"compressible " * (100 * KiB // 13),
    }
    for name, content in files.items():
        (src / name).write_bytes(content)
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(src),), connections=4))
    assert summary.status == "COMPLETED"
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    for name, content in files.items():
        assert reader.file_bytes(entries[rel(src / name)]) == content, name


@pytest.mark.parametrize("cpu_workers", [1, 4])
def test_small_files_in_packs_sealed_by_their_entries_come_back_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_workers: int
) -> None:
    """Packs sealed because their entries grew (before a chunk filled), between files read
    from the page cache straight into the pack and files read later: every file's bytes,
    whether packs have one encoder (1 or 2 workers) or several (one fewer than 4)."""
    import cryo.backup

    monkeypatch.setattr(cryo.backup, "MAX_ENTRIES_BLOB", 2 * KiB)
    src = tmp_path / "src"
    rng = random.Random(11)
    files: dict[Path, bytes] = {}
    for d in range(6):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(60):
            size = rng.choice([0, 1, 100, 4 * KiB, 20 * KiB])
            content = rng.randbytes(size) if i % 2 else (b"text %d " % i) * (size // 7)
            files[src / f"d{d}" / f"f{i:03d}"] = content
            (src / f"d{d}" / f"f{i:03d}").write_bytes(content)
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(src),), cpu_workers=cpu_workers))
    assert summary.status == "COMPLETED" and summary.warnings == ()
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    packs = {x.object_name for e in entries.values() for x in e.extents}
    assert len(packs) > 10  # sealed by entries, not by chunks (about 20 chunks' worth)
    for path, content in files.items():
        assert reader.file_bytes(entries[rel(path)]) == content, path


def test_round_trip_keeps_every_kind_of_entry(tmp_path: Path, tree: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(tree),)))
    assert summary.status == "COMPLETED" and summary.warnings == ()
    assert backend.describe_job(summary.job_id).status == "COMPLETED"
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    # parents of the root are recorded too
    assert entries[rel(tree.parent)].kind == "d"
    for source in walk(tree):
        st = os.lstat(source)
        e = entries[source.lstrip(b"/")]
        assert e.mode == stat.S_IMODE(st.st_mode), source
        assert (e.uid, e.gid) == (st.st_uid, st.st_gid)
        if stat.S_ISLNK(st.st_mode):
            assert e.kind == "l" and e.target == os.readlink(source)
            continue
        assert e.mtime_ns == st.st_mtime_ns, source
        if stat.S_ISDIR(st.st_mode):
            assert e.kind == "d"
        elif stat.S_ISFIFO(st.st_mode):
            assert e.kind == "p" and e.extents == []
        elif e.kind == "h":
            # the second path of the inode links to the first one in scan order
            assert source == os.fsencode(tree / "small.txt")
            assert e.target == rel(tree / "dir" / "hardlink")
        else:
            with open(source, "rb") as f:
                content = f.read()
            assert e.kind == "f" and e.size == len(content)
            assert reader.file_bytes(e) == content, source
            assert e.xxh3 == xxhash.xxh3_128(content).hexdigest()
    assert entries[rel(tree / "empty-dir")].kind == "d"
    assert entries[rel(tree) + b"/caf\xe9-\xff.bin"].size == len(b"latin-1 name")
    assert entries[rel(tree / "mid.bin")].mtime_ns == 1_600_000_000_987_654_321
    sparse = entries[rel(tree / "sparse")]
    # holes are neither read nor stored: only the file system blocks holding data
    assert sparse.size == 5 * MiB and sum(x.length for x in sparse.extents) <= 8 * KiB
    if xattrs_supported(tree):
        assert entries[rel(tree / "small.txt")].xattrs == {b"user.comment": b"\x00binary\xffvalue"}


def test_small_files_are_packed_and_large_files_chunked(tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(500):
        (src / f"f{i:03d}").write_bytes(os.urandom(200) + b"%d" % i)
    (src / "large").write_bytes(os.urandom(300 * KiB))
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(src),)))
    reader = JobReader(backend, summary.job_id)
    data_objects = [n for n in reader.objects if n.startswith("data/")]
    # 500 small files (~100 KiB) fit in two 64 KiB pack chunks of one pack object,
    # and the 300 KiB file is one object of five chunks: requests grow with bytes.
    assert len(data_objects) == 2
    assert sorted(len(reader.chunks_of(n)) for n in data_objects) == [2, 5]
    entries = entries_of(backend, summary.job_id)
    for i in range(0, 500, 37):
        e = entries[rel(src / f"f{i:03d}")]
        assert reader.file_bytes(e) == (src / f"f{i:03d}").read_bytes()


def cached_share(path: Path) -> float:
    """The share of a file's pages in the page cache (asking starts no read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        share = cached_fraction(fd)
    finally:
        os.close(fd)
    assert share is not None, "this kernel cannot say what it caches (cachestat)"
    return share


def evict_from_page_cache(path: Path) -> bool:
    """Drop a file's pages from the page cache; True if none is left."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return cached_share(path) == 0.0


def test_small_files_on_disk_and_in_the_page_cache_back_up_alike(tmp_path: Path) -> None:
    # Small files found in the page cache are read by the scanner at once; the
    # others are read ahead by the kernel and read a few files later. Both
    # kinds, interleaved, must come back exactly and in their places.
    src = tmp_path / "mixed"
    src.mkdir()
    contents = {}
    for i in range(400):
        contents[f"f{i:03d}"] = os.urandom(100 + 37 * i % 9000) + b"%d" % i
        (src / f"f{i:03d}").write_bytes(contents[f"f{i:03d}"])
    (src / "empty").write_bytes(b"")
    contents["empty"] = b""
    evicted = [evict_from_page_cache(src / f"f{i:03d}") for i in range(0, 400, 3)]
    assert sum(evicted) > 100, "the file system kept the pages; the cold path is not exercised"
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(src),)))
    assert summary.status == "COMPLETED" and summary.files == 401
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    for name, content in contents.items():
        e = entries[rel(src / name)]
        assert e.size == len(content) and reader.file_bytes(e) == content, name
        assert e.xxh3 == xxhash.xxh3_128(content).hexdigest()


def _cold_large_files(src: Path) -> dict[str, bytes]:
    src.mkdir()
    rng = random.Random(11)
    files = {"a.bin": rng.randbytes(3 * MiB + 4321), "b.bin": rng.randbytes(2 * MiB)}
    for name, data in files.items():
        (src / name).write_bytes(data)
        assert evict_from_page_cache(src / name)
    return files


def test_cold_large_files_are_read_around_the_page_cache(tmp_path: Path) -> None:
    # A large file that is not in the page cache is read with direct I/O: the
    # backup is exact and leaves the page cache as it found it.
    files = _cold_large_files(tmp_path / "src")
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(tmp_path / "src"),)))
    assert summary.status == "COMPLETED"
    assert cached_share(tmp_path / "src" / "a.bin") < 0.1
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    for name, data in files.items():
        e = entries[rel(tmp_path / "src" / name)]
        assert reader.file_bytes(e) == data and e.xxh3 == xxhash.xxh3_128(data).hexdigest()


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_cold_large_files_back_up_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    # Some file systems refuse O_DIRECT when a file is opened, others only when it is read.
    files = _cold_large_files(tmp_path / "src")
    real_preadv = os.preadv

    def refusing_preadv(fd: int, buffers: object, offset: int, *flags: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *flags)  # type: ignore[arg-type]

    if refused_at == "open":
        refuse_direct_io(monkeypatch)
    else:
        monkeypatch.setattr(os, "preadv", refusing_preadv)
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(tmp_path / "src"),)))
    assert summary.status == "COMPLETED"
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    for name, data in files.items():
        assert reader.file_bytes(entries[rel(tmp_path / "src" / name)]) == data


def test_incompressible_chunks_are_stored_raw_and_text_compressed(tmp_path: Path) -> None:
    src = tmp_path / "mix"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(1 * MiB))
    (src / "text").write_bytes(b"the same sentence again and again\n" * 30_000)
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, BackupOptions(paths=(os.fsencode(src),)))
    reader = JobReader(backend, summary.job_id)
    entries = entries_of(backend, summary.job_id)
    random_extent = entries[rel(src / "random")].extents[0]
    stored = reader.stored_chunk(random_extent.object_name, random_extent.chunk_index)
    assert stored[0] == 0x00 and len(stored) == 1 * MiB + 1  # tagged raw
    text_extent = entries[rel(src / "text")].extents[0]
    stored = reader.stored_chunk(text_extent.object_name, text_extent.chunk_index)
    assert stored[0] == 0x01 and len(stored) < 20 * KiB  # tagged zstd
    assert summary.bytes_stored < summary.bytes_read


def test_excludes(tmp_path: Path) -> None:
    src = tmp_path / "ex"
    (src / "keep").mkdir(parents=True)
    (src / "cache").mkdir()
    (src / "build").mkdir()
    (src / "keep" / "a.txt").write_text("a")
    (src / "keep" / "b.tmp").write_text("b")
    (src / "build" / "out.o").write_text("o")
    (src / "secret.key").write_text("k")
    (src / "cache" / "CACHEDIR.TAG").write_bytes(
        b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n"
    )
    (src / "cache" / "blob").write_text("cached")
    patterns = tmp_path / "patterns"
    patterns.write_text("# comment\n*.key\n\n")
    repo = tmp_path / "repo"
    r = run_cli(
        "backup", str(src), "--repo", str(repo), "--exclude", "*.tmp",
        "--exclude", f"{src}/build", "--exclude-file", str(patterns), "--exclude-caches", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.decode().strip()
    names = {p for p in entries_of(LocalBackend(repo), job) if p.startswith(rel(src))}
    assert names == {
        rel(src), rel(src / "keep"), rel(src / "keep" / "a.txt"), rel(src / "cache"),
        rel(src / "cache" / "CACHEDIR.TAG"),
    }  # fmt: skip


def test_stdin_stream(tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB) + b"tail"
    repo = tmp_path / "repo"
    r = run_cli(
        "backup", "-", "--stdin-name", "db.sql", "--repo", str(repo), "--chunk-size", "1", "-q",
        input=payload,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.decode().strip()
    backend = LocalBackend(repo)
    entry = entries_of(backend, job)[b"db.sql"]
    assert entry.size == len(payload) and len(entry.extents) == 4
    assert JobReader(backend, job).file_bytes(entry) == payload
    r = run_cli("backup", "-", "--repo", str(repo))
    assert r.returncode == 2 and b"--stdin-name" in r.stderr


def without_read_override(cmd: list[str]) -> list[str]:
    """``cmd`` run so that file permissions apply to it, even as root."""
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]


def test_unreadable_file_gives_partial_job_and_exit_3(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("readable")
    (src / "locked.txt").write_text("secret")
    os.chmod(src / "locked.txt", 0o000)
    repo = tmp_path / "repo"
    cmd = without_read_override([*CLI, "backup", str(src), "--repo", str(repo), "--json"])
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    assert r.returncode == 3, r.stderr
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["status"] == "PARTIAL"
    assert [e["path"] for e in summary["errors"]] == [str(src / "locked.txt")]
    assert any(rec["type"] == "warning" for rec in lines[:-1])
    backend = LocalBackend(repo)
    assert backend.describe_job(summary["job_id"]).status == "PARTIAL"
    names = entries_of(backend, summary["job_id"])
    assert rel(src / "ok.txt") in names and rel(src / "locked.txt") not in names


def test_unreachable_endpoint_fails_with_exit_10(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret-never-printed",
    }
    r = run_cli(
        "backup", str(tmp_path / "f"), "--endpoint-url", "http://127.0.0.1:9",
        "--retry-max-time", "1", env=env,
    )  # fmt: skip
    assert r.returncode == 10
    err = r.stderr.decode()
    assert err.startswith("cryo: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and "secret-never-printed" not in err


def test_help_explains_itself() -> None:
    top = run_cli("--help")
    assert top.returncode == 0 and b"backup" in top.stdout and b"embedded" in top.stdout
    sub = run_cli("backup", "--help")
    assert sub.returncode == 0
    for word in (b"--exclude", b"--stdin-name", b"--repo", b"--endpoint-url", b"Exit status"):
        assert word in sub.stdout, word


def peak_rss_mib(args: list[str], timeout: float = 600) -> tuple[int, float, float]:
    """Exit status, peak RSS (MiB) and seconds of a child process (measured by a launcher)."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.monotonic()\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " time.monotonic() - t)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, check=True, timeout=timeout
    ).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def test_memory_stays_bounded_for_a_large_file(tmp_path: Path) -> None:
    big = tmp_path / "big"
    block = os.urandom(MiB)
    with open(big, "wb") as f:
        for i in range(600):
            f.write(block[i:] + block[:i])  # 600 MiB, every chunk distinct
    code, rss, _ = peak_rss_mib([*CLI, "backup", str(big), "--repo", str(tmp_path / "r"), "-q"])
    assert code == 0
    assert rss < 300, f"peak RSS {rss:.0f} MiB"


def test_memory_stays_bounded_for_many_files(tmp_path: Path) -> None:
    src = tmp_path / "many"
    for d in range(40):
        sub = src / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(500):
            (sub / f"{i}").write_bytes(b"%d" % i)
    code, rss, _ = peak_rss_mib([*CLI, "backup", str(src), "--repo", str(tmp_path / "r"), "-q"])
    assert code == 0
    assert rss < 300, f"peak RSS {rss:.0f} MiB"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_one_file_system_does_not_enter_other_mounts(tmp_path: Path) -> None:
    src = tmp_path / "fs"
    (src / "mnt").mkdir(parents=True)
    (src / "a").write_text("a")
    subprocess.run(["mount", "-t", "tmpfs", "cryo-test", str(src / "mnt")], check=True)
    try:
        (src / "mnt" / "inside").write_text("other file system")
        backend = LocalBackend(tmp_path / "repo")
        for one_fs, expected in ((True, False), (False, True)):
            summary = run_backup(
                backend,
                BackupOptions(paths=(os.fsencode(src),), scan=ScanOptions(one_file_system=one_fs)),
            )
            names = entries_of(backend, summary.job_id)
            assert rel(src / "mnt") in names  # the mount point itself is recorded
            assert (rel(src / "mnt" / "inside") in names) is expected
    finally:
        subprocess.run(["umount", str(src / "mnt")], check=True)
