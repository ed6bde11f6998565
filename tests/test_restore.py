"""cryo restore and cryo verify: exact trees back, corruption caught and named,
hostile jobs refused, interrupted restores resumed."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import cryo.restore as restore_module
from cryo.backup import BackupOptions, run_backup
from cryo.jobreader import JobReader
from cryo.manifest import Extent, ManifestEntry
from cryo.restore import RestoreOptions, WriteFailed, run_restore
from cryo.storage.chunkstore import FileChunkStore
from cryo.storage.local import LocalBackend

from .storage_helpers import crafted_job, refuse_direct_io
from .test_backup import (
    CLI,
    KiB,
    MiB,
    cached_share,
    entries_of,
    rel,
    run_cli,
    small_chunks,
    tree,
    xattrs_supported,
)

__all__ = ["tree"]  # the fixture, re-used from the backup tests


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a restore must bring back, keyed by path relative to ``root``."""
    out: dict[bytes, tuple[object, ...]] = {}
    base = os.fsencode(root)
    inodes: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            relp = os.path.relpath(p, base)
            kind = stat.S_IFMT(st.st_mode)
            info: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                info += (os.readlink(p),)
            else:
                info += (st.st_mtime_ns,)
                try:
                    xattrs = {n: os.getxattr(p, n) for n in os.listxattr(p)}
                except OSError:
                    xattrs = {}
                info += (tuple(sorted(xattrs.items())),)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    info += (f.read(),)
                if st.st_nlink > 1:
                    info += ("link-group", inodes.setdefault(st.st_ino, relp))
            out[relp] = info
    return out


def backup_tree(tmp_path: Path, src: Path) -> tuple[LocalBackend, str]:
    backend = LocalBackend(tmp_path / "repo")
    summary = run_backup(backend, small_chunks(paths=(os.fsencode(src),)))
    return backend, summary.job_id


def test_full_round_trip_is_exact(tmp_path: Path, tree: Path) -> None:
    # the directory mtimes must survive the restore writing into them
    os.utime(tree / "dir", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    backend, job = backup_tree(tmp_path, tree)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == ()
    restored = out / os.fsdecode(os.fsencode(tree).lstrip(b"/"))
    assert snapshot(restored) == snapshot(tree)
    sparse = os.stat(restored / "sparse")
    assert sparse.st_size == 5 * MiB and sparse.st_blocks * 512 < 1 * MiB  # holes stay holes
    assert os.stat(restored / "dir").st_mtime_ns == 1_500_000_000_000_000_001
    if xattrs_supported(tmp_path):
        assert os.getxattr(restored / "small.txt", "user.comment") == b"\x00binary\xffvalue"
    leftovers = [p for p in out.rglob(".cryo-*")]
    assert leftovers == []


@pytest.mark.parametrize(("umask", "setgid_target"), [(0o077, True), (0o022, False)])
def test_modes_and_owners_come_back_exactly_whatever_the_umask_and_target(
    tmp_path: Path, umask: int, setgid_target: bool
) -> None:
    # A small file is created with its mode, and not chowned, where the first file
    # of that mode created beside it came out so; the others are chmodded and
    # chowned. Every combination must still come back.
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    modes = {"plain": 0o644, "private": 0o600, "none": 0o000, "readonly": 0o444,
             "all": 0o777, "group-write": 0o664, "setuid": 0o4755, "setgid": 0o2750,
             "sticky": 0o1644, "plain-2": 0o644, "group-write-2": 0o664, "private-2": 0o600,
             "plain-3": 0o644}  # fmt: skip
    root = os.geteuid() == 0
    for name, mode in modes.items():
        f = src / "d" / name
        f.write_bytes(name.encode() * 100)
        if root and name in ("private", "setuid", "plain-3"):
            os.chown(f, 1234, 5678)  # someone else's
        os.chmod(f, mode)
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    out.mkdir()
    if root and setgid_target:
        os.chown(out, -1, 4321)
        os.chmod(out, 0o2750)  # noqa: S103 - a setgid target: new files take its group
    old_umask = os.umask(umask)  # strips bits from what is created
    try:
        summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    finally:
        os.umask(old_umask)
    assert summary.failures == ()
    prefix = out / os.fsdecode(os.fsencode(src).lstrip(b"/")) / "d"
    for name, mode in modes.items():
        want, got = os.lstat(src / "d" / name), os.lstat(prefix / name)
        assert stat.S_IMODE(got.st_mode) == mode, name
        assert (got.st_uid, got.st_gid) == (want.st_uid, want.st_gid), name
        assert (prefix / name).read_bytes() == name.encode() * 100


def test_modes_come_back_exactly_into_a_directory_with_a_default_acl(tmp_path: Path) -> None:
    # A default ACL, not the umask, decides the mode of a new file (here: nothing
    # for others, no write for the group); the restore must still set the entry's.
    import struct

    src = tmp_path / "src"
    src.mkdir()
    modes = {"plain": 0o644, "open": 0o666, "exec": 0o755}
    for name, mode in modes.items():
        (src / name).write_bytes(name.encode())
        os.chmod(src / name, mode)
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    out.mkdir()
    undefined = 0xFFFFFFFF
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, undefined) for tag, perm in ((1, 7), (4, 5), (0x20, 0))
    )  # version 2; user::rwx, group::r-x, other::---
    try:
        os.setxattr(out, "system.posix_acl_default", acl)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            pytest.skip("this file system has no POSIX ACLs")
        raise
    (out / "probe").touch()  # the ACL is in force: a new file's mode follows it
    assert stat.S_IMODE(os.stat(out / "probe").st_mode) == 0o640
    os.unlink(out / "probe")
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out), overwrite="always"))
    assert summary.failures == ()
    prefix = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    for name, mode in modes.items():
        assert stat.S_IMODE(os.lstat(prefix / name).st_mode) == mode, name


