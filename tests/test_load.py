"""Load: eight hosts back up to one ``cryo server`` at once; two of them also restore.

Each host has its own access key, as a real deployment would (README, "Running a
server"). Hosts 0 and 1 were backed up once before and have changed since; while all
eight back up (those two incrementally), the two earlier jobs are restored, with the
keys that made them (a job belongs to its key). Every command is the real CLI in its
own process. While they run, the server's resident set is sampled from /proc.

Memory bound. The server serves at most ``max_connections`` (64) connections at
once, one worker thread each, and never holds a whole body: a request body is read
in pieces of at most 1 MiB (``cryo.server.http._PIECE``), spooled to disk past 1 MiB
when its hash must be computed, and GetChunk replies go out with sendfile. So the
server's growth is bounded by about 64 workers x 2 pieces = 128 MiB above its idle
size, whatever the clients send: the eight backups alone keep up to 8 x 8
connections x 4 MiB = 256 MiB in flight, and about 140 MB cross the server in all.
The test asserts the growth of the peak (VmHWM, or the highest sample) stays under
that bound and under half the bytes that crossed, and reports it: as properties of
the test (``record_property``, in a JUnit XML report), on stdout (``-s``), and as a
JSON line appended to ``$CRYO_LOAD_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from .server_helpers import REGION, ServerProcess

CLI = [sys.executable, "-m", "cryo"]
MiB = 1024 * 1024
HOSTS = 8
RESTORES = 2
WORKERS = 64  # cryo server's default --max-connections
PIECE = 1 * MiB  # the most of a body the server holds at a time, per buffer
BOUND = WORKERS * 2 * PIECE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def make_tree(root: Path, seed: int) -> int:
    """A host's tree, about 18 MB: 400 small files in nested directories, four big ones.

    Small files are text-like (compressible) or random; big ones are random, 2 to
    5 MiB, so they span one or two 4 MiB chunks. Returns the bytes written.
    """
    rnd = random.Random(seed)
    total = 0
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(200)]
    for i in range(400):
        d = root / f"d{i % 7}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.choice(
            [0, rnd.randint(1, 512), rnd.randint(512, 8192), rnd.randint(8192, 40_000)]
        )
        if i % 3:
            text = b" ".join(rnd.choice(words) for _ in range(size // 8 + 1))[:size]
            (d / f"note{i:03d}.txt").write_bytes(text)
        else:
            (d / f"blob{i:03d}.bin").write_bytes(rnd.randbytes(size))
        total += size
    for i in range(4):
        size = rnd.randint(2 * MiB, 5 * MiB)
        (root / f"big{i}.bin").write_bytes(rnd.randbytes(size))
        total += size
    return total


def change_tree(root: Path, seed: int) -> None:
    """A day's changes: one big file rewritten, some small files gone, some new."""
    rnd = random.Random(seed)
    (root / "big0.bin").write_bytes(rnd.randbytes(2 * MiB + 12345))
    for p in sorted(root.glob("d1/*/*"))[:20]:
        p.unlink()
    new = root / "new"
    new.mkdir()
    for i in range(50):
        (new / f"n{i}.dat").write_bytes(rnd.randbytes(rnd.randint(0, 20_000)))


