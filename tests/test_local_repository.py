"""The embedded repository's own promises: on-disk layout, deduplication,
reclamation, ownership, crash safety and several processes at once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cryo.checksums import chunk_checksum, summary_checksum
from cryo.errors import AccessDeniedException, IllegalArgumentException, RepositoryError
from cryo.storage.local import LocalBackend, default_repository_path

from .storage_helpers import all_objects, contents, put_small, read_object, upload


def chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def test_chunks_are_stored_once_across_jobs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    shared = os.urandom(10_000)
    for _ in range(3):
        job = b.create_job().job_id
        upload(b, job, "f", [shared, os.urandom(10)])
    assert len(chunk_files(repo)) == 1 + 3
    assert (repo / "chunks" / chunk_files(repo).pop()[:2]).is_dir()


def test_deleting_jobs_reclaims_only_unshared_chunks(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    shared, only_a, only_b = os.urandom(1000), os.urandom(1000), os.urandom(1000)
    a = b.create_job().job_id
    upload(b, a, "f", [shared, only_a], blob=b"a-blob")
    b.complete_job(a)
    inc = b.create_job(base_job_id=a).job_id
    put_small(b, inc, "g", only_b)
    b.complete_job(inc)
    before = chunk_files(repo)
    b.delete_job(a)
    assert chunk_files(repo) == before  # everything of a is still used by inc
    b.delete_job(inc)
    assert chunk_files(repo) == set()


def test_replaced_and_abandoned_data_is_reclaimed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    job = b.create_job().job_id
    put_small(b, job, "x", b"first version")
    put_small(b, job, "x", b"second version")
    assert chunk_files(repo) == {hashlib.sha256(b"second version").hexdigest()}
    pending = b.start_object(job, "abandoned")
    b.put_chunk(job, pending, 0, b"lost", 4, chunk_checksum(b"lost"))
    assert len(chunk_files(repo)) == 2
    b.complete_job(job)
    assert len(chunk_files(repo)) == 1


def test_a_chunk_file_left_without_its_catalog_row_is_taken_back_then_reclaimed(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    # What a writer killed after putting a chunk file in place, before its row, leaves.
    (repo / "chunks" / sha[:2]).mkdir(parents=True, exist_ok=True)
    (repo / "chunks" / sha[:2] / sha).write_bytes(data)
    job = b.create_job().job_id
    upload(b, job, "f", [data, b"tail"])
    put_small(b, job, "g", data)
    b.complete_job(job)
    assert contents(b, job) == {"f": data + b"tail", "g": data}
    b.delete_job(job)
    assert chunk_files(repo) == set()


def test_the_metadata_blob_of_a_refused_completion_is_not_kept(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    job = b.create_job().job_id
    upload_id = b.start_object(job, "f")
    data = b"the object's bytes"
    b.put_chunk(job, upload_id, 0, data, len(data), chunk_checksum(data))
    blob = os.urandom(3000)
    with pytest.raises(IllegalArgumentException, match="SUMMARY"):
        b.notify_object_complete(
            job,
            upload_id,
            summary_checksum([chunk_checksum(b"other bytes")]),
            "SUMMARY",
            metadata_blob=blob,
            metadata_blob_length=len(blob),
            metadata_blob_checksum=chunk_checksum(blob),
            metadata_blob_checksum_algorithm="SHA256",
        )
    b.notify_object_complete(job, upload_id, summary_checksum([chunk_checksum(data)]), "SUMMARY")
    b.complete_job(job)
    assert contents(b, job) == {"f": data}
    assert chunk_files(repo) == {hashlib.sha256(data).hexdigest()}


def test_a_chunk_sent_again_with_other_bytes_frees_the_first(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    job = b.create_job().job_id
    upload_id = b.start_object(job, "o")
    first, second = os.urandom(1000), os.urandom(1000)
    b.put_chunk(job, upload_id, 0, first, len(first), chunk_checksum(first))
    b.put_chunk(job, upload_id, 0, second, len(second), chunk_checksum(second))
    b.notify_object_complete(job, upload_id, summary_checksum([chunk_checksum(second)]))
    assert contents(b, job) == {"o": second}
    assert chunk_files(repo) == {hashlib.sha256(second).hexdigest()}


def test_jobs_belong_to_their_owner(tmp_path: Path) -> None:
    root = LocalBackend(tmp_path / "repo")
    alice, bob = root.for_owner("AKIDALICE"), root.for_owner("AKIDBOB")
    job = alice.create_job().job_id
    put_small(alice, job, "a", b"a")
    with pytest.raises(AccessDeniedException):
        bob.list_objects(job)
    with pytest.raises(AccessDeniedException):
        put_small(bob, job, "b", b"b")
    with pytest.raises(AccessDeniedException):
        bob.delete_job(job)
    assert bob.list_jobs().jobs == ()
    assert [j.job_id for j in alice.list_jobs().jobs] == [job]
    # The same client token under two owners names two jobs.
    assert alice.create_job(client_token="t").job_id != bob.create_job(client_token="t").job_id


def test_refuses_a_directory_that_is_not_a_repository(tmp_path: Path) -> None:
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(RepositoryError, match="not a cryo repository"):
        LocalBackend(tmp_path)
    with pytest.raises(RepositoryError, match="no cryo repository"):
        LocalBackend(tmp_path / "missing", create=False)
    repo = tmp_path / "repo"
    LocalBackend(repo).close()
    marker = json.loads((repo / "cryo-repository.json").read_text())
    marker["version"] = 99
    (repo / "cryo-repository.json").write_text(json.dumps(marker))
    with pytest.raises(RepositoryError, match="version 99"):
        LocalBackend(repo)


def test_default_repository_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYO_REPO", str(tmp_path / "explicit"))
    assert default_repository_path() == tmp_path / "explicit"
    monkeypatch.delenv("CRYO_REPO")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_repository_path() == tmp_path / "xdg" / "cryo" / "repository"


def test_many_threads_share_one_backend(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "repo")
    job = b.create_job().job_id
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                upload(b, job, f"t{t}/o{i}", [os.urandom(2000), b"common"])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    objs = all_objects(b, job)
    assert len(objs) == 120
    for o in objs:
        read_object(b, job, o)


# -- several processes, and crashes ---------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys
    from cryo.storage.local import LocalBackend
    from tests.storage_helpers import upload
    repo, job, prefix, log, count = sys.argv[1:6]
    b = LocalBackend(repo)
    with open(log, "a") as out:
        for i in range(int(count)):
            name = f"{prefix}{i:05d}"
            parts = [os.urandom(20_000), b"shared-by-everyone" * 100, os.urandom(50)]
            upload(b, job, name, parts, metadata_string=name)
            out.write(name + "\\n")
            out.flush()
            os.fsync(out.fileno())
    """
)