def test_include_and_exclude(tmp_path: Path, tree: Path) -> None:
    backend, job = backup_tree(tmp_path, tree)
    prefix = os.fsdecode(os.fsencode(tree).lstrip(b"/"))
    out = tmp_path / "only-dir"
    run_restore(
        backend,
        job,
        RestoreOptions(
            target=os.fsencode(out),
            includes=(os.fsencode(f"{prefix}/dir"),),
            excludes=(b"*.log",),
        ),
    )
    got = {p.relative_to(out / prefix).as_posix() for p in (out / prefix).rglob("*")}
    assert got == {"dir", "dir/nested", "dir/nested/random.bin", "dir/hardlink"}


def test_refuses_non_empty_target_without_overwrite(tmp_path: Path, tree: Path) -> None:
    _, job = backup_tree(tmp_path, tree)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious").write_text("keep me")
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--to", str(out))
    assert r.returncode == 1 and b"not empty" in r.stderr and b"--overwrite" in r.stderr
    assert (out / "precious").read_text() == "keep me"


def _chunk_file_of(backend: LocalBackend, job: str, path: bytes, extent: int = 0) -> Path:
    """The stored chunk file behind extent ``extent`` of file ``path``."""
    reader = JobReader(backend, job)
    _, entries = reader.manifest()
    entry = next(e for e in entries if e.path == path)
    ext = entry.extents[extent]
    chunk = reader.chunks_of(ext.object_name)[ext.chunk_index]
    sha = bytes.hex(__import__("base64").b64decode(chunk.checksum))
    return backend.root / "chunks" / sha[:2] / sha


def _corrupt_chunk_of(backend: LocalBackend, job: str, path: bytes, extent: int = 0) -> Path:
    """Flip one bit of the stored chunk behind extent ``extent`` of file ``path``."""
    f = _chunk_file_of(backend, job, path, extent)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f


