"""Restores shared among several processes: the same exact tree, every failure
named once, no temporary left behind when a helper fails or dies."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

import cryo.restore as restore_module
from cryo.backup import run_backup
from cryo.jobreader import JobReader
from cryo.manifest import ManifestEntry
from cryo.restore import RestoreOptions, WriteFailed, _Shard, _totals, run_restore
from cryo.storage.api import Backend
from cryo.storage.local import LocalBackend
from cryo.team import HelperFailed

from .server_helpers import ServerProcess
from .test_backup import KiB, run_cli, small_chunks, tree
from .test_restore import _corrupt_chunk_of, snapshot

__all__ = ["tree"]  # the fixture, re-used from the backup tests


def many_files(src: Path, dirs: int = 6, files: int = 40) -> Path:
    """Small files of varied sizes in several directories, plus one large file."""
    for d in range(dirs):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(files):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d.%d " % (d, i) * (37 * i + d))
    (src / "d0" / "large.bin").write_bytes(os.urandom(700 * KiB + 3))
    return src


def backed_up(tmp_path: Path, **kw: int) -> tuple[Path, LocalBackend, str]:
    """``many_files`` backed up in small chunks: (source, backend, job)."""
    src = many_files(tmp_path / "src", **kw)
    backend = LocalBackend(tmp_path / "repo")
    return src, backend, run_backup(backend, small_chunks(paths=(os.fsencode(src),))).job_id


def under(out: Path, src: Path) -> Path:
    """Where ``src`` lands in a restore into ``out``."""
    return out / os.fsdecode(os.fsencode(src).lstrip(b"/"))


def assert_whole_or_absent(out: Path, src: Path) -> None:
    """No temporary is left anywhere, and every file under its real name is complete."""
    assert list(out.rglob(".cryo-*")) == []
    for p in under(out, src).rglob("f*"):
        assert p.read_bytes() == (src / p.relative_to(under(out, src))).read_bytes()


def shared(
    out: Path, processes: int = 3, unit_files: int = 3, overwrite: str | None = None
) -> RestoreOptions:
    """Options that deal a small job out to ``processes`` processes, a few files at a time."""
    return RestoreOptions(
        target=os.fsencode(out), overwrite=overwrite, processes=processes,
        files_per_process=1, unit_files=unit_files,
    )  # fmt: skip


def count_reopens(tmp_path: Path, backend: Backend) -> None:
    """Note the pid of every process that opens its own connection to ``backend``'s storage."""
    log = tmp_path / "openers"
    reopen = backend.reopen

    def noting() -> Backend:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return reopen()

    backend.reopen = noting  # type: ignore[method-assign]


def openers(tmp_path: Path) -> set[int]:
    return {int(x) for x in (tmp_path / "openers").read_text().split()}


def test_several_processes_restore_every_kind_of_entry_exactly(tmp_path: Path, tree: Path) -> None:
    many_files(tree / "many")
    backend = LocalBackend(tmp_path / "repo")
    job = run_backup(backend, small_chunks(paths=(os.fsencode(tree),))).job_id
    out = tmp_path / "out"
    count_reopens(tmp_path, backend)
    summary = run_restore(backend, job, shared(out))
    assert summary.failures == ()
    helpers = openers(tmp_path)
    assert len(helpers) == 2 and os.getpid() not in helpers  # two helpers did their share
    alone = run_restore(backend, job, RestoreOptions(target=os.fsencode(tmp_path / "alone")))
    assert (summary.files, summary.entries, summary.bytes_written) == (
        alone.files, alone.entries, alone.bytes_written,
    )  # fmt: skip
    assert summary.files == 6 * 40 + 1 + 7  # and seven files in the tree of every kind
    assert snapshot(under(out, tree)) == snapshot(tree)
    assert list(out.rglob(".cryo-*")) == []


def test_a_resumed_restore_with_several_processes_skips_what_is_complete(tmp_path: Path) -> None:
    src, backend, job = backed_up(tmp_path)
    out = tmp_path / "out"
    run_restore(backend, job, shared(out))
    mine = under(out, src)
    for d in range(6):  # a restore that stopped part-way: some files missing, one cut short
        (mine / f"d{d}" / "f7").unlink()
    (mine / "d3" / "f9").write_bytes(b"cut")
    summary = run_restore(backend, job, shared(out, overwrite="if-changed"))
    assert summary.failures == ()
    assert summary.files == 7
    assert summary.skipped == 6 * 40 + 1 - 7
    assert snapshot(mine) == snapshot(src)