def tree_state(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root``: mode, mtime and content (directories: no content)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (
            st.st_mode,
            st.st_mtime_ns,
            b"" if p.is_dir() else p.read_bytes(),
        )
    return out


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} for pid {self.pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.status("VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _epoch(record: dict[str, object]) -> float:
    """When an access log record was written (the end of its request)."""
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


def in_flight(requests: list[dict[str, object]]) -> int:
    """The most requests the server was serving at once, from the access log."""
    edges = []
    for r in requests:
        end = _epoch(r)
        edges += [(end - float(str(r["ms"])) / 1000, 1), (end, -1)]
    most = now = 0
    for _, step in sorted(edges):
        now += step
        most = max(most, now)
    return most


def _mib(n: float) -> float:
    return round(n / MiB, 1)


def test_eight_backups_and_two_restores_at_once(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    (tmp_path / "server").mkdir()
    server = ServerProcess(tmp_path / "server", "--log-format", "json")
    procs: list[subprocess.Popen[str]] = []
    try:
        base_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CRYO_"))},
            "CRYO_ENDPOINT_URL": server.url,
            "CRYO_REGION": REGION,
            "HOME": str(tmp_path),
        }
        envs = []
        for _ in range(HOSTS):
            key_id, secret = server.new_key()
            envs.append({**base_env, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
        trees = [tmp_path / f"host{i}" for i in range(HOSTS)]
        source_bytes = sum(make_tree(t, seed=i) for i, t in enumerate(trees))

        def cli(i: int, *args: str) -> subprocess.Popen[str]:
            p = subprocess.Popen(
                [*CLI, *args], env=envs[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            procs.append(p)
            return p

        def finish(p: subprocess.Popen[str], what: str) -> str:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"{what} exited {p.returncode}:\n{err}"
            return out

        def backup(i: int) -> subprocess.Popen[str]:
            return cli(i, "backup", str(trees[i]), "--json")

        # Yesterday: hosts 0 and 1 were backed up; their jobs are restored under load.
        earlier = [json.loads(finish(backup(i), "backup").splitlines()[-1]) for i in range(2)]
        expected = [tree_state(trees[i]) for i in range(2)]
        for i in range(2):
            change_tree(trees[i], seed=100 + i)

        sampler = RssSampler(server.process.pid)
        idle = sampler.status("VmRSS")
        started, window_start = time.monotonic(), time.time()
        with sampler:
            backups = [backup(i) for i in range(HOSTS)]
            restores = [
                cli(i, "restore", earlier[i]["job_id"], "--to", str(tmp_path / f"restore{i}"), "-q")
                for i in range(RESTORES)
            ]
            summaries = [json.loads(finish(p, "backup").splitlines()[-1]) for p in backups]
            for p in restores:
                finish(p, "restore")
        seconds, window_end = time.monotonic() - started, time.time()
        # VmHWM is the kernel's high-water mark; it can lag the sampled VmRSS a little.
        peak = max(sampler.status("VmHWM"), *sampler.samples)

        for i, s in enumerate(summaries):
            assert s["status"] == "COMPLETED" and s["errors"] == [], s
            assert s["base_job_id"] == (earlier[i]["job_id"] if i < 2 else None)
        for i in range(RESTORES):
            restored = tmp_path / f"restore{i}" / str(trees[i]).lstrip("/")
            assert tree_state(restored) == expected[i], f"restore of host {i} differs"

        # Every job reads back whole; each of today's restores is the tree as it is now.
        def check(i: int, job: str, today: bool) -> None:
            finish(cli(i, "verify", job, "--read-data"), f"verify {job}")
            if today:
                out = tmp_path / f"today{i}"
                finish(cli(i, "restore", job, "--to", str(out), "-q"), f"restore {job}")
                assert tree_state(out / str(trees[i]).lstrip("/")) == tree_state(trees[i])

        jobs = [(i, e["job_id"], False) for i, e in enumerate(earlier)]
        jobs += [(i, s["job_id"], True) for i, s in enumerate(summaries)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda j: check(*j), jobs))

        records = [json.loads(x) for x in server.log().splitlines() if x.startswith("{")]
        requests = [r for r in records if r.get("event") == "request"]
        statuses: dict[str, int] = {}
        for r in requests:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        assert not [r for r in requests if (r["status"] or 500) >= 500], statuses
        under_load = [r for r in requests if window_start <= _epoch(r) <= window_end]
        uploaded = sum(s["bytes_stored"] for s in summaries)
        restored_bytes = sum(sum(len(v[2]) for v in e.values()) for e in expected)
        report = {
            "test": "load",
            "clients": {"backup": HOSTS, "restore": RESTORES},
            "source_bytes": source_bytes,
            "uploaded_bytes": uploaded,
            "restored_bytes": restored_bytes,
            "seconds": round(seconds, 1),
            "requests": len(requests),
            "requests_under_load": len(under_load),
            "max_requests_in_flight": in_flight(under_load),
            "statuses": statuses,
            "client_retries": sum(s["retries"] for s in summaries),
            "server_idle_rss_mib": _mib(idle),
            "server_peak_rss_mib": _mib(peak),
            "server_peak_sampled_rss_mib": _mib(max(sampler.samples)),
            "server_rss_growth_mib": _mib(peak - idle),
            "bound_growth_mib": _mib(BOUND),
            "samples": len(sampler.samples),
        }
        line = json.dumps(report, sort_keys=True)
        print(line)
        (tmp_path / "load-report.json").write_text(line + "\n")
        if os.environ.get("CRYO_LOAD_REPORT"):
            with open(os.environ["CRYO_LOAD_REPORT"], "a") as f:
                f.write(line + "\n")
        for k, v in report.items():
            record_property(k, v)

        # The server did not hold what went through it: its growth stays within what
        # its workers' buffers allow, well under the bytes that crossed it.
        assert peak - idle < BOUND, report
        assert peak - idle < (uploaded + restored_bytes) / 2, report
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert server.stop() == 0