def test_corrupt_chunk_is_named_and_never_restored(tmp_path: Path, tree: Path) -> None:
    backend, job = backup_tree(tmp_path, tree)
    victim = os.fsencode(tree / "dir" / "nested" / "random.bin").lstrip(b"/")
    _corrupt_chunk_of(backend, job, victim)
    out = tmp_path / "out"
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--to", str(out), "--json")
    assert r.returncode == 1
    summary = json.loads(r.stdout.decode().splitlines()[-1])
    assert [e["path"] for e in summary["errors"]] == [os.fsdecode(victim)]
    assert "checksum" in summary["errors"][0]["message"]
    restored = out / os.fsdecode(victim)
    assert not restored.exists()
    assert (out / os.fsdecode(victim)).parent.is_dir()
    assert (restored.parent.parent / "text.log").read_bytes() == (
        tree / "dir" / "text.log"
    ).read_bytes()
    assert list(out.rglob(".cryo-*")) == []
    # verify --read-data names the same file
    v = run_cli("verify", job, "--repo", str(tmp_path / "repo"), "--read-data")
    assert v.returncode == 1
    assert os.fsdecode(victim).encode() in v.stderr
    ok = run_cli("verify", job, "--repo", str(tmp_path / "repo"))
    assert ok.returncode == 0  # structure is sound; only the data is bad


def test_an_unreadable_chunk_file_is_named_and_the_rest_restored(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bad sector under the repository: reading the chunk file fails with EIO.
    backend, job = backup_tree(tmp_path, tree)
    victim = os.fsencode(tree / "dir" / "nested" / "random.bin").lstrip(b"/")
    bad = _chunk_file_of(backend, job, victim).name
    real_get = FileChunkStore.get

    def failing_get(self: FileChunkStore, key: str) -> bytes:
        if key == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real_get(self, key)

    monkeypatch.setattr(FileChunkStore, "get", failing_get)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert [f.path for f in summary.failures] == [os.fsdecode(victim)]
    assert "Input/output error" in summary.failures[0].message
    assert not (out / os.fsdecode(victim)).exists()
    assert (out / os.fsdecode(victim)).parent.parent.joinpath("text.log").read_bytes() == (
        tree / "dir" / "text.log"
    ).read_bytes()


def test_a_full_target_stops_the_restore_in_one_line_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    for d in range(8):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(60):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d/%d " % (d, i) * 300)
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    real_pwrite = os.pwrite
    writes = []

    def filling_pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(fd)
        if len(writes) > 100:  # the file system is full from the 101st file on
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed, match="No space left on device") as failed:
        run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert str(failed.value).startswith(f"cannot write under {out}: No space left on device")
    assert list(out.rglob(".cryo-*")) == []  # no temporary left behind
    prefix = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    restored = [p for p in prefix.rglob("f*") if p.is_file()]
    assert 0 < len(restored) <= 100
    for p in restored:  # what is there under a real name is whole
        assert p.read_bytes() == (src / p.relative_to(prefix)).read_bytes()


def test_verify_read_data_passes_on_a_clean_job(tmp_path: Path, tree: Path) -> None:
    _, job = backup_tree(tmp_path, tree)
    r = run_cli("verify", job, "--repo", str(tmp_path / "repo"), "--read-data")
    assert r.returncode == 0, r.stderr
    assert b"all data read and verified" in r.stdout
    r = run_cli("verify", job, "--repo", str(tmp_path / "repo"), "--read-data", "--quiet")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")  # a cron job's silence
    r = run_cli("verify", "no-such-job", "--repo", str(tmp_path / "repo"))
    assert r.returncode == 11
    r = run_cli("verify", "no-such-job", "--repo", str(tmp_path / "repo"), "-q")
    assert r.returncode == 11 and r.stderr.startswith(b"cryo: ")  # errors still said


def _file(path: bytes, data: bytes) -> ManifestEntry:
    import xxhash

    return ManifestEntry(
        path=path, kind="f", mode=0o644, size=len(data),
        extents=[Extent(0, "data/x", 0, 0, len(data))], xxh3=xxhash.xxh3_128(data).hexdigest(),
    )  # fmt: skip