def test_several_processes_restore_through_the_server(
    tmp_path: Path, cryo_server: ServerProcess
) -> None:
    src = many_files(tmp_path / "src")
    backend = cryo_server.client()
    job = run_backup(backend, small_chunks(paths=(os.fsencode(src),))).job_id
    out = tmp_path / "out"
    count_reopens(tmp_path, backend)
    summary = run_restore(backend, job, shared(out, 2))
    assert summary.failures == () and summary.files == 6 * 40 + 1
    assert len(openers(tmp_path)) == 1
    assert snapshot(under(out, src)) == snapshot(src)


def test_a_corrupt_chunk_in_a_helpers_share_is_named_once_and_the_rest_restored(
    tmp_path: Path,
) -> None:
    src, backend, job = backed_up(tmp_path)
    out = tmp_path / "out"
    options = shared(out, 2)
    # A file of the helper's share (dealt out as the restore deals), and every file of its chunk.
    share = _Shard(1, 2, options, _totals(backend.describe_job(job), options))
    _, records = JobReader(backend, job).manifest_records()
    every = [(r, ManifestEntry.from_json(r)) for r in records]
    # The shard sees every entry, as a restore does.
    helpers = [e for r, e in every if share.mine(e.kind, r)]
    every_entry = [e for _, e in every]
    files = [e for e in every_entry if e.kind == "f"]
    victim = next(e for e in helpers if e.kind == "f" and e.extents)
    bad = (victim.extents[0].object_name, victim.extents[0].chunk_index)
    hit = {e.path for e in files if bad in {(x.object_name, x.chunk_index) for x in e.extents}}
    _corrupt_chunk_of(backend, job, victim.path)
    summary = run_restore(backend, job, options)
    assert sorted(f.path for f in summary.failures) == sorted(map(os.fsdecode, hit))
    assert summary.files == len(files) - len(hit)
    for path in hit:
        assert not (out / os.fsdecode(path)).exists()
    assert_whole_or_absent(out, src)
    restored = [p for p in under(out, src).rglob("*") if p.is_file()]
    assert len(restored) == len(files) - len(hit)


def deal(
    backend: Backend, job: str, options: RestoreOptions, count: int, with_totals: bool = True
) -> list[list[ManifestEntry]]:
    """The regular files each of ``count`` processes restores, in manifest order."""
    totals = _totals(backend.describe_job(job), options) if with_totals else None
    shards = [_Shard(i, count, options, totals) for i in range(count)]
    shares: list[list[ManifestEntry]] = [[] for _ in range(count)]
    _, records = JobReader(backend, job).manifest_records()
    for r in records:
        e = ManifestEntry.from_json(r)
        owners = [i for i, s in enumerate(shards) if s.mine(e.kind, r)]
        assert len(owners) == 1, "each entry has exactly one process"
        if e.kind == "f":
            shares[owners[0]].append(e)
        else:
            assert owners == [0], "directories and links are the first process's"
    return shares


