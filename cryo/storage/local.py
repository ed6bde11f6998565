"""The embedded repository: the Backup Storage semantics over SQLite and a chunk store.

``LocalBackend`` is the storage engine of cryo. It serves the embedded default
(a directory used in-process) and ``cryo server`` alike, so both behave the
same by construction.

Layout of a repository directory::

    cryo-repository.json   marker: format name and version
    catalog.db             SQLite catalog (WAL): jobs, uploads, objects, chunks
    chunks/ab/<sha256>     chunk bytes, content-addressed (FileChunkStore)
    tmp/                   chunks being written

Guarantees:

* **Durability.** A call returns only after its chunk files and its catalog
  transaction are fsynced (``synchronous=FULL``), with one exception:
  PutChunk's catalog rows are written without waiting for the disk, and made
  durable by the next durable commit that writes, at the latest its object's
  NotifyObjectComplete (SQLite's log is written in order). A power loss may
  thus forget chunks of an upload not yet complete (its NotifyObjectComplete
  then fails, and a rerun of the backup sends them again), never
  a chunk of an object that exists. Chunk files are fsynced in every case.
* **Atomic visibility.** An object appears in ListObjects only once
  NotifyObjectComplete or PutObject committed it; an upload in progress, or
  one cut short by a crash, is never visible. A replaced object is swapped
  in one transaction.
* **Deduplication.** Chunk bytes are stored once per SHA-256 across all jobs.
* **Copy-on-write jobs.** A job created with a base job starts with the
  base's object references (no bytes copied); later writes change only the
  new job.
* **Safe reclamation.** Chunks no object or upload references are first
  moved to a ``trash`` table in the transaction that dropped their last
  reference, and their files are deleted in a later transaction that
  re-checks, under the catalog's write lock, that nothing took them back.
  A writer puts a chunk's file in place (fsynced, renamed, its directory
  fsynced) before it takes that lock, then, under it, checks that the file
  is still there and adds the chunk's catalog row, so a backup running
  beside a deletion never loses a chunk. A row therefore vouches for a
  durable file; a file no row vouches for and that is not the very file the
  writer put there (one put in place by a writer beside it, or left by a
  crash) is fsynced again before a row is added. Rows leave ``chunks`` only
  in durable transactions.
* **Concurrency.** Each thread has its own SQLite connection; writes are
  serialised by SQLite's lock (``BEGIN IMMEDIATE``); bulk I/O, hashing and
  the fsyncs of chunk files happen outside it. Several processes may share
  one repository.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryo.checksums import (
    CHUNK_ALGORITHM,
    SUMMARY_ALGORITHM,
    b64_of_digest,
    checksum_of_hex,
    hex_of_checksum,
    summary_checksum,
)
from cryo.errors import (
    AccessDeniedException,
    DataAlreadyExistsException,
    IllegalArgumentException,
    RepositoryDamaged,
    RepositoryError,
    ResourceNotFoundException,
    RetryableException,
    ServiceInternalException,
)
from cryo.storage.api import (
    FINAL_STATUSES,
    JOB_COMPLETED,
    JOB_IN_PROGRESS,
    JOB_PARTIAL,
    MAX_ATTRIBUTES_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CLIENT_TOKEN_BYTES,
    MAX_METADATA_BLOB_BYTES,
    MAX_METADATA_STRING_BYTES,
    MAX_OBJECT_NAME_BYTES,
    MAX_POOL_ID_BYTES,
    MAX_RESULTS,
    BackupObject,
    Chunk,
    ChunkData,
    ChunkPage,
    Job,
    JobPage,
    ObjectChecksum,
    ObjectMetadata,
    ObjectPage,
    PutChunkResult,
    PutObjectResult,
)
from cryo.storage.chunkstore import (
    RECEIVE_BYTES,
    ChunkStore,
    ChunkWriter,
    FileChunkStore,
    receive_buffer,
)

MARKER_FILE = "cryo-repository.json"
FORMAT_NAME = "cryo-repository"
FORMAT_VERSION = 1
JOB_DELETED = "DELETED"
_MAX_CHUNK_INDEX = 2**31 - 1
_POOL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

Body = bytes | bytearray | memoryview | BinaryIO

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL DEFAULT '',
    client_token TEXT,
    base_job_id TEXT,
    pool_id TEXT,
    status TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    completed_us INTEGER,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_token ON jobs(owner, client_token)
    WHERE client_token IS NOT NULL;
CREATE TABLE IF NOT EXISTS objects (
    object_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    chunks_count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    metadata_string TEXT,
    blob_sha TEXT,
    blob_length INTEGER
);
CREATE INDEX IF NOT EXISTS objects_blob ON objects(blob_sha) WHERE blob_sha IS NOT NULL;
CREATE TABLE IF NOT EXISTS object_chunks (
    object_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    sha TEXT NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (object_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS object_chunks_sha ON object_chunks(sha);
CREATE TABLE IF NOT EXISTS job_objects (
    job_seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    object_id INTEGER NOT NULL,
    PRIMARY KEY (job_seq, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_objects_object ON job_objects(object_id, job_seq);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    throw_on_duplicate INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    object_id INTEGER
);
CREATE INDEX IF NOT EXISTS uploads_job ON uploads(job_seq);
CREATE TABLE IF NOT EXISTS upload_chunks (
    upload_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    sha TEXT NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (upload_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS upload_chunks_sha ON upload_chunks(sha);
CREATE TABLE IF NOT EXISTS chunks (
    sha TEXT PRIMARY KEY,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trash (
    sha TEXT PRIMARY KEY
) WITHOUT ROWID;
"""


def default_repository_path() -> Path:
    """``$CRYO_REPO``, else ``$XDG_DATA_HOME/cryo/repository`` (``~/.local/share/...``)."""
    env = os.environ.get("CRYO_REPO")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cryo" / "repository"


def _now_us() -> int:
    return time.time_ns() // 1000


def _us_to_dt(us: int | None) -> datetime | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def _dt_to_us(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1_000_000)