def test_hostile_paths_are_refused(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"pwned"
    entries = [
        _file(b"../escape", data),
        _file(os.fsencode(outside / "abs"), data),  # absolute path
        _file(b"ok/../../up", data),
        ManifestEntry(path=b"link", kind="l", target=os.fsencode(outside)),
        _file(b"link/through-symlink", data),
        ManifestEntry(path=b"hl", kind="h", target=b"../../etc/passwd"),
        _file(b"fine", data),
    ]
    job = crafted_job(backend, entries, data)
    out = tmp_path / "target"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    refused = {f.path for f in summary.failures}
    assert refused == {"../escape", str(outside / "abs"), "ok/../../up",
                       "link/through-symlink", "hl"}  # fmt: skip
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not (tmp_path / "up").exists()
    assert (out / "fine").read_bytes() == data
    assert os.readlink(out / "link") == os.fsencode(outside).decode()


def test_a_manifest_with_a_malformed_field_fails_in_one_line(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    bad = _file(b"f", b"data")
    bad.mode = "rw-r--r--"  # type: ignore[assignment]  # what a damaged manifest may say
    job = crafted_job(backend, [bad], b"data")
    out = tmp_path / "out"
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--to", str(out))
    assert r.returncode == 1
    assert r.stderr.decode().strip() == (
        "cryo: manifest entry with a malformed field: "
        "invalid literal for int() with base 10: 'rw-r--r--'"
    )
    assert not (out / "f").exists()


def test_interrupted_restore_resumes_with_if_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(2 * KiB))
    (src / "big").write_bytes(os.urandom(8 * MiB))
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "restore", job, "--repo", str(tmp_path / "repo"), "--to", str(out), "-q",
         "--connections", "1"],
    )  # fmt: skip
    prefix = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    deadline = time.monotonic() + 60
    while proc.poll() is None and len(list(prefix.glob("d*/f*"))) < 300:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(prefix.glob("d*/f*")))
    r = run_cli(
        "restore", job, "--repo", str(tmp_path / "repo"), "--to", str(out),
        "--overwrite", "if-changed", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.decode().splitlines()[-1])
    assert summary["skipped"] >= done_before > 0
    assert list(out.rglob(".cryo-*")) == []  # the killed run's temporary files are gone
    for p in src.rglob("*"):
        if p.is_file():
            assert (prefix / p.relative_to(src)).read_bytes() == p.read_bytes()


def test_files_land_in_their_own_directories_while_the_descriptor_cache_turns_over(
    tmp_path: Path,
) -> None:
    # More directories than the restore keeps open, one file in each, and whole
    # batches in flight: a directory's descriptor stays open while its file is
    # written, so no file is written through a descriptor reused for another.
    src = tmp_path / "src"
    for d in range(1300):
        (src / f"d{d:04}").mkdir(parents=True)
        (src / f"d{d:04}" / "f").write_bytes(b"%d " % d * (1 + d % 7))
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    summary = run_restore(
        backend, job, RestoreOptions(target=os.fsencode(out), connections=2, batch_files=600)
    )
    assert summary.failures == ()
    prefix = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    for d in range(1300):
        assert sorted(os.listdir(prefix / f"d{d:04}")) == ["f"]
        assert (prefix / f"d{d:04}" / "f").read_bytes() == b"%d " % d * (1 + d % 7)