def test_each_process_restores_one_run_of_files_and_no_two_fill_a_directory_together(
    tmp_path: Path,
) -> None:
    # Two processes creating files in one directory at once contend for its lock.
    _, backend, job = backed_up(tmp_path, dirs=12, files=30)
    options = shared(tmp_path / "out", processes=3)
    shares = deal(backend, job, options, 3)
    _, records = JobReader(backend, job).manifest_records()
    order = [e.path for e in map(ManifestEntry.from_json, records) if e.kind == "f"]
    assert [e.path for share in shares for e in share] == order  # runs, one after the other
    assert all(len(share) >= 12 * 30 // 6 for share in shares)  # each a real share
    dirs = [{e.path.rpartition(b"/")[0] for e in share} for share in shares]
    for a in range(3):
        for b in range(a + 1, 3):
            assert len(dirs[a] & dirs[b]) <= 1  # at most the directory where one run ends
    for left, right in itertools.pairwise(shares):  # files that share a chunk stay together
        end = {(x.object_name, x.chunk_index) for x in left[-1].extents}
        assert not end & {(x.object_name, x.chunk_index) for x in right[0].extents}


def test_without_the_jobs_totals_files_are_dealt_in_units_to_the_least_loaded(
    tmp_path: Path,
) -> None:
    src, backend, job = backed_up(tmp_path, dirs=4, files=30)
    options = shared(tmp_path / "out", processes=2, unit_files=10)
    shares = deal(backend, job, options, 2, with_totals=False)
    assert all(len(share) >= 40 for share in shares)
    assert sum(map(len, shares)) == 4 * 30 + 1
    # A selection restores with the units too, and still gets every selected file back.
    out = tmp_path / "out"
    selected = replace(options, includes=(b"*/d1/*", b"*/d2/*"))
    summary = run_restore(backend, job, selected)
    assert summary.failures == () and summary.files == 60
    assert sorted(p.name for p in under(out, src).iterdir()) == ["d1", "d2"]
    for d in ("d1", "d2"):
        assert snapshot(under(out, src) / d) == snapshot(src / d)


def test_totals_a_job_records_wrongly_change_only_how_files_are_shared(tmp_path: Path) -> None:
    # A job's recorded figures are not trusted: absurd ones are ignored, and
    # figures that are merely wrong give an uneven share, never a file left out.
    src, backend, job = backed_up(tmp_path, dirs=4, files=30)
    stored = backend.describe_job(job)
    for n, figures in enumerate(
        [
            {"files": 10**30, "entries": 10**400, "source_bytes": 10**400},  # too large
            {"files": 200, "entries": 3, "source_bytes": -(2**70)},  # negative
            {"files": 2, "entries": 10**6, "source_bytes": 0},  # wrong: all to the helper
        ]
    ):
        lying = replace(stored, attributes={**stored.attributes, **figures})
        backend.describe_job = lambda job_id, lying=lying: lying  # type: ignore[method-assign]
        out = tmp_path / f"out{n}"
        summary = run_restore(backend, job, shared(out, 2))
        assert summary.failures == () and summary.files == 4 * 30 + 1
        assert snapshot(under(out, src)) == snapshot(src)


@pytest.mark.parametrize("where", ["helper", "first process"])
def test_a_full_target_in_any_process_stops_every_process_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    src, backend, job = backed_up(tmp_path, dirs=8, files=60)
    leader = os.getpid()
    real_pwrite = os.pwrite
    writes = []

    def filling_pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(fd)
        if (os.getpid() == leader) == (where == "first process") and len(writes) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    out = tmp_path / "out"
    with pytest.raises(WriteFailed, match="No space left on device"):
        run_restore(backend, job, shared(out, unit_files=20))
    assert_whole_or_absent(out, src)
    assert list(under(out, src).rglob("f*"))  # some were restored before it stopped


@pytest.mark.parametrize("temporaries", ["unnamed", "named"])
def test_a_helper_that_dies_is_reported_and_its_temporaries_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temporaries: str
) -> None:
    # The helper's run lies past what the first process has read of the manifest
    # when it dies; its named temporaries are found all the same.
    if temporaries == "named":
        monkeypatch.setattr(restore_module, "_can_name_unnamed_files", lambda *_: False)
    src, backend, job = backed_up(tmp_path, dirs=8, files=60)
    leader = os.getpid()
    placed = []

    def dying(real: Callable[..., object]) -> Callable[..., object]:
        def place(*args: object, **kw: object) -> object:
            placed.append(1)
            if os.getpid() != leader and len(placed) > 20:  # killed, with temporaries open
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)

        return place

    # A file gets its name by any of these.
    monkeypatch.setattr(os, "rename", dying(os.rename))
    monkeypatch.setattr(os, "link", dying(os.link))
    by_descriptor = dying(restore_module._link_by_descriptor)
    monkeypatch.setattr(restore_module, "_link_by_descriptor", by_descriptor)
    out = tmp_path / "out"
    with pytest.raises(HelperFailed, match=r"stopped unexpectedly \(signal 9\)"):
        # Small batches: the first process reads the manifest only as it restores.
        run_restore(backend, job, replace(shared(out, 2, unit_files=40), batch_files=4))
    assert_whole_or_absent(out, src)


def test_cli_restores_a_job_of_many_files_with_several_processes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(430):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d" % (d * i) * (i % 50))
    repo = str(tmp_path / "repo")
    b = run_cli("backup", str(src), "--repo", repo, "--quiet")
    assert b.returncode == 0, b.stderr
    job = b.stdout.decode().strip()
    out = tmp_path / "out"
    r = run_cli("restore", job, "--repo", repo, "--to", str(out), "--processes", "2", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.decode().splitlines()[-1])
    assert summary["files"] == 5 * 430 and summary["errors"] == []
    assert snapshot(under(out, src)) == snapshot(src)
    assert list(out.rglob(".cryo-*")) == []
