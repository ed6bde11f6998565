"""Crashes: a backup client killed at chosen points, and a server killed mid-upload.

Client kills. A ``cryo backup`` talks to a ``cryo server`` through a small
relay that records every request (operation, object, chunk index, the
chunk's SHA-256 from the query) and whether its reply reached the client.
The relay also makes each kill point exact rather than a matter of timing:
when a chosen request arrives (or a chosen reply comes back from the
server), it freezes, so nothing else passes in either direction, and the
client is killed with SIGKILL. The same command is then run again.
Five kill points, their request numbers drawn from a seeded generator
(``CRYO_CRASH_SEED``), across five jobs of a changing tree:

========================  ==========================================================
kill point                what the server has when the client dies
========================  ==========================================================
mid uploads               the n-th data object completed, its reply never delivered
early uploads             the job and a few chunks; the n-th upload never arrives
manifest being written    every data object; the manifest's first chunk never arrives
manifest complete         the manifest object completed, its reply never delivered
job complete              the job marked COMPLETED, its reply never delivered
========================  ==========================================================

After each rerun: the job completed (the same job; after the last point the
rerun makes a new job that reads nothing and sends no data), no data chunk
of an object the server had completed was sent again (by object and index,
and by content), and no (object, index) was accepted twice. At the end,
every job passes ``cryo verify --read-data`` and the last one restores the
tree exactly. The manifest is written anew by the attempt that completes a
job (it describes the tree that attempt saw), so it is not counted; neither
are chunks sent into an upload the kill left unfinished, which the API
discards (the test reports how many there were).

Server kill. Two backups upload at once; once several objects are complete
the server is frozen (SIGSTOP), the catalog is read as it stands, then the
server and the clients are killed with SIGKILL. A new server on the same
repository must show every object that was complete, intact, and no object
that was not; the job completed earlier verifies; rerunning the two backups
completes their jobs, which verify and restore.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryo.server import routes
from cryo.storage.api import iter_chunks, iter_objects

from .server_helpers import REGION, ServerProcess
from .storage_helpers import read_object

CLI = [sys.executable, "-m", "cryo"]
MiB = 1024 * 1024
SEED = int(os.environ.get("CRYO_CRASH_SEED", "20261121"))
MANIFEST = "manifest"
UPLOADS = ("PutChunk", "PutObject")


# -- the relay ------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the relay passed on (or held), and what became of it."""

    operation: str
    labels: dict[str, str]
    query: dict[str, str]
    name: str | None = None
    """The object: from the path, or for an upload id from its StartObject reply."""
    status: int | None = None
    acked: bool = False
    """The server's reply was passed to the client."""
    reply: bytes = b""

    @property
    def job(self) -> str | None:
        return self.labels.get("jobId")

    @property
    def index(self) -> int:
        return int(self.labels.get("chunkIndex", "0"))

    @property
    def sha(self) -> str:
        return base64.b64decode(self.query["checksum"]).hex()


Hold = Callable[[Exchange, str], bool]
"""Decides, for a request ("request") or its reply ("reply"), whether the relay freezes."""


def _read_head(f: BinaryIO) -> tuple[str, dict[str, str], bytes] | None:
    lines: list[bytes] = []
    while True:
        line = f.readline(65536)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    headers: dict[str, str] = {}
    for raw in lines[1:-1]:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].decode("latin-1").rstrip("\r\n"), headers, b"".join(lines)