def test_plain_small_files_skip_the_general_path_and_come_back_exactly(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small file in one piece goes from its record to its name without being
    # decoded into an entry; only what needs more (extended attributes, no
    # data, several chunks, holes) goes the general way. Either way: exact.
    probe = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not restore_module._can_name_unnamed_files(probe, b"probe"):
            pytest.skip("no unnamed files here: every file takes the general path")
    finally:
        os.close(probe)
    owned = {b"caf\xe9-\xff.bin": (1234, 5678), b"mid.bin": (4321, 8765)}  # someone else's
    if os.geteuid() == 0:
        for name, (uid, gid) in owned.items():
            os.chown(os.fsencode(tree) + b"/" + name, uid, gid)
    general: dict[str, list[bytes]] = {"add_file": [], "finish_file": [], "_long_path": []}

    def spy(method: str, name_of: object) -> None:
        real = getattr(restore_module._Restore, method)

        def spied(self: restore_module._Restore, *args: object) -> object:
            general[method].append(name_of(*args))  # type: ignore[operator]
            return real(self, *args)

        monkeypatch.setattr(restore_module._Restore, method, spied)

    spy("add_file", lambda parts, entry: parts[-1])
    spy("finish_file", lambda p: p.parts[-1])
    spy("_long_path", lambda s, piece: s.parts[-1])
    backend, job = backup_tree(tmp_path, tree)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == ()
    assert snapshot(out / os.fsdecode(os.fsencode(tree).lstrip(b"/"))) == snapshot(tree)
    # No data, or several chunks; and the extended attributes of small.txt (which is
    # kept under one of its two names, the other a hard link to it).
    needs_more = [b"empty", b"mid.bin", b"random.bin", b"sparse", b"text.log"]
    with_xattrs = [n for n in general["add_file"] if n in (b"small.txt", b"hardlink")]
    assert len(with_xattrs) == (1 if xattrs_supported(tree) else 0)
    assert sorted(general["add_file"]) == sorted(needs_more + with_xattrs)
    assert sorted(general["finish_file"]) == sorted(general["add_file"])  # none fell back
    assert general["_long_path"] == []
    regular = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    assert summary.files == len(regular) - 1  # (one of them is a hard link to another)
    stored = entries_of(backend, job)
    assert summary.bytes_written == sum(  # every byte of data once (a hole is none)
        sum(x.length for x in stored[rel(p)].extents) for p in regular if rel(p) in stored
    )


def test_a_record_the_short_path_cannot_take_is_restored_the_general_way(
    tmp_path: Path,
) -> None:
    # A length written as 12.0 is a number all the same: the general path reads it.
    backend = LocalBackend(tmp_path / "repo")
    data = b"twelve bytes"
    odd = _file(b"odd", data)
    odd.extents = [Extent(0, "data/x", 0, 0, float(len(data)))]  # type: ignore[arg-type]
    job = crafted_job(backend, [odd, _file(b"plain", data)], data)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == () and summary.files == 2
    assert (out / "odd").read_bytes() == data
    assert (out / "plain").read_bytes() == data


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are restored by root only")
def test_an_owner_name_no_system_can_hold_falls_back_to_the_numeric_ids(tmp_path: Path) -> None:
    # A name with a NUL byte (or one that is not a string) names no user here: the
    # file is restored with the recorded ids, and the rest of the job with it.
    backend = LocalBackend(tmp_path / "repo")
    data = b"owned by an odd name"
    files = []
    for name, user, group in ((b"nul", "ro\x00ot", "ro\x00ot"), (b"number", 7, None)):
        f = _file(name, data)
        f.uid, f.gid, f.user, f.group = 1234, 5678, user, group  # type: ignore[assignment]
        files.append(f)
    big = _file(b"general", data)  # the same owner, on the general path (an xattr)
    big.uid, big.gid, big.user, big.xattrs = 1234, 5678, "ro\x00ot", {b"user.k": b"v"}
    job = crafted_job(backend, [*files, big], data)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == () and summary.files == 3
    for name in ("nul", "number", "general"):
        st = (out / name).stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
        assert (out / name).read_bytes() == data


def test_restore_single_file_to_stdout(tmp_path: Path, tree: Path) -> None:
    _, job = backup_tree(tmp_path, tree)
    rel = os.fsdecode(os.fsencode(tree / "dir" / "text.log").lstrip(b"/"))
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--path", rel, "--to", "-")
    assert r.returncode == 0
    assert r.stdout == (tree / "dir" / "text.log").read_bytes()  # several chunks, in order
    sparse = os.fsdecode(os.fsencode(tree / "sparse").lstrip(b"/"))
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--path", sparse, "--to", "-")
    assert r.returncode == 0 and r.stdout == (tree / "sparse").read_bytes()  # holes as zeros
    r = run_cli("restore", job, "--repo", str(tmp_path / "repo"), "--path", "nope", "--to", "-")
    assert r.returncode == 2 and b"no such file" in r.stderr


def one_file_job(tmp_path: Path, size: int = 0) -> tuple[Path, LocalBackend, str]:
    """A job of one directory holding one file ``f`` (of ``size`` bytes, or a line):
    (source, backend, job)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(size) if size else b"from the backup")
    backend = LocalBackend(tmp_path / "repo")
    return src, backend, run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id


@pytest.mark.parametrize("policy", ["never", "always"])
def test_overwrite_policies(tmp_path: Path, policy: str) -> None:
    src, backend, job = one_file_job(tmp_path)
    out = tmp_path / "out"
    target = out / os.fsdecode(os.fsencode(src / "f").lstrip(b"/"))
    target.parent.mkdir(parents=True)
    target.write_text("local edit")
    run_restore(backend, job, RestoreOptions(target=os.fsencode(out), overwrite=policy))
    expected = "local edit" if policy == "never" else "from the backup"
    assert target.read_text() == expected


def test_a_directory_in_the_way_is_named_and_kept(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("from the backup")
    (src / "g").write_text("beside it")
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, BackupOptions(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    restored = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    (restored / "f").mkdir(parents=True)
    (restored / "f" / "mine").write_text("local")
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out), overwrite="always"))
    assert [(w.path.endswith("/f"), w.message) for w in summary.failures] == [
        (True, "a directory is in the way; not replaced")
    ]
    assert (restored / "f" / "mine").read_text() == "local"
    assert (restored / "g").read_text() == "beside it"
    assert summary.files == 1  # g; f is not counted as restored
    assert not [p for p in restored.iterdir() if p.name.startswith(".cryo-restore-")]


def test_a_directory_in_the_way_of_a_hard_link_is_named_and_kept(
    tmp_path: Path, tree: Path
) -> None:
    backend, job = backup_tree(tmp_path, tree)
    out = tmp_path / "out"
    restored = out / os.fsdecode(os.fsencode(tree).lstrip(b"/"))
    # small.txt and dir/hardlink are one file: the job stores dir/hardlink (first in
    # the walk) as the file and small.txt as a link to it.
    (restored / "small.txt").mkdir(parents=True)
    summary = run_restore(
        backend, job, RestoreOptions(target=os.fsencode(out), overwrite="if-changed")
    )
    assert [(w.path.endswith("/small.txt"), w.message) for w in summary.failures] == [
        (True, "a directory is in the way; not replaced")
    ]
    assert (restored / "small.txt").is_dir()
    assert (restored / "dir" / "hardlink").read_bytes() == (tree / "small.txt").read_bytes()
    assert list(out.rglob(".cryo-*")) == []


@pytest.mark.parametrize("refused_at", ["open", "descriptor", "link"])
def test_files_get_their_names_where_unnamed_files_are_refused(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    # "open": the file system has no O_TMPFILE, so files get named temporaries.
    # "descriptor": naming an unnamed file by its descriptor is not allowed (no
    # CAP_DAC_READ_SEARCH): each is named by its /proc path instead.
    # "link": unnamed files work when the restore starts, then naming one fails (a
    # sandbox's /proc, a mount inside the target): each is copied to a temporary.
    backend, job = backup_tree(tmp_path, tree)
    real_open, real_link = os.open, os.link
    refused: list[object] = []
    by_descriptor: list[bytes] = []

    def not_by_descriptor(fd: int, dir_fd: int, name: bytes) -> bool:
        by_descriptor.append(name)
        return False

    def no_tmpfile(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused.append(path)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    def refusing_link(src: object, dst: bytes, **kw: object) -> None:
        if isinstance(src, bytes) and src.startswith(b"/proc/") and b".cryo-" not in dst:
            refused.append(dst)
            raise OSError(errno.EPERM, "Operation not permitted")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    if refused_at == "open":
        monkeypatch.setattr(os, "open", no_tmpfile)
    else:
        monkeypatch.setattr(restore_module, "_link_by_descriptor", not_by_descriptor)
    if refused_at == "link":
        monkeypatch.setattr(os, "link", refusing_link)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == ()
    # It was tried, refused, and the files were named another way.
    assert refused if refused_at in ("open", "link") else by_descriptor
    assert snapshot(out / os.fsdecode(os.fsencode(tree).lstrip(b"/"))) == snapshot(tree)
    assert list(out.rglob(".cryo-*")) == []


def test_an_unnamed_file_is_named_by_its_descriptor_and_never_over_another(
    tmp_path: Path,
) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(b".", os.O_RDWR | os.O_TMPFILE, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, b"verified bytes")
        (tmp_path / "taken").write_bytes(b"someone else's")
        if not restore_module._link_by_descriptor(fd, dir_fd, b"named"):
            pytest.skip("naming by descriptor needs CAP_DAC_READ_SEARCH here")
        assert (tmp_path / "named").read_bytes() == b"verified bytes"
        with pytest.raises(FileExistsError):
            restore_module._link_by_descriptor(fd, dir_fd, b"taken")
        assert (tmp_path / "taken").read_bytes() == b"someone else's"
    finally:
        os.close(fd)
        os.close(dir_fd)


@pytest.mark.parametrize("named_by", ["descriptor", "proc", "temporary"])
def test_never_keeps_a_file_that_appears_while_the_restore_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named_by: str
) -> None:
    # A small file is created unnamed and named by descriptor (or by its /proc
    # path); a large one is written under a temporary name: each way, a file that
    # takes its name meanwhile is kept.
    src, backend, job = one_file_job(tmp_path, 2 * MiB if named_by == "temporary" else 0)
    out = tmp_path / "out"
    restored = out / os.fsdecode(os.fsencode(src).lstrip(b"/"))
    restored.mkdir(parents=True)
    real_link, real_by_descriptor = os.link, restore_module._link_by_descriptor

    def someone_else_first(name: bytes) -> None:
        if name == b"f":  # another program creates the file just before it is named
            (restored / "f").write_text("someone else's")

    def link(src_: object, dst: bytes, **kw: object) -> None:
        someone_else_first(dst)
        real_link(src_, dst, **kw)  # type: ignore[arg-type]

    def by_descriptor(fd: int, dir_fd: int, name: bytes) -> bool:
        if named_by == "proc":
            return False
        someone_else_first(name)
        return real_by_descriptor(fd, dir_fd, name)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(restore_module, "_link_by_descriptor", by_descriptor)
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out), overwrite="never"))
    assert summary.failures == () and summary.skipped == 1
    assert summary.files == 0  # the one file was kept as found, not restored
    assert (restored / "f").read_text() == "someone else's"
    assert list(out.rglob(".cryo-*")) == []


def test_content_that_does_not_match_its_xxh3_is_never_restored(tmp_path: Path) -> None:
    # The chunk is sound (its SHA-256 matches); the manifest's file checksum is not.
    # One file is written in one piece (hashed as written), one in two (read back).
    backend = LocalBackend(tmp_path / "repo")
    data = b"0123456789abcdef" * 64
    half = len(data) // 2
    whole = _file(b"whole", data)
    whole.xxh3 = "0" * 32
    pieces = _file(b"pieces", data)
    pieces.extents = [Extent(0, "data/x", 0, 0, half), Extent(half, "data/x", 0, half, half)]
    pieces.xxh3 = "1" * 32
    good = _file(b"good", data)
    job = crafted_job(backend, [whole, pieces, good], data)
    out = tmp_path / "target"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert sorted((f.path, f.message) for f in summary.failures) == [
        (name, "not restored: content does not match its xxh3-128 checksum")
        for name in ("pieces", "whole")
    ]
    assert sorted(p.name for p in out.iterdir()) == ["good"]
    assert (out / "good").read_bytes() == data


def _large_files(src: Path) -> dict[str, bytes]:
    """Files of many chunks: aligned and odd sizes, and one with holes."""
    src.mkdir()
    rng = __import__("random").Random(7)
    files = {
        "aligned.bin": rng.randbytes(2 * MiB),
        "odd-tail.bin": rng.randbytes(3 * MiB + 1234),
        "text.log": b"".join(b"line %d of a log file\n" % i for i in range(120_000)),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    with open(src / "holes.img", "wb") as f:
        f.write(b"head" * 1000)
        f.seek(2 * MiB)
        f.write(b"middle" * 20_000)
        f.truncate(5 * MiB)
    files["holes.img"] = (src / "holes.img").read_bytes()
    return files


LargeJob = tuple[dict[str, bytes], LocalBackend, str]


@pytest.fixture
def large_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LargeJob:
    """A job of large files, restored with a hash window of two chunks, so pieces wait often."""
    import cryo.restore

    monkeypatch.setattr(cryo.restore, "HASH_WINDOW", 128 * KiB)
    files = _large_files(tmp_path / "src")
    backend, job = backup_tree(tmp_path, tmp_path / "src")
    return files, backend, job


def test_large_files_come_back_exactly_when_their_chunks_arrive_in_any_order(
    tmp_path: Path, large_job: LargeJob
) -> None:
    # Chunks are fetched in parallel and written where they belong; each file's
    # xxh3-128 is computed over its pieces in file order.
    files, backend, job = large_job
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out), connections=8))
    assert summary.failures == () and summary.files == len(files)
    base = out / os.fsdecode(os.fsencode(tmp_path / "src").lstrip(b"/"))
    # large files are written around the page cache, so a restore does not evict
    # what the machine keeps cached
    assert cached_share(base / "aligned.bin") < 0.1
    for name, data in files.items():
        assert (base / name).read_bytes() == data, name
    # holes stay holes
    assert os.stat(base / "holes.img").st_blocks * 512 < 2 * MiB


def test_large_files_restore_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large_job: LargeJob
) -> None:
    files, backend, job = large_job
    refuse_direct_io(monkeypatch)
    out = tmp_path / "out"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert summary.failures == ()
    base = out / os.fsdecode(os.fsencode(tmp_path / "src").lstrip(b"/"))
    for name, data in files.items():
        assert (base / name).read_bytes() == data, name


def test_a_corrupt_chunk_inside_a_large_file_fails_that_file_only(
    tmp_path: Path, large_job: LargeJob
) -> None:
    # The pieces after the bad chunk must not wait for it forever.
    files, backend, job = large_job
    victim = os.fsencode(tmp_path / "src" / "odd-tail.bin").lstrip(b"/")
    _corrupt_chunk_of(backend, job, victim, extent=3)
    out = tmp_path / "out"
    started = time.monotonic()
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(out)))
    assert time.monotonic() - started < 60
    assert [w.path for w in summary.failures] == [os.fsdecode(victim)]
    base = out / os.fsdecode(os.fsencode(tmp_path / "src").lstrip(b"/"))
    assert not (base / "odd-tail.bin").exists()
    assert list(out.rglob(".cryo-*")) == []
    for name, data in files.items():
        if name != "odd-tail.bin":
            assert (base / name).read_bytes() == data, name


def test_a_piece_that_comes_early_is_hashed_as_it_was_given() -> None:
    # A chunk's buffer is used again once its pieces are written, while a piece that
    # came before its turn still waits to be hashed: the file's digest must be of the
    # bytes given, not of what the buffer holds later.
    import xxhash

    from cryo.restore import _InOrderHash

    first, second = b"a" * 4096, b"b" * 4096
    h = _InOrderHash([0, 4096], 8192, window=1 << 20)
    buffer = bytearray(second)
    h.add(4096, memoryview(buffer))  # early: the first piece is not in yet
    buffer[:] = b"x" * 4096  # the buffer, used again for another chunk
    h.add(0, memoryview(first))
    assert h.hexdigest() == xxhash.xxh3_128_hexdigest(first + second)


def test_a_compressed_chunk_decodes_into_a_reused_buffer_only_where_it_fits() -> None:
    import mmap

    from cryo.encoding import EncodingError, decode, encode

    data = b"restore me " * 50_000
    stored = bytes(encode(data, 1))
    roomy, tight = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 4096)
    into = decode(stored, copy=False, into=roomy)
    assert isinstance(into, memoryview) and into.obj is roomy and into == data
    assert bytes(decode(stored, copy=False, into=tight)) == data  # (fresh bytes instead)
    with pytest.raises(EncodingError):
        decode(stored[: len(stored) // 2], copy=False, into=roomy)  # a frame cut short
