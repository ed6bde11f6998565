"""Fault injection: backups, verifies and restores through a proxy that fails requests.

A real ``cryo server`` sits behind ``tests/faultproxy.FaultProxy``, which
answers a seeded share of requests with ThrottlingException,
RetryableException, ServiceUnavailableException or ServiceInternalException
(before or after the server did the work), resets connections in the middle
of requests and replies, and delays replies. The CLI runs as a subprocess
against the proxy's URL, exactly as a user would run it.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryo.checksums import chunk_checksum
from cryo.retry import RetryingBackend, RetryPolicy
from cryo.storage.remote import RemoteBackend

from .faultproxy import AFTER, BEFORE, DELAY, ERRORS, KINDS, RESET_REPLY, FaultProxy
from .server_helpers import REGION, ServerProcess

CLI = [sys.executable, "-m", "cryo"]
MiB = 1024 * 1024


def cryo(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def summary_of(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    record: dict[str, object] = json.loads(r.stdout.splitlines()[-1])
    assert record["type"] == "summary"
    return record


def make_mixed_tree(root: Path, seed: int = 7) -> None:
    """Small files to pack, single- and multi-chunk files, links, empty files and dirs."""
    rnd = random.Random(seed)
    root.mkdir()
    for d in range(8):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(60):
            target = sub if i % 2 else sub.parent
            if i % 3:
                data = rnd.randbytes(rnd.randint(1, 12_000))
            else:
                data = f"line {i} of dir {d}\n".encode() * rnd.randint(1, 400)
            (target / f"f{i:03d}").write_bytes(data)
    (root / "empty-dir" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-file").write_bytes(b"")
    for i in range(4):
        (root / f"exact{i}.bin").write_bytes(rnd.randbytes(MiB))  # one chunk: PutObject
    for i in range(10):
        (root / f"medium{i}.bin").write_bytes(rnd.randbytes(MiB + rnd.randint(1, MiB)))
    (root / "large.bin").write_bytes(rnd.randbytes(12 * MiB + 12_345))
    (root / "link-to-file").symlink_to("dir0/f000")
    (root / "link-to-dir").symlink_to("dir1/nested")
    (root / "dangling").symlink_to("no/such/target")
    os.link(root / "medium0.bin", root / "hardlink.bin")
    os.chmod(root / "dir2" / "nested" / "f001", 0o600)
    os.chmod(root / "exact0.bin", 0o700)
    os.chmod(root / "dir3", 0o700)
    os.utime(root / "dir4" / "f002", ns=(1_600_000_000_123_456_789,) * 2)
    os.utime(root / "empty-dir" / "deeper", ns=(1_500_000_000_000_000_001,) * 2)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: type, mode, owner, mtime, content or link target, links."""
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            info: tuple[object, ...] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            )  # fmt: skip
            if stat.S_ISLNK(st.st_mode):
                info += (os.readlink(p),)
            else:
                info += (st.st_mtime_ns,)
            if stat.S_ISREG(st.st_mode):
                info += (p.read_bytes(), groups.setdefault(st.st_ino, rel))
            out[rel] = info
    return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "server").mkdir()
    srv = ServerProcess(tmp_path / "server")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def env(server: ServerProcess) -> dict[str, str]:
    key_id, secret = server.new_key()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CRYO_")},
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "CRYO_REGION": REGION,
    }


