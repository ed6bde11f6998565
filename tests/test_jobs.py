"""Jobs: incremental backups, resumed runs, the run lock, pools, listing, retention.

Reads are counted from outside the process with inotify (IN_OPEN), and
PutChunk calls from the access log of a real ``cryo server``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cryo.jobs import RetentionPolicy, select_forget
from cryo.storage.api import Job, iter_objects
from cryo.storage.local import LocalBackend

from .inotify import Opened
from .server_helpers import REGION, ServerProcess

CLI = [sys.executable, "-m", "cryo"]


def cryo(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*CLI, *args], capture_output=True, text=True, timeout=300, **kw
    )


def backup_json(*args: str, **kw: object) -> dict[str, object]:
    r = cryo("backup", "--json", *args, **kw)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary"
    return summary  # type: ignore[no-any-return]


def make_tree(root: Path, files: int = 60) -> None:
    (root / "docs").mkdir(parents=True)
    (root / "empty").mkdir()
    for i in range(files):
        (root / "docs" / f"note{i:03d}.txt").write_text(f"note {i}\n" * (i + 1))
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "other.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    (root / "link").symlink_to("docs/note001.txt")


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under root: kind, mode, and content or link target."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("l", 0, os.fsencode(os.readlink(p)))
        elif p.is_dir():
            out[rel] = ("d", st.st_mode & 0o7777, b"")
        else:
            out[rel] = ("f", st.st_mode & 0o7777, p.read_bytes())
    return out


def restored(repo: Path, job: str, dest: Path, src: Path) -> dict[str, tuple[str, int, bytes]]:
    r = cryo("restore", job, "--repo", str(repo), "--to", str(dest), "--quiet")
    assert r.returncode == 0, r.stderr
    return snapshot(dest / str(src).lstrip("/"))


def touch_content(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    later = time.time_ns() + 5_000_000_000
    os.utime(path, ns=(later, later))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    make_tree(root)
    return root


def test_incremental_reads_only_changed_files_and_drops_deleted_ones(
    tmp_path: Path, src: Path
) -> None:
    repo = tmp_path / "repo"
    first = backup_json(str(src), "--repo", str(repo))
    before = snapshot(src)
    assert first["base_job_id"] is None
    assert first["files_unchanged"] == 0

    touch_content(src / "docs" / "note007.txt", b"rewritten\n")
    (src / "docs" / "note009.txt").unlink()
    (src / "other.bin").unlink()
    (src / "docs" / "new.txt").write_text("new\n")
    watch = Opened.tree(src)
    try:
        second = backup_json(str(src), "--repo", str(repo))
        opened = watch.opened_files()
    finally:
        watch.close()

    # Only the changed and the new file were opened; nothing unchanged was read.
    assert opened == {src / "docs" / "note007.txt", src / "docs" / "new.txt"}
    assert second["base_job_id"] == first["job_id"]
    assert second["bytes_read"] == len(b"rewritten\n") + len(b"new\n")
    assert second["files"] == 61
    assert second["files_unchanged"] == 59
    # The deleted large file's object left the new job, and only that one.
    assert second["objects_deleted"] == 1

    after = snapshot(src)
    assert restored(repo, str(second["job_id"]), tmp_path / "r2", src) == after
    # The base job is untouched: it still restores the tree as it was.
    assert restored(repo, str(first["job_id"]), tmp_path / "r1", src) == before
    backend = LocalBackend(repo)
    try:
        names1 = {o.name for o in backend.list_objects(str(first["job_id"])).objects}
        names2 = {o.name for o in backend.list_objects(str(second["job_id"])).objects}
    finally:
        backend.close()
    assert len(names1 - names2) == 1


def test_no_change_incremental_reads_nothing(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    backup_json(str(src), "--repo", str(repo))
    watch = Opened.tree(src)
    try:
        again = backup_json(str(src), "--repo", str(repo))
        assert watch.opened_files() == set()
    finally:
        watch.close()
    assert again["bytes_read"] == 0
    assert again["files_unchanged"] == again["files"] == 62
    assert again["objects_deleted"] == 0


def test_full_reads_everything_and_base_picks_the_job(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    first = backup_json(str(src), "--repo", str(repo))
    full = backup_json(str(src), "--repo", str(repo), "--full")
    assert full["base_job_id"] is None
    assert full["files_unchanged"] == 0
    assert full["bytes_read"] == full["source_bytes"]
    chosen = backup_json(str(src), "--repo", str(repo), "--base", str(first["job_id"]))
    assert chosen["base_job_id"] == first["job_id"]
    assert chosen["bytes_read"] == 0
    # Another set of paths is never used as a base.
    other = backup_json(str(src / "docs"), "--repo", str(repo))
    assert other["base_job_id"] is None


def test_deleting_the_base_keeps_the_incremental_whole(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    first = backup_json(str(src), "--repo", str(repo))
    touch_content(src / "big.bin", os.urandom(1024 * 1024 + 5))
    second = backup_json(str(src), "--repo", str(repo))
    expected = snapshot(src)
    r = cryo("forget", "--repo", str(repo), "--keep-last", "1")
    assert r.returncode == 0, r.stderr
    assert f"forget       {first['job_id']}" in r.stdout
    listed = cryo("jobs", "--repo", str(repo), "--json")
    assert [json.loads(x)["job_id"] for x in listed.stdout.splitlines()] == [second["job_id"]]
    v = cryo("verify", str(second["job_id"]), "--repo", str(repo), "--read-data")
    assert v.returncode == 0, v.stderr
    assert restored(repo, str(second["job_id"]), tmp_path / "r", src) == expected


def _chunk_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "chunks").rglob("*") if p.is_file())


def test_forget_reclaims_space_of_chunks_no_job_uses(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = tmp_path / "data"
    src.mkdir()
    jobs = []
    for _ in range(4):
        (src / "blob.bin").write_bytes(os.urandom(2 * 1024 * 1024))
        (src / "same.txt").write_text("unchanged\n")
        jobs.append(backup_json(str(src), "--repo", str(repo), "--chunk-size", "1"))
    before = _chunk_bytes(repo)
    dry = cryo("forget", "--repo", str(repo), "--keep-last", "2", "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.count("would forget") == 2
    assert _chunk_bytes(repo) == before
    r = cryo("forget", "--repo", str(repo), "--keep-last", "2", "--json")
    assert r.returncode == 0, r.stderr
    actions = {d["job_id"]: d["action"] for d in map(json.loads, r.stdout.splitlines())}
    assert actions == {
        jobs[3]["job_id"]: "keep",
        jobs[2]["job_id"]: "keep",
        jobs[1]["job_id"]: "forget",
        jobs[0]["job_id"]: "forget",
    }
    # The two forgotten blobs (2 MiB each, incompressible) are reclaimed, plus those
    # jobs' own manifests and metadata; what the kept jobs share stays.
    reclaimed = before - _chunk_bytes(repo)
    assert 4 * 1024 * 1024 < reclaimed < 4 * 1024 * 1024 + 64 * 1024
    for job in jobs[2:]:
        v = cryo("verify", str(job["job_id"]), "--repo", str(repo), "--read-data")
        assert v.returncode == 0, v.stderr
    no_rule = cryo("forget", "--repo", str(repo))
    assert no_rule.returncode == 2
    assert "--keep-last" in no_rule.stderr


def _job(day: datetime, n: int) -> Job:
    return Job(
        job_id=f"job-{n:03d}",
        status="COMPLETED",
        created=day,
        completed=day,
        base_job_id=None,
        pool_id="GLACIER",
        client_token=None,
        attributes={"host": "h", "paths": ["/srv"]},
    )


def test_each_keep_rule_keeps_what_it_promises() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # Two jobs a day for 120 days: job 2k at noon, job 2k+1 at 18:00.
    jobs = []
    for d in range(120):
        day = start + timedelta(days=d)
        jobs.append(_job(day, 2 * d))
        jobs.append(_job(day + timedelta(hours=6), 2 * d + 1))

    def kept(policy: RetentionPolicy) -> list[str]:
        return [d.job.job_id for d in select_forget(jobs, policy) if d.keep]

    assert kept(RetentionPolicy(keep_last=3)) == ["job-239", "job-238", "job-237"]
    # One a day, the newest of each day: the evening jobs of the last 5 days.
    assert kept(RetentionPolicy(keep_daily=5)) == [
        f"job-{2 * d + 1:03d}" for d in range(119, 114, -1)
    ]
    # One a week: the newest job of each of the last three ISO weeks (local time).
    by_id = {j.job_id: j for j in jobs}
    weekly = kept(RetentionPolicy(keep_weekly=3))
    week_of = [by_id[i].created.astimezone().isocalendar()[:2] for i in weekly]
    assert weekly[0] == "job-239" and len(set(week_of)) == 3
    for job_id, week in zip(weekly, week_of, strict=True):
        same_week = [j for j in jobs if j.created.astimezone().isocalendar()[:2] == week]
        assert job_id == max(same_week, key=lambda j: j.created).job_id
    monthly = kept(RetentionPolicy(keep_monthly=12))
    # January to April 2026 hold jobs (120 days from Jan 1): four months, newest of each.
    assert len(monthly) == 4
    assert monthly[0] == "job-239"
    combined = kept(RetentionPolicy(keep_last=1, keep_monthly=2))
    assert combined == monthly[:2]
    # In-progress jobs are never selected, and other host/paths groups are separate.
    running = Job(
        "run", "IN_PROGRESS", start, None, None, None, None, {"host": "h", "paths": ["/srv"]}
    )
    other = _job(start, 999)
    other = Job(
        other.job_id, "COMPLETED", start, start, None, None, None, {"host": "x", "paths": []}
    )
    decisions = select_forget([*jobs, running, other], RetentionPolicy(keep_last=1))
    ids = {d.job.job_id: d.keep for d in decisions}
    assert "run" not in ids
    assert ids["job-999"] is True


def test_pools_are_recorded_listed_and_checked(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    g = backup_json(str(src), "--repo", str(repo))
    d = backup_json(str(src), "--repo", str(repo), "--pool", "DEEP_ARCHIVE", "--tag", "monthly")
    # A job in another pool is never the base.
    assert d["base_job_id"] is None
    listed = cryo("jobs", "--repo", str(repo), "--json")
    records = {r["job_id"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert records[str(g["job_id"])]["pool"] == "GLACIER"
    deep = records[str(d["job_id"])]
    assert deep["pool"] == "DEEP_ARCHIVE"
    assert deep["tags"] == ["monthly"]
    assert deep["paths"] == [str(src)]
    assert deep["host"] == os.uname().nodename
    assert deep["files"] == 62
    assert deep["source_bytes"] == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert deep["status"] == "COMPLETED"
    assert deep["stored_bytes"] > 0
    only = cryo("jobs", "--repo", str(repo), "--pool", "deep_archive", "--json")
    assert [json.loads(x)["job_id"] for x in only.stdout.splitlines()] == [d["job_id"]]
    for command in (["backup", str(src)], ["jobs"], ["forget", "--keep-last", "1"]):
        bad = cryo(*command, "--repo", str(repo), "--pool", "TAPE")
        assert bad.returncode == 2
        assert "unknown pool 'TAPE'" in bad.stderr
        assert "Traceback" not in bad.stderr


def test_jobs_pages_with_a_marker_and_ls_lists_entries(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    ids = [str(backup_json(str(src), "--repo", str(repo))["job_id"]) for _ in range(3)]
    page = cryo("jobs", "--repo", str(repo), "--limit", "2", "--json")
    assert [json.loads(x)["job_id"] for x in page.stdout.splitlines()] == ids[:0:-1]
    marker = page.stderr.split("--marker ")[1].split()[0]
    rest = cryo("jobs", "--repo", str(repo), "--marker", marker, "--json")
    assert [json.loads(x)["job_id"] for x in rest.stdout.splitlines()] == [ids[0]]
    assert "--marker" not in rest.stderr

    listing = cryo("ls", ids[-1], str(src / "docs"), "--repo", str(repo))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 61  # the directory and its 60 notes
    assert lines[0].startswith("drwx")
    note = next(x for x in lines if x.endswith("/docs/note002.txt"))
    assert note.startswith("-rw-")
    assert f" {(src / 'docs' / 'note002.txt').stat().st_size} " in note
    link = cryo("ls", ids[-1], str(src / "link"), "--repo", str(repo)).stdout
    assert link.startswith("lrwx") and link.rstrip().endswith("-> docs/note001.txt")
    missing = cryo("ls", "20990101T000000Z-00000000", "--repo", str(repo))
    assert missing.returncode == 11


def test_second_run_waits_for_or_refuses_the_lock(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(40):
        (src / f"chunky{i}.bin").write_bytes(os.urandom(1024 * 1024 + i))
    first = subprocess.Popen(
        [*CLI, "backup", str(src), "--repo", str(repo), "--quiet", "--connections", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    locks = tmp_path / "state" / "cryo" / "locks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        held = [p for p in locks.glob("*.lock")] if locks.exists() else []
        if held and held[0].read_text().strip() == str(first.pid):
            break
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        refused = cryo("backup", str(src), "--repo", str(repo))
        assert refused.returncode == 13
        assert f"pid {first.pid}" in refused.stderr
        assert "--lock-wait" in refused.stderr
        waiting = subprocess.Popen(
            [*CLI, "backup", str(src), "--repo", str(repo), "--json", "--lock-wait", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting for the lock
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    w_out, w_err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, w_err
    summary = json.loads(w_out.splitlines()[-1])
    # It ran after the first one finished, on top of it.
    assert summary["base_job_id"] == out.strip()
    assert summary["bytes_read"] == 0


def _log_records(server: ServerProcess, key_id: str) -> list[dict[str, object]]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r.get("key") == key_id and r.get("operation"):
                out.append(r)
    return out


def test_killed_run_is_resumed_without_resending_committed_chunks(
    tmp_path: Path, json_server: ServerProcess
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"part{i:02d}.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    for i in range(300):
        (src / f"small{i:03d}.txt").write_text(f"small file {i}\n" * 40)
    key_id, secret = json_server.new_key()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "CRYO_REGION": REGION,
    }
    args = [
        *CLI, "backup", str(src), "--endpoint-url", json_server.url, "--chunk-size", "1",
        "--connections", "2", "--quiet",
    ]  # fmt: skip
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [r for r in _log_records(json_server, key_id) if r["operation"] in
                ("NotifyObjectComplete", "PutObject")]  # fmt: skip
        if len(done) >= 8:
            break
        time.sleep(0.005)
    # Freeze the server so the client cannot get further, then kill the client.
    os.kill(json_server.process.pid, signal.SIGSTOP)
    first.kill()
    first.wait()
    os.kill(json_server.process.pid, signal.SIGCONT)

    client = json_server.client((key_id, secret))
    try:
        (job,) = client.list_jobs().jobs
        assert job.status == "IN_PROGRESS"
        # Requests the server had already received still finish: wait for quiet.
        committed: list[object] = []
        while True:
            listed = list(iter_objects(client, job.job_id))
            if listed == committed:
                break
            committed = listed  # type: ignore[assignment]
            time.sleep(0.5)
        committed_chunks = sum(o.chunks_count for o in listed)
        assert listed and all(o.name != "manifest" for o in listed)
    finally:
        client.close()
    mark = len(_log_records(json_server, key_id))

    second = subprocess.run(
        [*args[:-1], "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.splitlines()[-1])
    assert summary["job_id"] == job.job_id  # the same job, completed once
    assert summary["resumed"] is True
    puts = [r for r in _log_records(json_server, key_id)[mark:]
            if r["operation"] in ("PutChunk", "PutObject")]  # fmt: skip

    # A fresh full backup of the same tree says how many chunk uploads it takes.
    mark = len(_log_records(json_server, key_id))
    fresh = subprocess.run(
        [*args[:-1], "--full", "--json", "--pool", "DEEP_ARCHIVE"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    full_puts = [r for r in _log_records(json_server, key_id)[mark:]
                 if r["operation"] in ("PutChunk", "PutObject")]  # fmt: skip
    # Nothing committed before the kill was sent again.
    assert len(puts) == len(full_puts) - committed_chunks
    assert summary["files_unchanged"] > 0

    client = json_server.client((key_id, secret))
    try:
        final = client.describe_job(job.job_id)
        assert final.status == "COMPLETED"
    finally:
        client.close()
    dest = tmp_path / "restored"
    r = subprocess.run(
        [*CLI, "restore", job.job_id, "--endpoint-url", json_server.url, "--to", str(dest)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert snapshot(dest / str(src).lstrip("/")) == snapshot(src)


def test_client_token_makes_a_rerun_idempotent(tmp_path: Path, src: Path) -> None:
    repo = tmp_path / "repo"
    first = cryo("backup", str(src), "--repo", str(repo), "--client-token", "nightly-2026-11-21")
    assert first.returncode == 0, first.stderr
    again = cryo("backup", str(src), "--repo", str(repo), "--client-token", "nightly-2026-11-21")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "already complete" in again.stderr
    listed = cryo("jobs", "--repo", str(repo), "--json").stdout.splitlines()
    assert len(listed) == 1
