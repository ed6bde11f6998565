"""Damaged repositories: every kind of damage is found, named, and never restored.

One job of a mixed tree (packed small files, a multi-chunk file, a file stored
with PutObject) is written once through a ``cryo server``; each test damages
a fresh copy of that repository (a bit flipped in a chunk file, a truncated
chunk file, a deleted chunk file, a page of the SQLite catalog overwritten),
then runs ``cryo verify --read-data`` and ``cryo restore`` on it, with the
embedded repository (``--repo``) and through a ``cryo server`` on the copy.

What must hold: both commands exit 1 and name exactly the files whose data
is damaged (one per line), every other file is restored byte-identical, no
damaged file exists under its final name and no temporary is left behind. A
damaged catalog ends each command with one clear line and exit 1, never a
traceback.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryo.jobreader import JobReader
from cryo.storage.local import LocalBackend

from .server_helpers import REGION, ServerProcess

CLI = [sys.executable, "-m", "cryo"]
MiB = 1024 * 1024
SEED = 20261121


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def make_tree(root: Path) -> None:
    """Packed small files, a multi-chunk file, a one-chunk (PutObject) file and more."""
    rng = random.Random(SEED)
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i in range(40):
        size = rng.randint(200, 30_000)
        text = "".join(rng.choice("abcdefgh \n") for _ in range(size))
        where = root / "docs" / ("deep" if i % 3 == 0 else "")
        (where / f"note{i:02d}.txt").write_text(text)
    (root / "mid.bin").write_bytes(rng.randbytes(600 * 1024))
    (root / "big.bin").write_bytes(rng.randbytes(3 * MiB + 333_333))  # 4 chunks
    (root / "one.bin").write_bytes(rng.randbytes(MiB))  # exactly one chunk: PutObject
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("docs/note01.txt")


def client_env(key: tuple[str, str], state: Path) -> dict[str, str]:
    """The environment of a CLI run: the access key, and a state directory of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYO_")}
    env.update(
        AWS_ACCESS_KEY_ID=key[0],
        AWS_SECRET_ACCESS_KEY=key[1],
        CRYO_REGION=REGION,
        XDG_STATE_HOME=str(state),
    )
    return env


def job_path(src: Path, name: str) -> str:
    """How a job names the file ``name`` under ``src``: its path without the leading '/'."""
    return os.fsencode(src / name).lstrip(b"/").decode()


@dataclass(frozen=True)
class Pristine:
    """The undamaged server directory (repository and credentials) and its job."""

    workdir: Path
    src: Path
    job: str
    key: tuple[str, str]
    users: dict[tuple[str, int], set[str]]
    """(object name, chunk index) -> the files (job paths) with data in that chunk."""
    sha: dict[tuple[str, int], str]
    """(object name, chunk index) -> hex SHA-256 of the stored chunk."""
    files: dict[str, bytes]
    """job path -> content, for every regular file of the tree."""

    def env(self, state: Path) -> dict[str, str]:
        return client_env(self.key, state)

    def chunk_with(self, name: str) -> tuple[str, int]:
        """The first chunk of the object holding file ``name`` (a path under src)."""
        path = job_path(self.src, name)
        return min(k for k, files in self.users.items() if path in files)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("corruption")
    src = base / "src"
    make_tree(src)
    workdir = base / "server"
    workdir.mkdir()
    server = ServerProcess(workdir)
    key = server.new_key()
    env = client_env(key, base / "state")
    try:
        r = run("backup", str(src), "--endpoint-url", server.url, "--chunk-size", "1", "-q",
                env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
    finally:
        assert server.stop() == 0
    repo = workdir / "repo"
    conn = sqlite3.connect(repo / "catalog.db")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    backend = LocalBackend(repo, create=False)
    try:
        reader = JobReader(backend, job)
        users: dict[tuple[str, int], set[str]] = defaultdict(set)
        _, entries = reader.manifest()
        for e in entries:
            for x in e.extents:
                users[(x.object_name, x.chunk_index)].add(e.path.decode())
        sha = {
            (name, c.index): base64.b64decode(c.checksum).hex()
            for name in reader.objects
            for c in reader.chunks_of(name)
        }
    finally:
        backend.close()
    files = {
        os.fsencode(p).lstrip(b"/").decode(): p.read_bytes()
        for p in src.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    # The tree is what the tests need: packs of several files, a 4-chunk file, a PutObject.
    big = job_path(src, "big.bin")
    assert sum(1 for k, f in users.items() if big in f) == 4
    assert any(len(f) > 5 for f in users.values())
    return Pristine(workdir, src, job, key, dict(users), sha, files)


@dataclass
class Copy:
    """A damaged copy of the repository and the flags that reach it."""

    repo: Path
    args: list[str]
    env: dict[str, str]


@pytest.fixture(params=["repo", "server"])
def copy(request: pytest.FixtureRequest, pristine: Pristine, tmp_path: Path) -> Iterator[Copy]:
    """A fresh copy of the pristine repository, used directly or through a new server.

    The test damages ``copy.repo`` before its first command; the server opens
    the catalog only once a request comes.
    """
    workdir = tmp_path / "server"
    shutil.copytree(pristine.workdir, workdir, ignore=shutil.ignore_patterns("server.log"))
    env = pristine.env(tmp_path / "state")
    if request.param == "repo":
        yield Copy(workdir / "repo", ["--repo", str(workdir / "repo")], env)
        return
    server = ServerProcess(workdir)
    try:
        yield Copy(workdir / "repo", ["--endpoint-url", server.url], env)
    finally:
        assert server.stop() == 0, server.log()


def chunk_file(repo: Path, sha: str) -> Path:
    f = repo / "chunks" / sha[:2] / sha
    assert f.is_file()
    return f


def flip_bit(repo: Path, sha: str) -> None:
    f = chunk_file(repo, sha)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))