def _utf8_len(value: str, field: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise IllegalArgumentException(f"{field} is not valid UTF-8") from None


def _check_object_name(name: str, field: str = "ObjectName") -> None:
    if not isinstance(name, str) or not name:
        raise IllegalArgumentException(f"{field} must be a non-empty string")
    if _utf8_len(name, field) > MAX_OBJECT_NAME_BYTES:
        raise IllegalArgumentException(f"{field} is longer than {MAX_OBJECT_NAME_BYTES} bytes")
    if "\x00" in name:
        raise IllegalArgumentException(f"{field} contains a NUL character")


def _check_metadata_string(value: str | None) -> None:
    if value is None:
        return
    n = _utf8_len(value, "MetadataString")
    if n == 0 or n > MAX_METADATA_STRING_BYTES:
        raise IllegalArgumentException(
            f"MetadataString must be 1 to {MAX_METADATA_STRING_BYTES} bytes, got {n}"
        )
    if "\n" in value or "\r" in value:
        raise IllegalArgumentException("MetadataString must not contain line breaks")


def _check_algorithm(value: str | None, expected: str, field: str) -> None:
    if value != expected:
        raise IllegalArgumentException(f"{field} must be {expected}, got {value!r}")


def _check_max_results(value: int | None) -> int:
    if value is None:
        return MAX_RESULTS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESULTS:
        raise IllegalArgumentException(f"MaxResults must be between 1 and {MAX_RESULTS}")
    return value


def _key_of(checksum: str | None, field: str) -> str:
    if not checksum:
        raise IllegalArgumentException(f"{field} is required")
    key = hex_of_checksum(checksum)
    if key is None:
        raise IllegalArgumentException(f"{field} is not a base64-encoded SHA-256 digest")
    return key


def _pieces(
    data: Body, length: int, writer: ChunkWriter | None = None
) -> Iterator[bytes | bytearray | memoryview]:
    """The body in pieces, each written to ``writer`` (if any) before it is yielded.

    Raises IllegalArgumentException if the body is not ``length`` bytes. A
    body that can ``readinto`` is read straight into the writer's buffer
    (``ChunkWriter.receive``), or, without a writer, into one buffer per
    thread: a piece is valid only until the next one is asked for.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) != length:
            raise IllegalArgumentException(f"Length is {length} but the body has {len(data)} bytes")
        if writer is not None:
            writer.write(data)
        yield data
        return
    readinto = getattr(data, "readinto", None)
    remaining = length
    while remaining:
        n = min(RECEIVE_BYTES, remaining)
        piece: bytes | memoryview
        if readinto is None:
            piece = data.read(n)
            if writer is not None and piece:
                writer.write(piece)
        elif writer is not None:
            piece = writer.receive(readinto, n)
        else:
            buf = receive_buffer()
            piece = buf[: readinto(buf[:n])]
        try:
            if not piece:
                raise IllegalArgumentException(
                    f"Length is {length} but the body ended after {length - remaining} bytes"
                )
            remaining -= len(piece)
            yield piece
        finally:
            if isinstance(piece, memoryview):
                piece.release()  # a view of a reused buffer: nothing may keep it
    if data.read(1):
        raise IllegalArgumentException(f"Length is {length} but the body is longer")


def _encode_name_token(name: str) -> str:
    return "n" + base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")


def _decode_name_token(token: str) -> str:
    try:
        if not token.startswith("n"):
            raise ValueError
        raw = base64.b64decode(token[1:].encode("ascii"), altchars=b"-_", validate=True)
        if not raw:
            raise ValueError
        return raw.decode("utf-8")
    except (ValueError, UnicodeError):
        raise IllegalArgumentException("NextToken is not valid") from None


def _decode_int_token(token: str, prefix: str, field: str) -> int:
    digits = token[len(prefix) :]
    if not (token.startswith(prefix) and digits.isdigit() and digits.isascii()) or len(digits) > 19:
        raise IllegalArgumentException(f"{field} is not valid")
    value = int(digits)
    if value > 2**62:
        raise IllegalArgumentException(f"{field} is not valid")
    return value


_OBJECT_TOKEN_RE = re.compile(r"^o([0-9]{1,18})$")
_CHUNK_TOKEN_RE = re.compile(r"^c([0-9]{1,18})\.([0-9]{1,10})$")


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


class _Engine:
    """What every view of one repository shares: paths, chunk store, connections."""

    def __init__(self, root: Path, create: bool) -> None:
        self.root = root
        marker = root / MARKER_FILE
        if not marker.exists():
            if root.exists() and any(root.iterdir()):
                raise RepositoryError(
                    f"{root} is not empty and is not a cryo repository (no {MARKER_FILE})"
                )
            if not create:
                raise RepositoryError(f"no cryo repository at {root}")
            root.mkdir(parents=True, exist_ok=True)
            info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "id": secrets.token_hex(16)}
            tmp = root / f".{MARKER_FILE}.tmp"
            tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, marker)
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {marker}: {exc}") from None
        if info.get("format") != FORMAT_NAME:
            raise RepositoryError(f"{root} is not a cryo repository")
        if info.get("version") != FORMAT_VERSION:
            raise RepositoryError(
                f"{root} has repository format version {info.get('version')}; "
                f"this cryo reads version {FORMAT_VERSION}"
            )
        self.store: ChunkStore = FileChunkStore(root)
        self.db_path = root / "catalog.db"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # Threads of this process take turns at the catalog's write lock here:
        # SQLite's own busy handler sleeps and polls (1, 2, 5... ms), which
        # leaves the lock idle while writers sleep.
        self._write_turn = threading.Lock()
        # Uses in progress: close() waits for them, since closing a connection
        # another thread is stepping frees memory under it.
        self._uses = threading.Condition()
        self._in_use = 0
        self._depth = threading.local()
        self._closed = False
        with self.used(), self.damage_reported():
            self.conn().executescript(SCHEMA)

    @contextlib.contextmanager
    def used(self) -> Iterator[None]:
        """One use of the repository, which ``close`` waits for; uses may nest in a thread."""
        depth: int = getattr(self._depth, "n", 0)
        with self._uses:
            if self._closed and not depth:
                raise RepositoryError(f"the repository {self.db_path.parent} is closed")
            self._in_use += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            with self._uses:
                self._in_use -= 1
                if not self._in_use:
                    self._uses.notify_all()

    @contextlib.contextmanager
    def damage_reported(self) -> Iterator[None]:
        """Turn SQLite's report of a damaged catalog into one clear error."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise
            raise RepositoryDamaged(f"the catalog {self.db_path} is damaged: {exc}") from None

    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.db_path, timeout=120, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=120000")
            self._local.conn = conn
            self._local.durable = True
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the catalog's lock.

        Its commit waits for the disk unless ``durable`` is false; it is then
        made durable by the next durable commit of any connection.
        """
        with self.used(), self._write_turn, self.damage_reported():
            conn = self.conn()
            if self._local.durable != durable:
                conn.execute("PRAGMA synchronous=" + ("FULL" if durable else "NORMAL"))
                self._local.durable = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot of the catalog."""
        with self.used(), self.damage_reported():
            conn = self.conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def drop_connections(self) -> None:
        """Close every thread's connection now; the next use opens a new one.

        For a process about to fork, with no use in progress: SQLite must not
        see a connection opened before a fork used or closed after it.
        """
        with self._all_lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    def close(self, wait: float = 60.0) -> None:
        """Close every thread's connection once the uses in progress end.

        Later uses raise RepositoryError. A connection still in use after
        ``wait`` seconds is left to its thread rather than freed under it.
        """
        with self._uses:
            self._closed = True
            if not self._uses.wait_for(lambda: not self._in_use, timeout=wait):
                return
        self.drop_connections()


class LocalBackend:
    """The Backup Storage operations on a repository directory, in-process.

    ``owner`` scopes a view to one principal (the server passes the caller's
    access key): jobs are created under it, and other principals' jobs raise
    AccessDeniedException. A view with no owner sees every job.

    ``trust_checksums`` is for a caller in this process that computed each
    checksum itself from the very bytes it passes (cryo's own pipeline, on
    the embedded repository): the SHA-256 of a chunk is then not computed a
    second time on receipt. Lengths are still checked, and every read
    (restore, ``verify --read-data``) still verifies every chunk. The
    server never trusts: its bytes crossed a network.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        create: bool = True,
        owner: str | None = None,
        trust_checksums: bool = False,
    ) -> None:
        self._engine = _Engine(Path(root), create)
        self.owner = owner
        self.root = self._engine.root
        self.trust_checksums = trust_checksums
        self._process_trash()

    @classmethod
    def _view(cls, engine: _Engine, owner: str | None) -> LocalBackend:
        view = cls.__new__(cls)
        view._engine = engine
        view.owner = owner
        view.root = engine.root
        view.trust_checksums = False
        return view

    @property
    def writes_aligned(self) -> bool:
        """Whether a chunk handed over in page-aligned memory is written without a copy.

        Chunk files are written with direct I/O, which needs aligned memory;
        bytes from anywhere else are first copied into an aligned buffer.
        """
        store = self._engine.store
        return isinstance(store, FileChunkStore) and store.direct

    def before_fork(self) -> None:
        """Hold no database connection across a fork (reopened on the next use)."""
        self._engine.drop_connections()

    def reopen(self) -> LocalBackend:
        """The same repository through its own database connections (e.g. in a forked process)."""
        view = LocalBackend._view(_Engine(self.root, create=False), self.owner)
        view.trust_checksums = self.trust_checksums
        return view

    def for_owner(self, owner: str) -> LocalBackend:
        """A view of the same repository scoped to ``owner``."""
        return LocalBackend._view(self._engine, owner)

    def close(self) -> None:
        self._engine.close()

    # -- helpers -----------------------------------------------------------
    @property
    def store(self) -> ChunkStore:
        return self._engine.store

    def _job_row(
        self, conn: sqlite3.Connection, job_id: str, *, writable: bool = False
    ) -> tuple[int, str]:
        """(seq, status) of a job the caller may use."""
        if not isinstance(job_id, str) or not job_id:
            raise IllegalArgumentException("the job id must be a non-empty string")
        row = conn.execute(
            "SELECT seq, owner, status FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None or row[2] == JOB_DELETED:
            raise ResourceNotFoundException(f"job {job_id} does not exist")
        seq, owner, status = row
        if self.owner is not None and owner != self.owner:
            raise AccessDeniedException(f"job {job_id} belongs to another principal")
        if writable and status != JOB_IN_PROGRESS:
            raise IllegalArgumentException(f"job {job_id} is {status} and accepts no more writes")
        return seq, status

    def _object_in_job(self, conn: sqlite3.Connection, seq: int, token: str, field: str) -> int:
        m = _OBJECT_TOKEN_RE.match(token) if isinstance(token, str) else None
        if m is None:
            raise ResourceNotFoundException(f"{field} {token!r} does not exist")
        object_id = int(m.group(1))
        if (
            conn.execute(
                "SELECT 1 FROM job_objects WHERE object_id = ? AND job_seq = ? LIMIT 1",
                (object_id, seq),
            ).fetchone()
            is None
        ):
            raise ResourceNotFoundException(f"{field} {token!r} does not exist in this job")
        return object_id

    def _receive(
        self, data: Body, length: int, checksum: str, key: str, field: str
    ) -> ChunkWriter | None:
        """Read and verify a body; returns a sealed writer unless the chunk is already stored."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise IllegalArgumentException(f"{field}Length must be a non-negative integer")
        if length > MAX_CHUNK_BYTES:
            raise IllegalArgumentException(
                f"{field}Length {length} exceeds the maximum chunk size of {MAX_CHUNK_BYTES} bytes"
            )
        store = self._engine.store
        writer = None if store.exists(key) else store.writer()
        try:
            h = None if self.trust_checksums else hashlib.sha256()
            for piece in _pieces(data, length, writer):
                if h is not None:
                    h.update(piece)
            if h is not None and b64_of_digest(h.digest()) != checksum:
                raise IllegalArgumentException(
                    f"{field}Checksum does not match the SHA-256 of the {length} bytes received"
                )
            if writer is not None:
                writer.seal()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return writer

    @contextlib.contextmanager
    def _placing(self, writer: ChunkWriter | None, key: str) -> Iterator[tuple[int, ...] | None]:
        """Put a received chunk's file in place, outside the catalog's lock, for the block.

        Yields the placed file's identity (None without a writer). The file is
        durable by then; the block adds its catalog row under the lock
        (``_store_under_lock``). If the block fails, the file goes to the
        trash unless a row vouches for it; ``close`` waits for the block.
        """
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._engine.used())
            except BaseException:
                if writer is not None:
                    writer.abort()  # closed while the body came in
                raise
            placed = None
            if writer is not None:
                try:
                    placed = writer.commit(key)
                except BaseException:
                    writer.abort()
                    self._forget_placed(key)  # it may have been renamed before the failure
                    raise
            try:
                yield placed
            except BaseException:
                if placed is not None:
                    self._forget_placed(key)
                raise

    def _store_under_lock(
        self,
        conn: sqlite3.Connection,
        key: str,
        length: int,
        placed: tuple[int, ...] | None,
        data: Body,
    ) -> None:
        """Make chunk ``key`` present in store and catalog; call inside a write transaction.

        ``placed``: the identity of the file this call put in place (``_placing``).
        """
        store = self._engine.store
        found = store.identity(key)
        if found is not None:
            if found != placed and not self._has_row(conn, key):
                store.sync(key)  # placed by a writer beside this one, or left by a crash
        elif isinstance(data, bytes | bytearray | memoryview):
            store.put(key, data)  # reclaimed since it was placed, or since it was seen
        else:
            raise RetryableException("the chunk was reclaimed while it was received; send it again")
        conn.execute("INSERT OR IGNORE INTO chunks(sha, length) VALUES (?, ?)", (key, length))
        conn.execute("DELETE FROM trash WHERE sha = ?", (key,))

    @staticmethod
    def _has_row(conn: sqlite3.Connection, key: str) -> bool:
        return conn.execute("SELECT 1 FROM chunks WHERE sha = ?", (key,)).fetchone() is not None

    def _trash_placed(self, conn: sqlite3.Connection, key: str) -> None:
        """A file placed for a call that keeps it not: reclaimed unless a row vouches for it."""
        if not self._has_row(conn, key):
            conn.execute("INSERT OR IGNORE INTO trash(sha) VALUES (?)", (key,))

    def _forget_placed(self, key: str) -> None:
        """After a failed call: its placed file goes to the trash (or stays, if this fails too)."""
        with (
            contextlib.suppress(RepositoryError, RepositoryDamaged, sqlite3.Error),
            self._engine.write() as conn,
        ):
            self._trash_placed(conn, key)

    def _release_objects(self, conn: sqlite3.Connection, object_ids: Iterable[int]) -> None:
        """Drop objects no job references any more; their unreferenced chunks go to trash."""
        candidates: set[str] = set()
        for object_id in set(object_ids):
            if conn.execute(
                "SELECT 1 FROM job_objects WHERE object_id = ? LIMIT 1", (object_id,)
            ).fetchone():
                continue
            candidates.update(
                r[0]
                for r in conn.execute(
                    "SELECT sha FROM object_chunks WHERE object_id = ?", (object_id,)
                )
            )
            row = conn.execute(
                "SELECT blob_sha FROM objects WHERE object_id = ?", (object_id,)
            ).fetchone()
            if row and row[0]:
                candidates.add(row[0])
            conn.execute("DELETE FROM object_chunks WHERE object_id = ?", (object_id,))
            conn.execute("DELETE FROM objects WHERE object_id = ?", (object_id,))
            conn.execute("UPDATE uploads SET object_id = NULL WHERE object_id = ?", (object_id,))
        self._trash_unreferenced(conn, candidates)

    def _trash_unreferenced(self, conn: sqlite3.Connection, shas: Iterable[str]) -> None:
        for sha in shas:
            if conn.execute("SELECT 1 FROM object_chunks WHERE sha = ? LIMIT 1", (sha,)).fetchone():
                continue
            if conn.execute("SELECT 1 FROM upload_chunks WHERE sha = ? LIMIT 1", (sha,)).fetchone():
                continue
            if conn.execute("SELECT 1 FROM objects WHERE blob_sha = ? LIMIT 1", (sha,)).fetchone():
                continue
            conn.execute("DELETE FROM chunks WHERE sha = ?", (sha,))
            conn.execute("INSERT OR IGNORE INTO trash(sha) VALUES (?)", (sha,))

    def _process_trash(self) -> None:
        """Delete the files of trashed chunks that nothing took back."""
        store = self._engine.store
        with self._engine.read() as conn:
            if conn.execute("SELECT 1 FROM trash LIMIT 1").fetchone() is None:
                return
        with self._engine.write() as conn:
            for (sha,) in conn.execute("SELECT sha FROM trash").fetchall():
                if conn.execute("SELECT 1 FROM chunks WHERE sha = ?", (sha,)).fetchone() is None:
                    store.delete(sha)
                conn.execute("DELETE FROM trash WHERE sha = ?", (sha,))

    def _discard_uploads(self, conn: sqlite3.Connection, seq: int) -> None:
        shas = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT uc.sha FROM upload_chunks uc JOIN uploads u "
                "ON u.upload_id = uc.upload_id WHERE u.job_seq = ?",
                (seq,),
            )
        ]
        conn.execute(
            "DELETE FROM upload_chunks WHERE upload_id IN "
            "(SELECT upload_id FROM uploads WHERE job_seq = ?)",
            (seq,),
        )
        conn.execute("DELETE FROM uploads WHERE job_seq = ?", (seq,))
        self._trash_unreferenced(conn, shas)

    def _insert_object(
        self,
        conn: sqlite3.Connection,
        seq: int,
        name: str,
        checksum: str,
        chunks_count: int,
        size: int,
        metadata_string: str | None,
        blob_sha: str | None,
        blob_length: int | None,
        throw_on_duplicate: bool,
    ) -> tuple[int, int | None]:
        """Insert an object under ``name``; returns its id and that of the object it replaced.

        The caller inserts the new object's chunks, then releases the replaced
        one: released first, a chunk both share (the same bytes sent again, as
        a retried PutObject does) would be reclaimed under the new object.
        """
        existing = conn.execute(
            "SELECT o.object_id, o.checksum FROM job_objects jo JOIN objects o "
            "ON o.object_id = jo.object_id WHERE jo.job_seq = ? AND jo.name = ?",
            (seq, name),
        ).fetchone()
        if existing is not None and throw_on_duplicate:
            raise DataAlreadyExistsException(
                f"object {name!r} already exists in this job", existing[1], SUMMARY_ALGORITHM
            )
        cur = conn.execute(
            "INSERT INTO objects(name, created_us, chunks_count, size, checksum, "
            "metadata_string, blob_sha, blob_length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, _now_us(), chunks_count, size, checksum, metadata_string, blob_sha, blob_length),
        )
        object_id = cur.lastrowid
        assert object_id is not None
        conn.execute(
            "INSERT OR REPLACE INTO job_objects(job_seq, name, object_id) VALUES (?, ?, ?)",
            (seq, name, object_id),
        )
        return object_id, existing[0] if existing is not None else None

    # -- backup side -------------------------------------------------------
    def start_object(
        self, backup_job_id: str, object_name: str, throw_on_duplicate: bool = False
    ) -> str:
        _check_object_name(object_name)
        with self._engine.write() as conn:
            seq, _ = self._job_row(conn, backup_job_id, writable=True)
            if throw_on_duplicate:
                row = conn.execute(
                    "SELECT o.checksum FROM job_objects jo JOIN objects o "
                    "ON o.object_id = jo.object_id WHERE jo.job_seq = ? AND jo.name = ?",
                    (seq, object_name),
                ).fetchone()
                if row is not None:
                    raise DataAlreadyExistsException(
                        f"object {object_name!r} already exists in this job",
                        row[0],
                        SUMMARY_ALGORITHM,
                    )
            upload_id = secrets.token_hex(16)
            conn.execute(
                "INSERT INTO uploads(upload_id, job_seq, name, throw_on_duplicate, created_us) "
                "VALUES (?, ?, ?, ?, ?)",
                (upload_id, seq, object_name, int(bool(throw_on_duplicate)), _now_us()),
            )
        return upload_id

    def _open_upload(
        self, conn: sqlite3.Connection, job_id: str, upload_id: str
    ) -> tuple[int, str, bool, int | None]:
        seq, _ = self._job_row(conn, job_id, writable=True)
        row = conn.execute(
            "SELECT name, throw_on_duplicate, object_id FROM uploads "
            "WHERE upload_id = ? AND job_seq = ?",
            (upload_id, seq),
        ).fetchone()
        if row is None:
            raise ResourceNotFoundException(f"upload {upload_id} does not exist in job {job_id}")
        return seq, row[0], bool(row[1]), row[2]

    def put_chunk(
        self,
        backup_job_id: str,
        upload_id: str,
        chunk_index: int,
        data: Body,
        length: int,
        checksum: str,
        checksum_algorithm: str = CHUNK_ALGORITHM,
    ) -> PutChunkResult:
        _check_algorithm(checksum_algorithm, CHUNK_ALGORITHM, "ChecksumAlgorithm")
        if (
            isinstance(chunk_index, bool)
            or not isinstance(chunk_index, int)
            or not 0 <= chunk_index <= _MAX_CHUNK_INDEX
        ):
            raise IllegalArgumentException(f"ChunkIndex must be between 0 and {_MAX_CHUNK_INDEX}")
        key = _key_of(checksum, "Checksum")
        with self._engine.read() as conn:
            *_, done = self._open_upload(conn, backup_job_id, upload_id)
            sent = self._chunk_at(conn, upload_id, chunk_index)
        if done is not None:
            raise IllegalArgumentException(f"upload {upload_id} is already complete")
        writer = self._receive(data, length, checksum, key, "")
        # Not durable by itself: NotifyObjectComplete's commit is (see the module's doc),
        # unless it replaces a chunk sent before under this index: that one goes to the
        # trash, and only a durable transaction may drop a row a file depends on.
        replaces = sent is not None and sent != key
        with self._placing(writer, key) as placed:
            with self._engine.write(durable=replaces) as conn:
                *_, done = self._open_upload(conn, backup_job_id, upload_id)
                if done is not None:
                    raise IllegalArgumentException(f"upload {upload_id} is already complete")
                self._store_under_lock(conn, key, length, placed, data)
                old = self._chunk_at(conn, upload_id, chunk_index)
                conn.execute(
                    "INSERT OR REPLACE INTO upload_chunks(upload_id, idx, sha, length) "
                    "VALUES (?, ?, ?, ?)",
                    (upload_id, chunk_index, key, length),
                )
                stale = old if old is not None and old != key else None
                if stale is not None and replaces:
                    self._trash_unreferenced(conn, [stale])
            if stale is not None and not replaces:  # sent beside this call since it looked
                with self._engine.write() as conn:
                    self._trash_unreferenced(conn, [stale])
        return PutChunkResult(checksum, CHUNK_ALGORITHM)

    @staticmethod
    def _chunk_at(conn: sqlite3.Connection, upload_id: str, index: int) -> str | None:
        row = conn.execute(
            "SELECT sha FROM upload_chunks WHERE upload_id = ? AND idx = ?", (upload_id, index)
        ).fetchone()
        return None if row is None else str(row[0])

    def _receive_blob(
        self,
        blob: Body | None,
        length: int | None,
        checksum: str | None,
        algorithm: str | None,
    ) -> tuple[str | None, int | None, ChunkWriter | None]:
        """Read and verify a MetadataBlob; (key, length, writer), or Nones when there is none."""
        sent = blob is not None and not (
            isinstance(blob, bytes | bytearray | memoryview) and len(blob) == 0
        )
        if not sent and not length and checksum is None:
            return None, None, None
        if length is None:
            raise IllegalArgumentException("MetadataBlobLength is required with a MetadataBlob")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise IllegalArgumentException("MetadataBlobLength must be a non-negative integer")
        if length > MAX_METADATA_BLOB_BYTES:
            raise IllegalArgumentException(
                f"MetadataBlobLength {length} exceeds {MAX_METADATA_BLOB_BYTES} bytes"
            )
        _check_algorithm(algorithm, CHUNK_ALGORITHM, "MetadataBlobChecksumAlgorithm")
        key = _key_of(checksum, "MetadataBlobChecksum")
        assert checksum is not None
        writer = self._receive(
            blob if blob is not None else b"", length, checksum, key, "MetadataBlob"
        )
        return key, length, writer

    def notify_object_complete(
        self,
        backup_job_id: str,
        upload_id: str,
        object_checksum: str,
        object_checksum_algorithm: str = SUMMARY_ALGORITHM,
        metadata_string: str | None = None,
        metadata_blob: Body | None = None,
        metadata_blob_length: int | None = None,
        metadata_blob_checksum: str | None = None,
        metadata_blob_checksum_algorithm: str | None = None,
    ) -> ObjectChecksum:
        _check_algorithm(object_checksum_algorithm, SUMMARY_ALGORITHM, "ObjectChecksumAlgorithm")
        if not object_checksum:
            raise IllegalArgumentException("ObjectChecksum is required")
        _check_metadata_string(metadata_string)
        with self._engine.read() as conn:
            self._open_upload(conn, backup_job_id, upload_id)
        blob_key, blob_length, writer = self._receive_blob(
            metadata_blob,
            metadata_blob_length,
            metadata_blob_checksum,
            metadata_blob_checksum_algorithm,
        )
        with self._placing(writer, blob_key or "") as placed, self._engine.write() as conn:
            seq, name, throw, done = self._open_upload(conn, backup_job_id, upload_id)
            if done is not None:
                row = conn.execute(
                    "SELECT checksum FROM objects WHERE object_id = ?", (done,)
                ).fetchone()
                if row is not None and row[0] == object_checksum:
                    if placed is not None:
                        assert blob_key is not None
                        self._trash_placed(conn, blob_key)
                    return ObjectChecksum(object_checksum, SUMMARY_ALGORITHM)
                raise IllegalArgumentException(f"upload {upload_id} is already complete")
            rows = conn.execute(
                "SELECT idx, sha, length FROM upload_chunks WHERE upload_id = ? ORDER BY idx",
                (upload_id,),
            ).fetchall()
            for expected, (idx, _, _) in enumerate(rows):
                if idx != expected:
                    raise IllegalArgumentException(
                        f"chunk indexes have a gap: index {expected} was never uploaded"
                    )
            summary = summary_checksum(checksum_of_hex(r[1]) for r in rows)
            if summary != object_checksum:
                raise IllegalArgumentException(
                    "ObjectChecksum does not match the SUMMARY of the uploaded chunks"
                )
            if blob_key is not None:
                assert blob_length is not None
                self._store_under_lock(conn, blob_key, blob_length, placed, metadata_blob or b"")
            object_id, replaced = self._insert_object(
                conn,
                seq,
                name,
                summary,
                len(rows),
                sum(r[2] for r in rows),
                metadata_string,
                blob_key,
                blob_length,
                throw,
            )
            conn.execute(
                "INSERT INTO object_chunks(object_id, idx, sha, length) "
                "SELECT ?, idx, sha, length FROM upload_chunks WHERE upload_id = ?",
                (object_id, upload_id),
            )
            conn.execute("DELETE FROM upload_chunks WHERE upload_id = ?", (upload_id,))
            conn.execute(
                "UPDATE uploads SET object_id = ? WHERE upload_id = ?", (object_id, upload_id)
            )
            if replaced is not None:
                self._release_objects(conn, [replaced])
        self._process_trash()
        return ObjectChecksum(summary, SUMMARY_ALGORITHM)

    def put_object(
        self,
        backup_job_id: str,
        object_name: str,
        inline_chunk: Body,
        inline_chunk_length: int,
        inline_chunk_checksum: str,
        inline_chunk_checksum_algorithm: str = CHUNK_ALGORITHM,
        object_checksum: str | None = None,
        object_checksum_algorithm: str | None = None,
        metadata_string: str | None = None,
        throw_on_duplicate: bool = False,
    ) -> PutObjectResult:
        _check_object_name(object_name)
        _check_algorithm(
            inline_chunk_checksum_algorithm, CHUNK_ALGORITHM, "InlineChunkChecksumAlgorithm"
        )
        if object_checksum_algorithm is not None or object_checksum is not None:
            _check_algorithm(
                object_checksum_algorithm, SUMMARY_ALGORITHM, "ObjectChecksumAlgorithm"
            )
        _check_metadata_string(metadata_string)
        if inline_chunk_length is None:
            raise IllegalArgumentException("InlineChunkLength is required")
        key = _key_of(inline_chunk_checksum, "InlineChunkChecksum")
        summary = summary_checksum([inline_chunk_checksum])
        if object_checksum is not None and object_checksum != summary:
            raise IllegalArgumentException(
                "ObjectChecksum does not match the SUMMARY of the inline chunk"
            )
        with self._engine.read() as conn:
            self._job_row(conn, backup_job_id, writable=True)
        writer = self._receive(
            inline_chunk, inline_chunk_length, inline_chunk_checksum, key, "InlineChunk"
        )
        with self._placing(writer, key) as placed, self._engine.write() as conn:
            seq, _ = self._job_row(conn, backup_job_id, writable=True)
            self._store_under_lock(conn, key, inline_chunk_length, placed, inline_chunk)
            object_id, replaced = self._insert_object(
                conn,
                seq,
                object_name,
                summary,
                1,
                inline_chunk_length,
                metadata_string,
                None,
                None,
                throw_on_duplicate,
            )
            conn.execute(
                "INSERT INTO object_chunks(object_id, idx, sha, length) VALUES (?, 0, ?, ?)",
                (object_id, key, inline_chunk_length),
            )
            if replaced is not None:
                self._release_objects(conn, [replaced])
        self._process_trash()
        return PutObjectResult(inline_chunk_checksum, CHUNK_ALGORITHM, summary, SUMMARY_ALGORITHM)

    def delete_object(self, backup_job_id: str, object_name: str) -> None:
        _check_object_name(object_name)
        with self._engine.write() as conn:
            seq, _ = self._job_row(conn, backup_job_id, writable=True)
            row = conn.execute(
                "SELECT object_id FROM job_objects WHERE job_seq = ? AND name = ?",
                (seq, object_name),
            ).fetchone()
            if row is None:
                raise ResourceNotFoundException(
                    f"object {object_name!r} does not exist in job {backup_job_id}"
                )
            conn.execute(
                "DELETE FROM job_objects WHERE job_seq = ? AND name = ?", (seq, object_name)
            )
            self._release_objects(conn, [row[0]])
        self._process_trash()

    # -- restore side ------------------------------------------------------
    def list_objects(
        self,
        storage_job_id: str,
        starting_object_name: str | None = None,
        starting_object_prefix: str | None = None,
        max_results: int | None = None,
        next_token: str | None = None,
        created_before: datetime | None = None,
        created_after: datetime | None = None,
    ) -> ObjectPage:
        limit = _check_max_results(max_results)
        where = ["jo.job_seq = ?"]
        args: list[object] = []
        if starting_object_name is not None:
            _check_object_name(starting_object_name, "StartingObjectName")
            where.append("jo.name >= ?")
            args.append(starting_object_name)
        if starting_object_prefix:
            _check_object_name(starting_object_prefix, "StartingObjectPrefix")
            where.append("jo.name >= ?")
            args.append(starting_object_prefix)
            upper = _prefix_upper(starting_object_prefix)
            if upper is not None:
                where.append("jo.name < ?")
                args.append(upper)
        if next_token is not None:
            where.append("jo.name > ?")
            args.append(_decode_name_token(next_token))
        if created_before is not None:
            where.append("o.created_us < ?")
            args.append(_dt_to_us(created_before))
        if created_after is not None:
            where.append("o.created_us > ?")
            args.append(_dt_to_us(created_after))
        with self._engine.read() as conn:
            seq, _ = self._job_row(conn, storage_job_id)
            rows = conn.execute(
                "SELECT jo.name, o.object_id, o.chunks_count, o.metadata_string, o.checksum "
                "FROM job_objects jo JOIN objects o ON o.object_id = jo.object_id "
                f"WHERE {' AND '.join(where)} ORDER BY jo.name LIMIT ?",
                (seq, *args, limit + 1),
            ).fetchall()
        objects = tuple(
            BackupObject(name, count, meta, checksum, SUMMARY_ALGORITHM, f"o{object_id}")
            for name, object_id, count, meta, checksum in rows[:limit]
        )
        token = _encode_name_token(objects[-1].name) if len(rows) > limit else None
        return ObjectPage(objects, token)

    def list_chunks(
        self,
        storage_job_id: str,
        object_token: str,
        max_results: int | None = None,
        next_token: str | None = None,
    ) -> ChunkPage:
        limit = _check_max_results(max_results)
        after = -1 if next_token is None else _decode_int_token(next_token, "i", "NextToken")
        with self._engine.read() as conn:
            seq, _ = self._job_row(conn, storage_job_id)
            object_id = self._object_in_job(conn, seq, object_token, "ObjectToken")
            rows = conn.execute(
                "SELECT idx, sha, length FROM object_chunks WHERE object_id = ? AND idx > ? "
                "ORDER BY idx LIMIT ?",
                (object_id, after, limit + 1),
            ).fetchall()
        chunks = tuple(
            Chunk(idx, length, checksum_of_hex(sha), CHUNK_ALGORITHM, f"c{object_id}.{idx}")
            for idx, sha, length in rows[:limit]
        )
        token = f"i{chunks[-1].index}" if len(rows) > limit else None
        return ChunkPage(chunks, token)

    def _chunk_row(self, storage_job_id: str, chunk_token: str) -> tuple[str, int]:
        m = _CHUNK_TOKEN_RE.match(chunk_token) if isinstance(chunk_token, str) else None
        with self._engine.read() as conn:
            seq, _ = self._job_row(conn, storage_job_id)
            if m is None:
                raise ResourceNotFoundException(f"ChunkToken {chunk_token!r} does not exist")
            object_id, idx = int(m.group(1)), int(m.group(2))
            try:
                self._object_in_job(conn, seq, f"o{object_id}", "ChunkToken")
            except ResourceNotFoundException:
                raise ResourceNotFoundException(
                    f"ChunkToken {chunk_token!r} does not exist in this job"
                ) from None
            row = conn.execute(
                "SELECT sha, length FROM object_chunks WHERE object_id = ? AND idx = ?",
                (object_id, idx),
            ).fetchone()
        if row is None:
            raise ResourceNotFoundException(f"ChunkToken {chunk_token!r} does not exist")
        return row[0], row[1]

    def open_chunk(self, storage_job_id: str, chunk_token: str) -> tuple[BinaryIO, int, str]:
        """GetChunk for streaming: an open file, the bytes to send and the recorded checksum.

        Stored bytes are served as they are: a chunk file damaged on disk
        (changed, or cut short) fails the reader's checksum check, which
        names it. A chunk file that is gone is ResourceNotFoundException,
        since no retry can bring it back.
        """
        sha, length = self._chunk_row(storage_job_id, chunk_token)
        try:
            f = self._engine.store.open(sha)
        except FileNotFoundError:
            raise _chunk_data_missing(chunk_token) from None
        return f, min(length, os.fstat(f.fileno()).st_size), checksum_of_hex(sha)

    def get_chunk(self, storage_job_id: str, chunk_token: str) -> ChunkData:
        sha, length = self._chunk_row(storage_job_id, chunk_token)
        try:
            data = self._engine.store.get(sha)
        except FileNotFoundError:
            raise _chunk_data_missing(chunk_token) from None
        return ChunkData(data, min(length, len(data)), checksum_of_hex(sha), CHUNK_ALGORITHM)

    def get_object_metadata(self, storage_job_id: str, object_token: str) -> ObjectMetadata:
        with self._engine.read() as conn:
            seq, _ = self._job_row(conn, storage_job_id)
            object_id = self._object_in_job(conn, seq, object_token, "ObjectToken")
            meta, blob_sha, blob_length = conn.execute(
                "SELECT metadata_string, blob_sha, blob_length FROM objects WHERE object_id = ?",
                (object_id,),
            ).fetchone()
        if blob_sha is None:
            return ObjectMetadata(meta, b"", 0, None, None)
        try:
            blob = self._engine.store.get(blob_sha)
        except FileNotFoundError:
            raise ServiceInternalException(
                f"the metadata blob of object {object_token} is missing from the repository"
            ) from None
        return ObjectMetadata(meta, blob, blob_length, checksum_of_hex(blob_sha), CHUNK_ALGORITHM)

    # -- job control -------------------------------------------------------
    def _job_from_row(self, conn: sqlite3.Connection, row: tuple[object, ...]) -> Job:
        seq, job_id, client_token, base, pool, status, created, completed, attrs = row
        assert isinstance(seq, int)
        count = conn.execute(
            "SELECT COUNT(*) FROM job_objects WHERE job_seq = ?", (seq,)
        ).fetchone()[0]
        return Job(
            job_id=str(job_id),
            status=str(status),
            created=_us_to_dt(created),  # type: ignore[arg-type]
            completed=_us_to_dt(completed),  # type: ignore[arg-type]
            base_job_id=base,  # type: ignore[arg-type]
            pool_id=pool,  # type: ignore[arg-type]
            client_token=client_token,  # type: ignore[arg-type]
            attributes=json.loads(str(attrs)),
            object_count=int(count),
        )

    _JOB_COLUMNS = (
        "seq, job_id, client_token, base_job_id, pool_id, status, created_us, completed_us, "
        "attributes"
    )

    def _load_job(self, conn: sqlite3.Connection, job_id: str) -> Job:
        row = conn.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        return self._job_from_row(conn, row)

    @staticmethod
    def _encode_attributes(attributes: Mapping[str, object] | None) -> str:
        if attributes is None:
            return "{}"
        try:
            text = json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            raise IllegalArgumentException("Attributes must be a JSON object") from None
        if len(text.encode("utf-8")) > MAX_ATTRIBUTES_BYTES:
            raise IllegalArgumentException(f"Attributes exceed {MAX_ATTRIBUTES_BYTES} bytes")
        return text

    def create_job(
        self,
        client_token: str | None = None,
        base_job_id: str | None = None,
        pool_id: str | None = None,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        if client_token is not None and (
            not client_token or _utf8_len(client_token, "ClientToken") > MAX_CLIENT_TOKEN_BYTES
        ):
            raise IllegalArgumentException(
                f"ClientToken must be 1 to {MAX_CLIENT_TOKEN_BYTES} bytes"
            )
        if pool_id is not None and (
            len(pool_id) > MAX_POOL_ID_BYTES or not _POOL_RE.match(pool_id)
        ):
            raise IllegalArgumentException(
                f"PoolId must be 1 to {MAX_POOL_ID_BYTES} characters of A-Z a-z 0-9 _ . -"
            )
        attrs = self._encode_attributes(attributes)
        owner = self.owner or ""
        with self._engine.write() as conn:
            if client_token is not None:
                row = conn.execute(
                    "SELECT job_id, status, base_job_id, pool_id FROM jobs "
                    "WHERE owner = ? AND client_token = ?",
                    (owner, client_token),
                ).fetchone()
                if row is not None:
                    if row[1] == JOB_DELETED:
                        raise IllegalArgumentException(
                            f"ClientToken belongs to job {row[0]}, which was deleted"
                        )
                    if (row[2], row[3]) != (base_job_id, pool_id):
                        raise IllegalArgumentException(
                            f"ClientToken belongs to job {row[0]}, created with another "
                            "BaseJobId or PoolId"
                        )
                    return self._load_job(conn, row[0])
            base_seq = None
            if base_job_id is not None:
                base_seq, base_status = self._job_row(conn, base_job_id)
                if base_status not in (JOB_COMPLETED, JOB_PARTIAL):
                    raise IllegalArgumentException(
                        f"base job {base_job_id} is {base_status}; "
                        "only a completed job can be a base"
                    )
            created = _now_us()
            for _ in range(10):
                stamp = datetime.fromtimestamp(created / 1_000_000, tz=UTC)
                job_id = f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
                try:
                    cur = conn.execute(
                        "INSERT INTO jobs(job_id, owner, client_token, base_job_id, pool_id, "
                        "status, created_us, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job_id,
                            owner,
                            client_token,
                            base_job_id,
                            pool_id,
                            JOB_IN_PROGRESS,
                            created,
                            attrs,
                        ),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:  # pragma: no cover - 32 random bits collided ten times
                raise ServiceInternalException("could not allocate a unique job id")
            if base_seq is not None:
                conn.execute(
                    "INSERT INTO job_objects(job_seq, name, object_id) "
                    "SELECT ?, name, object_id FROM job_objects WHERE job_seq = ?",
                    (cur.lastrowid, base_seq),
                )
            return self._load_job(conn, job_id)

    def complete_job(
        self,
        job_id: str,
        status: str = JOB_COMPLETED,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        if status not in FINAL_STATUSES:
            raise IllegalArgumentException(f"Status must be one of {', '.join(FINAL_STATUSES)}")
        with self._engine.write() as conn:
            seq, current = self._job_row(conn, job_id)
            if current != JOB_IN_PROGRESS:
                if current == status:
                    return self._load_job(conn, job_id)
                raise IllegalArgumentException(f"job {job_id} is already {current}")
            self._discard_uploads(conn, seq)
            sets = "status = ?, completed_us = ?"
            args: list[object] = [status, _now_us()]
            if attributes is not None:
                row = conn.execute("SELECT attributes FROM jobs WHERE seq = ?", (seq,)).fetchone()
                merged = {**json.loads(row[0]), **dict(attributes)}
                sets += ", attributes = ?"
                args.append(self._encode_attributes(merged))
            conn.execute(f"UPDATE jobs SET {sets} WHERE seq = ?", (*args, seq))
            job = self._load_job(conn, job_id)
        self._process_trash()
        return job

    def describe_job(self, job_id: str) -> Job:
        with self._engine.read() as conn:
            self._job_row(conn, job_id)
            return self._load_job(conn, job_id)

    def list_jobs(
        self, marker: str | None = None, limit: int | None = None, pool_id: str | None = None
    ) -> JobPage:
        if limit is None:
            limit = MAX_RESULTS
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RESULTS:
            raise IllegalArgumentException(f"Limit must be between 1 and {MAX_RESULTS}")
        where = ["status != ?"]
        args: list[object] = [JOB_DELETED]
        if self.owner is not None:
            where.append("owner = ?")
            args.append(self.owner)
        if pool_id is not None:
            where.append("pool_id = ?")
            args.append(pool_id)
        if marker is not None:
            where.append("seq < ?")
            args.append(_decode_int_token(marker, "m", "Marker"))
        with self._engine.read() as conn:
            rows = conn.execute(
                f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY seq DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            jobs = tuple(self._job_from_row(conn, r) for r in rows[:limit])
        next_marker = f"m{rows[limit - 1][0]}" if len(rows) > limit else None
        return JobPage(jobs, next_marker)

    def delete_job(self, job_id: str) -> None:
        with self._engine.write() as conn:
            seq, _ = self._job_row(conn, job_id)
            object_ids = [
                r[0]
                for r in conn.execute("SELECT object_id FROM job_objects WHERE job_seq = ?", (seq,))
            ]
            conn.execute("DELETE FROM job_objects WHERE job_seq = ?", (seq,))
            self._discard_uploads(conn, seq)
            conn.execute("UPDATE jobs SET status = ? WHERE seq = ?", (JOB_DELETED, seq))
            self._release_objects(conn, object_ids)
        self._process_trash()


def _chunk_data_missing(chunk_token: str) -> ResourceNotFoundException:
    """A listed chunk whose file is gone: no retry can bring it back."""
    return ResourceNotFoundException(
        f"the data of chunk {chunk_token} is missing from the repository"
    )