def _spawn_writer(
    tmp_path: Path, repo: Path, job: str, prefix: str, count: int
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{prefix}.log"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(repo), job, prefix, str(log), str(count)],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return proc, log


def test_two_processes_write_one_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    job_a, job_b = b.create_job().job_id, b.create_job().job_id
    pa, _ = _spawn_writer(tmp_path, repo, job_a, "a", 40)
    pb, _ = _spawn_writer(tmp_path, repo, job_b, "b", 40)
    assert pa.wait(timeout=240) == 0
    assert pb.wait(timeout=240) == 0
    for job, prefix in ((job_a, "a"), (job_b, "b")):
        objs = all_objects(b, job)
        assert [o.name for o in objs] == [f"{prefix}{i:05d}" for i in range(40)]
        for o in objs:
            assert len(b"".join(read_object(b, job, o))) == 20_000 + 1800 + 50


@pytest.mark.parametrize("kill_after", [0.6, 1.3])
def test_sigkill_mid_upload_leaves_repository_consistent(tmp_path: Path, kill_after: float) -> None:
    repo = tmp_path / "repo"
    b = LocalBackend(repo)
    job = b.create_job().job_id
    b.close()
    proc, log = _spawn_writer(tmp_path, repo, job, "k", 100_000)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None, "writer died before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acknowledged = log.read_text().split()
    b = LocalBackend(repo)
    objs = all_objects(b, job)
    names = [o.name for o in objs]
    # Every acknowledged object is there; at most one more (completed, not yet logged).
    assert names[: len(acknowledged)] == acknowledged
    assert len(names) - len(acknowledged) <= 1
    for o in objs:
        assert o.metadata_string == o.name
        assert len(b"".join(read_object(b, job, o))) == 20_000 + 1800 + 50
    # The repository keeps working: more uploads, completion, a clean reclaim.
    put_small(b, job, "after-crash", b"still fine")
    b.complete_job(job)
    assert contents(b, job)["after-crash"] == b"still fine"
    b.delete_job(job)
    # Nothing is left but, at most, the one chunk whose rename the kill cut off from
    # its catalog row; the killed writer's temporary files were removed on reopen.
    assert len(chunk_files(repo)) <= 1
    assert list((repo / "tmp").iterdir()) == []


def test_closing_while_threads_write_fails_their_calls_cleanly(tmp_path: Path) -> None:
    """An interrupted backup closes the repository while its uploads still run."""
    script = textwrap.dedent(
        """
        import sys, threading, time
        from pathlib import Path
        from cryo.checksums import chunk_checksum
        from cryo.errors import RepositoryError
        from cryo.storage.local import LocalBackend

        outcomes = []
        for round_ in range(10):
            b = LocalBackend(Path(sys.argv[1]) / str(round_))
            job = b.create_job().job_id

            def work(n: int) -> None:
                i = 0
                try:
                    while True:
                        d = b"%d-%d" % (n, i)
                        b.put_object(job, f"o{n}-{i}", d, len(d), chunk_checksum(d))
                        i += 1
                except RepositoryError as exc:
                    outcomes.append(str(exc))
                except Exception as exc:
                    outcomes.append(repr(exc))

            threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            b.close()
            for t in threads:
                t.join()
        for outcome in sorted(set(outcomes)):
            print(outcome.replace(sys.argv[1], "REPO"))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr  # a freed connection stepped by a thread would crash
    # Every round's writers stopped on the clear error, and on nothing else.
    assert r.stdout.splitlines() == [f"the repository REPO/{n} is closed" for n in range(10)]