def test_backup_verify_restore_survive_ten_percent_faults(
    tmp_path: Path, server: ServerProcess, env: dict[str, str]
) -> None:
    src = tmp_path / "src"
    make_mixed_tree(src)
    expected = snapshot(src)
    with FaultProxy(server.url, rate=0.10, seed=20261121) as proxy:
        url = ["--endpoint-url", proxy.url]

        backup = summary_of(
            cryo("backup", str(src), *url, "--chunk-size", "1", "--retry-max-time", "60",
                 "--json", env=env)
        )  # fmt: skip
        during_backup = proxy.counts
        assert backup["status"] == "COMPLETED"
        assert backup["resumed"] is False
        assert backup["errors"] == []
        # Every fault the client saw cost exactly one retry, and nothing else failed.
        assert during_backup.visible > 0
        assert backup["retries"] == during_backup.visible

        mark = proxy.counts
        verify = cryo("verify", str(backup["job_id"]), *url, "--read-data", "--json", env=env)
        assert verify.returncode == 0, verify.stderr
        assert json.loads(verify.stdout.splitlines()[-1])["bad_files"] == 0
        during_verify = proxy.counts.since(mark)

        mark = proxy.counts
        dest = tmp_path / "restored"
        restore = summary_of(
            cryo("restore", str(backup["job_id"]), *url, "--to", str(dest), "--json", env=env)
        )
        during_restore = proxy.counts.since(mark)
        assert restore["errors"] == []
        assert during_restore.visible > 0
        assert restore["retries"] == during_restore.visible
        total = proxy.counts

    assert snapshot(dest / str(src).lstrip("/")) == expected
    assert not list(dest.rglob(".cryo-restore-*"))
    # Every kind of fault happened, modeled errors both before and after the server's work.
    assert set(total.injected) == set(KINDS)
    assert {stage for (kind, stage) in total.stages if kind in ERRORS} == {BEFORE, AFTER}
    assert 0.05 < sum(total.injected.values()) / total.requests < 0.2
    # The job holds each object once (a retried call never made a second one).
    client = server.client((env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    try:
        (job,) = client.list_jobs().jobs
        assert job.status == "COMPLETED"
        names = [o.name for o in client.list_objects(job.job_id).objects]
        assert len(names) == len(set(names))
    finally:
        client.close()
    print(
        f"\nfaults: {total.requests} requests, injected {dict(total.injected)}; "
        f"by stage {dict(total.stages)}; retries: backup {backup['retries']} "
        f"({during_backup.requests} requests), verify ({during_verify.requests} requests, "
        f"{during_verify.visible} faults), restore {restore['retries']} "
        f"({during_restore.requests} requests)"
    )


def test_every_write_is_idempotent_when_the_reply_is_lost(
    tmp_path: Path, server: ServerProcess, env: dict[str, str]
) -> None:
    """The server did the work, the client saw an error: each write operation is retried
    once (first full, then incremental with deletions) and the result is still exact."""
    src = tmp_path / "src"
    make_mixed_tree(src)
    writes = frozenset(
        {"CreateJob", "StartObject", "PutChunk", "PutObject", "NotifyObjectComplete",
         "DeleteObject", "CompleteJob"}
    )  # fmt: skip
    kinds = (*ERRORS, RESET_REPLY)
    args = ["--chunk-size", "1", "--retry-max-time", "60", "--json"]
    with FaultProxy(
        server.url, rate=1.0, kinds=kinds, operations=writes, stage=AFTER, per_operation=1
    ) as proxy:
        first = summary_of(cryo("backup", str(src), "--endpoint-url", proxy.url, *args, env=env))
        assert set(proxy.counts.faulted) == writes - {"DeleteObject"}
        assert first["retries"] == len(writes) - 1
        (src / "medium3.bin").unlink()
        (src / "dir5" / "f004").write_bytes(b"changed\n")
    with FaultProxy(
        server.url, rate=1.0, kinds=kinds, operations=writes, stage=AFTER, per_operation=1
    ) as proxy:
        second = summary_of(cryo("backup", str(src), "--endpoint-url", proxy.url, *args, env=env))
        assert second["base_job_id"] == first["job_id"]
        assert second["objects_deleted"] == 1
        assert "DeleteObject" in proxy.counts.faulted
        assert second["retries"] == proxy.counts.visible
        expected = snapshot(src)
        dest = tmp_path / "restored"
        r = cryo("restore", str(second["job_id"]), "--endpoint-url", proxy.url, "--to",
                 str(dest), "--quiet", env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert snapshot(dest / str(src).lstrip("/")) == expected


@pytest.mark.parametrize("kind", [RESET_REPLY, "ServiceInternalException"])
def test_a_put_object_sent_again_keeps_its_data(server: ServerProcess, kind: str) -> None:
    """The server stored the object, the reply was lost, the client sent it again:
    the object (same name, same bytes) must still have its chunk."""
    key_id, secret = server.new_key()
    with FaultProxy(
        server.url, rate=1.0, kinds=(kind,), operations=frozenset({"PutObject"}),
        stage=AFTER, per_operation=1,
    ) as proxy:  # fmt: skip
        remote = RemoteBackend(
            proxy.url, region=REGION, aws_access_key_id=key_id, aws_secret_access_key=secret
        )
        backend = RetryingBackend(remote, RetryPolicy(max_elapsed=30, initial=0.01, maximum=0.1))
        try:
            job = backend.create_job()
            data = os.urandom(5000)
            backend.put_object(job.job_id, "object", data, len(data), chunk_checksum(data))
            assert backend.retries == 1 and proxy.counts.injected[kind] == 1
            backend.complete_job(job.job_id)
            (obj,) = backend.list_objects(job.job_id).objects
            (chunk,) = backend.list_chunks(job.job_id, obj.object_token).chunks
            assert backend.get_chunk(job.job_id, chunk.chunk_token).data == data
        finally:
            backend.close()


def test_endpoint_down_longer_than_the_cap_exits_10_and_leaves_a_resumable_job(
    tmp_path: Path, server: ServerProcess, env: dict[str, str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    for i in range(40):
        (src / f"part{i:02d}.bin").write_bytes(rnd.randbytes(MiB + 1000 + i))
    for i in range(200):
        (src / f"small{i:03d}.txt").write_text(f"small file {i}\n" * 50)
    expected = snapshot(src)
    cap = 3.0
    # Every reply a little late, so the run is still going when the endpoint goes down.
    with FaultProxy(server.url, rate=1.0, kinds=(DELAY,), delay=(0.01, 0.03)) as proxy:
        args = [
            "backup", str(src), "--endpoint-url", proxy.url, "--chunk-size", "1",
            "--connections", "2", "--retry-max-time", str(cap),
        ]  # fmt: skip
        first = subprocess.Popen(
            [*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            done = proxy.counts.operations
            if done["NotifyObjectComplete"] + done["PutObject"] >= 6:
                break
            time.sleep(0.005)
        assert first.poll() is None, "the backup finished before the endpoint went down"
        proxy.set_down(True)
        down_at = time.monotonic()
        out, err = first.communicate(timeout=cap + 60)
        took = time.monotonic() - down_at
        assert first.returncode == 10, err
        assert took < cap + 10, f"exit {took:.1f} s after the endpoint went down"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cryo: "), err
        assert "Traceback" not in err and out == ""
        assert proxy.counts.down_resets > 0

        # The job is left unfinished, and this backup's pending-run record names it.
        client = server.client((env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
        try:
            (job,) = client.list_jobs().jobs
        finally:
            client.close()
        assert job.status == "IN_PROGRESS"
        pending = list((Path(os.environ["XDG_STATE_HOME"]) / "cryo" / "pending").glob("*.json"))
        assert len(pending) == 1

        proxy.set_down(False)
        proxy.set_rate(0.0)
        again = summary_of(cryo(*args, "--json", env=env))
        assert again["job_id"] == job.job_id
        assert again["resumed"] is True
        assert isinstance(again["files_unchanged"], int) and again["files_unchanged"] > 0
        assert again["status"] == "COMPLETED"
        assert not pending[0].exists()
        dest = tmp_path / "restored"
        r = cryo("restore", job.job_id, "--endpoint-url", proxy.url, "--to", str(dest),
                 "--quiet", env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert snapshot(dest / str(src).lstrip("/")) == expected
    print(f"\nendpoint down: exit 10 after {took:.1f} s (cap {cap} s); "
          f"resumed with {again['files_unchanged']} files reused")  # fmt: skip


def test_jobs_ls_and_forget_retry_too(
    tmp_path: Path, server: ServerProcess, env: dict[str, str]
) -> None:
    """Listing, ``ls`` and ``forget`` go through the same retries as backups."""
    src = tmp_path / "src"
    src.mkdir()
    jobs = []
    for i in range(3):
        (src / f"day{i}").write_bytes(os.urandom(1000))
        r = cryo("backup", "-q", str(src), "--endpoint-url", server.url, env=env)
        assert r.returncode == 0, r.stderr
        jobs.append(r.stdout.strip())
    # Every operation fails once after the server did the work (a modeled error or
    # a reply cut short), so each DeleteJob is sent again after it succeeded.
    kinds = (*ERRORS, RESET_REPLY)
    with FaultProxy(
        server.url, rate=1.0, seed=5, kinds=kinds, stage=AFTER, per_operation=1
    ) as proxy:
        url = ["--endpoint-url", proxy.url]
        listed = cryo("jobs", *url, "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(x)["job_id"] for x in listed.stdout.splitlines()] == jobs[::-1]
        ls = cryo("ls", jobs[0], *url, env=env)
        assert ls.returncode == 0, ls.stderr
        assert "day0" in ls.stdout
        forget = cryo("forget", "--keep-last", "1", *url, env=env)
        assert forget.returncode == 0, forget.stderr
        assert {"ListJobs", "DeleteJob"} <= set(proxy.counts.faulted)
    client = server.client((env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    try:
        assert [j.job_id for j in client.list_jobs().jobs] == [jobs[-1]]
    finally:
        client.close()