def _read_body(f: BinaryIO, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ConnectionError("the relay handles Content-Length bodies only")
    n = int(headers.get("content-length", "0"))
    body = f.read(n)
    if len(body) != n:
        raise ConnectionError("connection closed inside a body")
    return body


class Relay:
    """A recording HTTP relay in front of a server, able to freeze at a chosen exchange."""

    def __init__(self, upstream: str, hold: Hold | None = None, port: int = 0) -> None:
        host, upstream_port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(upstream_port))
        self.hold = hold
        self.exchanges: list[Exchange] = []
        self.errors: list[str] = []
        self.frozen = threading.Event()
        self._released = threading.Event()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._names: dict[str, str] = {}  # upload id -> object name
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            f = client.makefile("rb")
            while True:
                head = _read_head(f)
                if head is None:
                    return
                start, headers, raw = head
                body = _read_body(f, headers)
                method, target, _ = start.split(" ", 2)
                ex = self._describe(method, target)
                if not self._pass(ex, "request"):
                    self._released.wait()
                    return
                try:
                    status, reply, reply_body = self._forward(raw + body)
                finally:
                    with self._cond:
                        self._in_flight -= 1
                        self._cond.notify_all()
                ex.status, ex.reply = status, reply_body
                if not self._pass(ex, "reply"):
                    self._released.wait()
                    return
                client.sendall(reply)
        except (OSError, ValueError) as exc:
            if not self.frozen.is_set():
                self.errors.append(repr(exc))
        finally:
            client.close()

    def _describe(self, method: str, target: str) -> Exchange:
        path, _, query = target.partition("?")
        found = routes.match(method, path)
        operation, labels = ("?", {}) if found is None else (found[0].operation, found[1])
        ex = Exchange(
            operation,
            routes.decode_labels(labels),
            {k: v[0] for k, v in urllib.parse.parse_qs(query).items()},
        )
        ex.name = ex.labels.get("objectName")
        return ex

    def _pass(self, ex: Exchange, phase: str) -> bool:
        """Record the exchange; False once the relay is (or now becomes) frozen."""
        with self._cond:
            if self.frozen.is_set():
                return False
            if phase == "request":
                if ex.name is None and "uploadId" in ex.labels:
                    ex.name = self._names.get(ex.labels["uploadId"])
                self.exchanges.append(ex)
            if self.hold is not None and self.hold(ex, phase):
                self.frozen.set()
                return False
            if phase == "request":
                self._in_flight += 1
            else:
                ex.acked = True
                if ex.operation == "StartObject" and ex.status == 200:
                    self._names[json.loads(ex.reply)["UploadId"]] = str(ex.name)
            return True

    def _forward(self, request: bytes) -> tuple[int, bytes, bytes]:
        with socket.create_connection(self.upstream, timeout=120) as up:
            up.sendall(request)
            f = up.makefile("rb")
            head = _read_head(f)
            if head is None:
                raise ConnectionError("the server closed the connection without a reply")
            start, headers, raw = head
            body = _read_body(f, headers)
        return int(start.split()[1]), raw + body, body

    def settle(self, timeout: float = 60) -> None:
        """Wait until every request passed to the server has its reply."""
        with self._cond:
            assert self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        self._listener.close()


# -- clients, trees, jobs ---------------------------------------------------------------


def client_env(key: tuple[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYO_")}
    env.update(AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1], CRYO_REGION=REGION)
    return env


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=240, env=env, check=False
    )


def summary_of(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[-1])
    assert doc["type"] == "summary"
    return doc  # type: ignore[no-any-return]


def bump_mtime(p: Path) -> None:
    later = time.time_ns() + 5_000_000_000
    os.utime(p, ns=(later, later))