def truncate(repo: Path, sha: str) -> None:
    f = chunk_file(repo, sha)
    os.truncate(f, f.stat().st_size // 2)


def delete(repo: Path, sha: str) -> None:
    chunk_file(repo, sha).unlink()


DAMAGE = {
    # damage: (how, the file whose chunk is damaged, which of that object's chunks)
    "bit-flip": (flip_bit, "big.bin", 2),
    "truncated": (truncate, "docs/note01.txt", 0),  # a pack chunk: many files at once
    "deleted": (delete, "one.bin", 0),  # the PutObject
}


def assert_no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text, text


def assert_restored_except(out: Path, pristine: Pristine, victims: set[str]) -> None:
    """Every file but the victims is byte-identical; no victim exists; no temporaries."""
    for path, data in pristine.files.items():
        target = out / path
        if path in victims:
            assert not os.path.lexists(target), f"{path} was restored from damaged data"
        else:
            assert target.read_bytes() == data, path
    assert os.readlink(out / job_path(pristine.src, "link")) == "docs/note01.txt"
    assert (out / job_path(pristine.src, "empty-dir")).is_dir()
    assert [p for p in out.rglob("*") if p.name.startswith(".cryo-")] == []


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_chunk_is_named_by_verify_and_restore(
    damage: str, copy: Copy, pristine: Pristine, tmp_path: Path
) -> None:
    how, name, index = DAMAGE[damage]
    obj, _ = pristine.chunk_with(name)
    key = (obj, index)
    victims = pristine.users[key]
    assert victims and len(victims) < len(pristine.files)
    how(copy.repo, pristine.sha[key])

    for quiet in ((), ("--quiet",)):  # the bad files are named either way
        v = run("verify", pristine.job, *copy.args, "--read-data", *quiet, env=copy.env)
        assert v.returncode == 1, v.stderr
        assert_no_traceback(v.stdout, v.stderr)
        named = [line.removeprefix("cryo: bad data: ") for line in v.stderr.splitlines()]
        assert {line.split(": ", 1)[0] for line in named} == victims, v.stderr
        assert len(named) == len(victims)  # one line per file

    out = tmp_path / "out"
    r = run("restore", pristine.job, *copy.args, "--to", str(out), "--json", env=copy.env)
    assert r.returncode == 1, r.stderr
    assert_no_traceback(r.stdout, r.stderr)
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["type"] == "summary"
    assert sorted(e["path"] for e in summary["errors"]) == sorted(victims)
    assert f"{len(victims)} entries were not restored" in r.stderr
    assert_restored_except(out, pristine, victims)


def _damage_table(repo: Path, table: str) -> None:
    """Overwrite the header and cell pointers of ``table``'s root page with garbage."""
    db = repo / "catalog.db"
    assert not (repo / "catalog.db-wal").exists() or (repo / "catalog.db-wal").stat().st_size == 0
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
    finally:
        conn.close()
    with db.open("r+b") as f:
        f.seek((root[0] - 1) * page_size)
        f.write(b"\xa5" * 512)


READ_ALL = {"objects": "SELECT * FROM objects", "object_chunks": "SELECT * FROM object_chunks"}


@pytest.mark.parametrize("table", sorted(READ_ALL))
def test_damaged_catalog_is_one_clear_line(table: str, pristine: Pristine, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(pristine.workdir / "repo", repo)
    _damage_table(repo, table)
    env = pristine.env(tmp_path / "state")
    # SQLite itself detects the damage.
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        conn = sqlite3.connect(repo / "catalog.db")
        try:
            conn.execute(READ_ALL[table]).fetchall()
        finally:
            conn.close()

    out = tmp_path / "out"
    for args in (
        ["verify", pristine.job, "--read-data"],
        ["restore", pristine.job, "--to", str(out)],
    ):
        r = run(*args, "--repo", str(repo), env=env)
        assert r.returncode == 1, r.stderr
        assert_no_traceback(r.stdout, r.stderr)
        (line,) = r.stderr.splitlines()
        assert line.startswith("cryo: ") and "catalog" in line and "damaged" in line, line
        assert str(repo / "catalog.db") in line
        assert "internal error" not in line
    # Nothing was restored, so nothing damaged or partial sits in the target.
    assert [p for p in out.rglob("*") if p.is_file()] == []
