"""One storage interface: the nine Backup Storage operations plus job control.

``Backend`` is the protocol every storage implementation satisfies; callers
(the backup and restore pipelines, the server) depend on it only. Method and
argument names are the API's, in snake case; results are frozen records;
failures raise the modeled exceptions of :mod:`cryo.errors`.

The API itself leaves jobs to a control plane. cryo adds a small surface for
them: create (idempotent per client token, optionally as a copy-on-write
increment of a base job, in a pool), complete, describe, list (newest first,
paged with an opaque marker) and delete.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

#: Limits enforced identically by every backend (see docs/FORMAT.md).
MAX_RESULTS = 100
MAX_METADATA_STRING_BYTES = 256
MAX_METADATA_BLOB_BYTES = 4 * 1024 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MAX_OBJECT_NAME_BYTES = 1024
MAX_CLIENT_TOKEN_BYTES = 256
MAX_POOL_ID_BYTES = 64
MAX_ATTRIBUTES_BYTES = 64 * 1024

JOB_IN_PROGRESS = "IN_PROGRESS"
JOB_COMPLETED = "COMPLETED"
JOB_PARTIAL = "PARTIAL"
JOB_FAILED = "FAILED"
FINAL_STATUSES = (JOB_COMPLETED, JOB_PARTIAL, JOB_FAILED)


@dataclass(frozen=True, slots=True)
class BackupObject:
    """One entry of ListObjects."""

    name: str
    chunks_count: int
    metadata_string: str | None
    object_checksum: str
    object_checksum_algorithm: str
    object_token: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """One entry of ListChunks."""

    index: int
    length: int
    checksum: str
    checksum_algorithm: str
    chunk_token: str


@dataclass(frozen=True, slots=True)
class ObjectPage:
    objects: tuple[BackupObject, ...]
    next_token: str | None


@dataclass(frozen=True, slots=True)
class ChunkPage:
    chunks: tuple[Chunk, ...]
    next_token: str | None


@dataclass(frozen=True, slots=True)
class ChunkData:
    """GetChunk's reply: the bytes and the checksum the repository recorded for them."""

    data: bytes
    length: int
    checksum: str
    checksum_algorithm: str


@dataclass(frozen=True, slots=True)
class ObjectMetadata:
    """GetObjectMetadata's reply."""

    metadata_string: str | None
    metadata_blob: bytes
    metadata_blob_length: int
    metadata_blob_checksum: str | None
    metadata_blob_checksum_algorithm: str | None


@dataclass(frozen=True, slots=True)
class PutChunkResult:
    chunk_checksum: str
    chunk_checksum_algorithm: str


@dataclass(frozen=True, slots=True)
class ObjectChecksum:
    """NotifyObjectComplete's reply."""

    object_checksum: str
    object_checksum_algorithm: str


@dataclass(frozen=True, slots=True)
class PutObjectResult:
    inline_chunk_checksum: str
    inline_chunk_checksum_algorithm: str
    object_checksum: str
    object_checksum_algorithm: str


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the control surface describes it."""

    job_id: str
    status: str
    created: datetime
    completed: datetime | None
    base_job_id: str | None
    pool_id: str | None
    client_token: str | None
    attributes: Mapping[str, object] = field(default_factory=dict)
    object_count: int = 0


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: tuple[Job, ...]
    next_marker: str | None


@runtime_checkable
class Backend(Protocol):
    """The Backup Storage operations and cryo's job control surface."""

    # -- backup side -------------------------------------------------------
    def start_object(
        self, backup_job_id: str, object_name: str, throw_on_duplicate: bool = False
    ) -> str:
        """StartObject: begin an upload; returns its UploadId."""
        ...

    def put_chunk(
        self,
        backup_job_id: str,
        upload_id: str,
        chunk_index: int,
        data: bytes | bytearray,
        length: int,
        checksum: str,
        checksum_algorithm: str = "SHA256",
    ) -> PutChunkResult:
        """PutChunk: store one chunk of an upload (verified against ``checksum``)."""
        ...

    def notify_object_complete(
        self,
        backup_job_id: str,
        upload_id: str,
        object_checksum: str,
        object_checksum_algorithm: str = "SUMMARY",
        metadata_string: str | None = None,
        metadata_blob: bytes | None = None,
        metadata_blob_length: int | None = None,
        metadata_blob_checksum: str | None = None,
        metadata_blob_checksum_algorithm: str | None = None,
    ) -> ObjectChecksum:
        """NotifyObjectComplete: verify the SUMMARY checksum and make the object visible."""
        ...

    def put_object(
        self,
        backup_job_id: str,
        object_name: str,
        inline_chunk: bytes | bytearray,
        inline_chunk_length: int,
        inline_chunk_checksum: str,
        inline_chunk_checksum_algorithm: str = "SHA256",
        object_checksum: str | None = None,
        object_checksum_algorithm: str | None = None,
        metadata_string: str | None = None,
        throw_on_duplicate: bool = False,
    ) -> PutObjectResult:
        """PutObject: store a one-chunk object in one call."""
        ...

    def delete_object(self, backup_job_id: str, object_name: str) -> None:
        """DeleteObject: remove an object from this job only."""
        ...

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
        """ListObjects: completed objects of a job, in name order, one page."""
        ...

    def list_chunks(
        self,
        storage_job_id: str,
        object_token: str,
        max_results: int | None = None,
        next_token: str | None = None,
    ) -> ChunkPage:
        """ListChunks: an object's chunks in index order, one page."""
        ...

    def get_chunk(self, storage_job_id: str, chunk_token: str) -> ChunkData:
        """GetChunk: one chunk's bytes with its recorded checksum."""
        ...

    def get_object_metadata(self, storage_job_id: str, object_token: str) -> ObjectMetadata:
        """GetObjectMetadata: the object's metadata string and blob."""
        ...

    # -- job control -------------------------------------------------------
    def create_job(
        self,
        client_token: str | None = None,
        base_job_id: str | None = None,
        pool_id: str | None = None,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        """Create a job, or return the one already created with ``client_token``."""
        ...

    def complete_job(
        self,
        job_id: str,
        status: str = JOB_COMPLETED,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        """Mark a job COMPLETED, PARTIAL or FAILED; pending uploads are discarded."""
        ...

    def describe_job(self, job_id: str) -> Job: ...

    def list_jobs(
        self, marker: str | None = None, limit: int | None = None, pool_id: str | None = None
    ) -> JobPage:
        """Jobs newest first, one page of at most ``limit`` (1-100, default 100)."""
        ...

    def delete_job(self, job_id: str) -> None:
        """Delete a job; data no other job references is reclaimed."""
        ...

    def close(self) -> None: ...

    def before_fork(self) -> None:
        """Make it safe to fork this process (and use ``reopen`` in the child)."""
        ...

    def reopen(self) -> Backend:
        """The same storage through connections of its own (for a forked process)."""
        ...


def iter_objects(backend: Backend, job_id: str, **filters: object) -> Iterator[BackupObject]:
    """Every object of a job that ``filters`` select, paging ListObjects to the end."""
    token = None
    while True:
        page = backend.list_objects(job_id, next_token=token, **filters)  # type: ignore[arg-type]
        yield from page.objects
        token = page.next_token
        if token is None:
            return


def iter_chunks(backend: Backend, job_id: str, object_token: str) -> Iterator[Chunk]:
    """Every chunk of an object in index order, paging ListChunks to the end."""
    token = None
    while True:
        page = backend.list_chunks(job_id, object_token, next_token=token)
        yield from page.chunks
        token = page.next_token
        if token is None:
            return