def make_tree(root: Path, rng: random.Random, big: int = 8, small: int = 150) -> None:
    """Multi-chunk files, a one-chunk file, and small files that are packed."""
    (root / "small").mkdir(parents=True)
    for i in range(big):
        size = rng.randint(MiB + MiB // 2, 3 * MiB + MiB // 2)
        (root / f"big{i:02d}.bin").write_bytes(rng.randbytes(size))
    (root / "one.bin").write_bytes(rng.randbytes(MiB))
    for i in range(small):
        (root / "small" / f"s{i:03d}.dat").write_bytes(rng.randbytes(rng.randint(100, 24_000)))
    (root / "link").symlink_to("one.bin")


def change_tree(root: Path, rng: random.Random, round_no: int) -> None:
    """Rewrite two large files, change and add small ones, delete one."""
    bigs = sorted(root.glob("big*.bin"))
    for p in rng.sample(bigs, 2):
        p.write_bytes(rng.randbytes(p.stat().st_size))
        bump_mtime(p)
    smalls = sorted((root / "small").iterdir())
    for p in rng.sample(smalls, 6):
        p.write_bytes(rng.randbytes(rng.randint(100, 24_000)))
        bump_mtime(p)
    rng.choice(smalls).unlink()
    for i in range(25):
        data = rng.randbytes(rng.randint(100, 24_000))
        (root / "small" / f"r{round_no}-{i:02d}.dat").write_bytes(data)


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"dir"
    return out


@dataclass
class KillPoint:
    """Where a run is killed: a hold predicate, built from a seeded draw."""

    label: str
    hold: Hold
    new_job: bool = False
    """The kill comes after the job was marked complete: the rerun makes a new job."""


def _nth(n: int, want: Callable[[Exchange], bool], phase: str) -> Hold:
    seen = Counter[str]()

    def hold(ex: Exchange, at: str) -> bool:
        if at != phase or not want(ex):
            return False
        seen["n"] += 1
        return seen["n"] == n

    return hold


def _is_data_completion(ex: Exchange) -> bool:
    return (
        ex.operation in ("NotifyObjectComplete", "PutObject")
        and ex.status == 200
        and ex.name not in (None, MANIFEST)
    )


def kill_points(rng: random.Random, data_objects: int) -> list[KillPoint]:
    lo, hi = math.ceil(data_objects * 0.35), math.floor(data_objects * 0.65)
    return [
        KillPoint(
            "mid uploads: a data object completed, its reply lost",
            _nth(rng.randint(lo, hi), _is_data_completion, "reply"),
        ),
        KillPoint(
            "early uploads: an upload request lost",
            _nth(rng.randint(1, 3), lambda ex: ex.operation in UPLOADS, "request"),
        ),
        KillPoint(
            "manifest being written: its first chunk lost",
            _nth(1, lambda ex: ex.operation == "PutChunk" and ex.name == MANIFEST, "request"),
        ),
        KillPoint(
            "manifest complete: its reply lost",
            _nth(
                1,
                lambda ex: ex.operation == "NotifyObjectComplete" and ex.name == MANIFEST,
                "reply",
            ),
        ),
        KillPoint(
            "job complete: its reply lost",
            _nth(1, lambda ex: ex.operation == "CompleteJob", "reply"),
            new_job=True,
        ),
    ]


def accepted_puts(exchanges: list[Exchange]) -> list[Exchange]:
    return [ex for ex in exchanges if ex.operation in UPLOADS and ex.status == 200]


def data_chunks_on_server(
    server: ServerProcess, key: tuple[str, str], job: str
) -> set[tuple[str, int, str]]:
    """(object, index, sha) of every chunk of every complete data object of ``job``."""
    client = server.client(key)
    try:
        return {
            (o.name, c.index, base64.b64decode(c.checksum).hex())
            for o in iter_objects(client, job)
            if o.name != MANIFEST
            for c in iter_chunks(client, job, o.object_token)
        }
    finally:
        client.close()


def test_client_killed_at_five_points_resumes_without_resending(
    tmp_path: Path, json_server: ServerProcess
) -> None:
    rng = random.Random(SEED)
    src = tmp_path / "src"
    make_tree(src, rng)
    key = json_server.new_key()
    env = client_env(key)
    backup = ["backup", str(src), "--chunk-size", "1", "--connections", "4", "--json"]

    def run_through(relay: Relay, *extra: str) -> subprocess.CompletedProcess[str]:
        return cli(*backup, *extra, "--endpoint-url", relay.url, env=env)

    # A complete job in another pool first: it says how many data objects the
    # tree takes, and it must still verify at the end.
    # Every run goes through the same address: a backup's pending-run record is
    # kept per endpoint, so the rerun must name the endpoint the killed run used.
    relay = Relay(json_server.url)
    port = relay.port
    first = summary_of(run_through(relay, "--pool", "DEEP_ARCHIVE"))
    relay.close()
    data_objects = sum(1 for ex in relay.exchanges if _is_data_completion(ex))
    assert data_objects >= 8
    jobs = [str(first["job_id"])]

    resent_unfinished = 0
    report = [f"seed {SEED}"]
    for round_no, point in enumerate(kill_points(rng, data_objects)):
        context = f"seed {SEED}, kill point {round_no} ({point.label})"
        if round_no:
            change_tree(src, rng, round_no)
        killed = Relay(json_server.url, point.hold, port)
        proc = subprocess.Popen(
            [*CLI, *backup, "--endpoint-url", killed.url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not killed.frozen.wait(0.01):
            assert proc.poll() is None, f"{context}: the run ended before its kill point"
            assert time.monotonic() < deadline, context
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed.settle()
        killed.close()
        assert killed.errors == [], context
        creates = [ex for ex in killed.exchanges if ex.operation == "CreateJob" and ex.acked]
        job = json.loads(creates[0].reply)["JobId"]
        committed = data_chunks_on_server(json_server, key, job)

        relay = Relay(json_server.url, port=port)
        summary = summary_of(run_through(relay))
        relay.close()
        assert relay.errors == [], context
        if point.new_job:
            # The job was completed; the rerun is an incremental of it that reads nothing.
            assert summary["job_id"] != job and summary["base_job_id"] == job, context
            assert summary["bytes_read"] == 0 and summary["files_unchanged"] == summary["files"]
            assert [ex for ex in accepted_puts(relay.exchanges) if ex.name != MANIFEST] == []
            jobs += [job, str(summary["job_id"])]
        else:
            assert summary["job_id"] == job and summary["resumed"] is True, context
            jobs.append(job)
        assert summary["status"] == "COMPLETED", context

        # No data chunk the server held in a complete object is sent again, by
        # (object, index) or by content.
        rerun = [ex for ex in accepted_puts(relay.exchanges) if ex.name != MANIFEST]
        again = [ex for ex in rerun if (ex.name, ex.index, ex.sha) in committed]
        assert again == [], f"{context}: {len(again)} committed chunks sent again"
        committed_shas = {sha for *_, sha in committed}
        assert [ex for ex in rerun if ex.sha in committed_shas] == [], context
        # No (object, index) is accepted twice over both runs.
        both = accepted_puts(killed.exchanges) + accepted_puts(relay.exchanges)
        keys = Counter((ex.job, ex.name, ex.index) for ex in both if ex.name != MANIFEST)
        assert [k for k, n in keys.items() if n > 1] == [], context
        # Chunks sent into uploads the kill left unfinished (discarded by the API).
        unfinished = {
            ex.sha
            for ex in accepted_puts(killed.exchanges)
            if ex.acked and ex.name != MANIFEST and ex.sha not in committed_shas
        }
        resent = sum(1 for ex in rerun if ex.sha in unfinished)
        resent_unfinished += resent
        report.append(
            f"{point.label}: {len(committed)} data chunks complete on the server, "
            f"{len(rerun)} sent by the rerun, 0 of them again; "
            f"{resent} of {len(unfinished)} from unfinished uploads sent again"
        )

    listed = cli("jobs", "--endpoint-url", json_server.url, "--json", env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    statuses = {d["job_id"]: d["status"] for d in map(json.loads, listed.stdout.splitlines())}
    assert statuses == dict.fromkeys(jobs, "COMPLETED")
    for job in jobs:
        v = cli("verify", job, "--endpoint-url", json_server.url, "--read-data", env=env)
        assert v.returncode == 0, f"{job}: {v.stderr}"
    out = tmp_path / "restored"
    r = cli("restore", jobs[-1], "--endpoint-url", json_server.url, "--to", str(out), "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert snapshot(out / str(src).lstrip("/")) == snapshot(src)
    report.append(f"{len(jobs)} jobs verified; {resent_unfinished} chunks of unfinished uploads")
    print("\n" + "\n".join(report))


# -- the server killed ---------------------------------------------------------------


@dataclass
class CatalogState:
    """What a repository's catalog holds at one instant (read as FORMAT.md documents it)."""

    status: dict[str, str] = field(default_factory=dict)
    objects: dict[str, dict[str, tuple[str, list[tuple[int, str]]]]] = field(default_factory=dict)
    """job -> object name -> (SUMMARY checksum, [(index, sha)])."""
    open_uploads: dict[str, set[str]] = field(default_factory=dict)
    """job -> names of the uploads in progress."""


def read_catalog(repo: Path) -> CatalogState:
    conn = sqlite3.connect(f"file:{repo / 'catalog.db'}?mode=ro", uri=True, isolation_level=None)
    state = CatalogState()
    try:
        conn.execute("BEGIN")
        for job_id, status in conn.execute("SELECT job_id, status FROM jobs"):
            state.status[job_id] = status
            state.objects[job_id] = {}
            state.open_uploads[job_id] = set()
        rows = conn.execute(
            "SELECT j.job_id, jo.name, o.checksum, oc.idx, oc.sha FROM jobs j "
            "JOIN job_objects jo ON jo.job_seq = j.seq "
            "JOIN objects o ON o.object_id = jo.object_id "
            "JOIN object_chunks oc ON oc.object_id = jo.object_id ORDER BY oc.idx"
        )
        for job_id, name, checksum, idx, sha in rows:
            state.objects[job_id].setdefault(name, (checksum, []))[1].append((idx, sha))
        for job_id, name in conn.execute(
            "SELECT j.job_id, u.name FROM uploads u JOIN jobs j ON j.seq = u.job_seq "
            "WHERE u.object_id IS NULL"
        ):
            state.open_uploads[job_id].add(name)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return state


def _completions(server: ServerProcess, jobs: set[str]) -> int:
    n = 0
    for line in server.log().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if (
                r.get("operation") in ("NotifyObjectComplete", "PutObject")
                and r.get("job") in jobs
                and r.get("status") == 200
            ):
                n += 1
    return n


def test_server_killed_mid_upload_keeps_completed_objects_and_resumes(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    (tmp_path / "server").mkdir()
    json_server = ServerProcess(tmp_path / "server", "--log-format", "json")
    try:
        _server_kill(tmp_path, rng, json_server)
    finally:
        json_server.kill()


def _server_kill(tmp_path: Path, rng: random.Random, json_server: ServerProcess) -> None:
    key = json_server.new_key()
    env = client_env(key)
    trees = {name: tmp_path / name for name in ("earlier", "a", "b")}
    make_tree(trees["earlier"], rng, big=2, small=40)
    make_tree(trees["a"], rng, big=10, small=150)
    make_tree(trees["b"], rng, big=10, small=150)

    def command(tree: Path, url: str) -> list[str]:
        return ["backup", str(tree), "--endpoint-url", url, "--chunk-size", "1", "--json",
                "--connections", "2"]  # fmt: skip

    earlier = summary_of(cli(*command(trees["earlier"], json_server.url), env=env))
    clients = {
        name: subprocess.Popen(
            [*CLI, *command(trees[name], json_server.url)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    }
    # Wait until both jobs exist and six of their objects are complete.
    deadline = time.monotonic() + 120
    while True:
        state = read_catalog(json_server.repo)
        running = {j for j, s in state.status.items() if s == "IN_PROGRESS"}
        if len(running) == 2 and _completions(json_server, running) >= 6:
            break
        for name, proc in clients.items():
            assert proc.poll() is None, f"backup {name} ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Freeze the server, read what it has committed, then kill it and the clients.
    os.kill(json_server.process.pid, signal.SIGSTOP)
    before = read_catalog(json_server.repo)
    json_server.process.kill()
    json_server.process.wait()
    for proc in clients.values():
        proc.kill()
        proc.communicate()
    json_server.kill()

    running = {j for j, s in before.status.items() if s == "IN_PROGRESS"}
    assert len(running) == 2
    in_flight = {j: before.open_uploads[j] for j in running}
    # Every running job had its manifest upload open, and data uploads were in flight too.
    assert all(MANIFEST in names for names in in_flight.values())
    data_in_flight = sum(len(names - {MANIFEST}) for names in in_flight.values())

    # The new server listens where the old one did: a backup's pending-run record is
    # kept per endpoint, and clients know the server by its address.
    server = ServerProcess(
        json_server.workdir, "--log-format", "json", "--listen", json_server.url[len("http://") :]
    )
    assert server.url == json_server.url
    try:
        # The killed server's temporary chunk files are gone once the new one has opened the store.
        assert list((server.repo / "tmp").iterdir()) == []
        client = server.client(key)
        try:
            for job in [str(earlier["job_id"]), *sorted(running)]:
                listed = {o.name: o for o in iter_objects(client, job)}
                complete = before.objects[job]
                for name, (checksum, chunks) in complete.items():
                    o = listed[name]
                    assert o.object_checksum == checksum
                    data = read_object(client, job, o)  # every chunk checksummed
                    assert len(data) == len(chunks)
                # Nothing that was unfinished is visible (an object whose completion was
                # being committed at the instant of the kill may appear, whole).
                for name in set(listed) - set(complete):
                    assert name in before.open_uploads[job] and name != MANIFEST, name
                    read_object(client, job, listed[name])
                assert MANIFEST not in listed or job not in running
                assert client.describe_job(job).status == before.status[job]
        finally:
            client.close()

        v = cli("verify", str(earlier["job_id"]), "--endpoint-url", server.url, "--read-data",
                env=env)  # fmt: skip
        assert v.returncode == 0, v.stderr
        for name in ("a", "b"):
            summary = summary_of(cli(*command(trees[name], server.url), env=env))
            assert summary["job_id"] in running and summary["resumed"] is True
            assert summary["status"] == "COMPLETED"
            job = str(summary["job_id"])
            v = cli("verify", job, "--endpoint-url", server.url, "--read-data", env=env)
            assert v.returncode == 0, v.stderr
            out = tmp_path / f"restored-{name}"
            r = cli("restore", job, "--endpoint-url", server.url, "--to", str(out), "-q", env=env)
            assert r.returncode == 0, r.stderr
            assert snapshot(out / str(trees[name]).lstrip("/")) == snapshot(trees[name])
    finally:
        assert server.stop() == 0, server.log()
    print(f"\nserver killed with {data_in_flight} data uploads in flight; "
          f"{sum(len(before.objects[j]) for j in running)} completed objects intact")  # fmt: skip
