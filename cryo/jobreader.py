"""Reading a job back: its objects, its manifest, and verified chunks.

Everything read is verified before it is trusted: a chunk's SHA-256 must
match the checksum ListChunks gave for it before it is decoded, and the
decoded length must match. The manifest is read through the same path, and
its footer proves it is whole. This is the read side shared by ``restore``
and ``verify``.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import threading
from collections.abc import Iterator
from typing import Any

from cryo.checksums import b64_of_digest
from cryo.encoding import EncodingError, decode
from cryo.errors import CryoError, ResourceNotFoundException
from cryo.manifest import (
    MANIFEST_OBJECT,
    ManifestEntry,
    parse_lines,
    read_entries,
    read_records,
)
from cryo.storage.api import BackupObject, Chunk, iter_chunks, iter_objects

_MEDIUM_ERRORS = frozenset(
    (errno.EIO, errno.EBADMSG, getattr(errno, "EUCLEAN", 117), getattr(errno, "ENODATA", 61))
)
"""Errors reading a stored chunk that mean its data is damaged, not that reading failed."""


class CorruptData(CryoError):
    """Stored data that fails its checksum or cannot be decoded."""


class JobReader:
    def __init__(self, backend: Any, job_id: str) -> None:
        self.backend = backend
        self.job_id = job_id
        self.objects: dict[str, BackupObject] = {o.name: o for o in iter_objects(backend, job_id)}
        self._chunks: dict[str, list[Chunk]] = {}
        self._lock = threading.Lock()

    def chunks_of(self, name: str) -> list[Chunk]:
        with self._lock:
            cached = self._chunks.get(name)
        if cached is not None:
            return cached
        obj = self.objects.get(name)
        if obj is None:
            raise CorruptData(f"object {name!r} is missing from job {self.job_id}")
        listed = list(iter_chunks(self.backend, self.job_id, obj.object_token))
        if [c.index for c in listed] != list(range(len(listed))):
            raise CorruptData(f"object {name!r} lists chunks out of order or with gaps")
        with self._lock:
            self._chunks[name] = listed
        return listed

    def stored_chunk(self, name: str, index: int) -> bytes:
        """The stored bytes of a chunk, verified against its listed checksum."""
        chunks = self.chunks_of(name)
        if not 0 <= index < len(chunks):
            raise CorruptData(f"object {name!r} has no chunk {index}")
        c = chunks[index]
        try:
            data = self.backend.get_chunk(self.job_id, c.chunk_token).data
        except ResourceNotFoundException as exc:  # listed, yet its data is gone
            raise CorruptData(f"chunk {index} of {name!r} cannot be read: {exc}") from None
        except OSError as exc:
            if exc.errno not in _MEDIUM_ERRORS:
                raise
            raise CorruptData(  # the repository's own disk: a bad sector, a damaged block
                f"chunk {index} of {name!r} cannot be read: {exc.strerror or exc}"
            ) from None
        data = bytes(data)  # what is checked is what is used, whatever buffer it came in
        if b64_of_digest(hashlib.sha256(data).digest()) != c.checksum:
            raise CorruptData(f"chunk {index} of {name!r} fails its SHA-256 checksum")
        return data

    def chunk(self, name: str, index: int) -> bytes:
        """A chunk's original bytes: verified, then decoded."""
        return bytes(self.chunk_view(name, index))

    def chunk_view(
        self, name: str, index: int, into: bytearray | mmap.mmap | None = None
    ) -> bytes | memoryview:
        """``chunk``, as a view into the stored bytes where the chunk is stored raw (or
        into ``into``, where it is compressed and fits; see ``decode``)."""
        stored = self.stored_chunk(name, index)
        try:
            return decode(stored, copy=False, into=into)
        except EncodingError as exc:
            raise CorruptData(f"chunk {index} of {name!r}: {exc}") from None

    def manifest_chunks(self) -> Iterator[bytes]:
        """The manifest's decoded chunks, in order, each verified."""
        if MANIFEST_OBJECT not in self.objects:
            raise CorruptData(f"job {self.job_id} has no manifest (it was never completed)")
        count = len(self.chunks_of(MANIFEST_OBJECT))
        return (self.chunk(MANIFEST_OBJECT, i) for i in range(count))

    def manifest(self) -> tuple[dict[str, Any], Iterator[ManifestEntry]]:
        return read_entries(parse_lines(self.manifest_chunks()))

    def manifest_records(self) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
        """The manifest's header and its entries' JSON records, not yet decoded
        (``ManifestEntry.from_json``)."""
        return read_records(parse_lines(self.manifest_chunks()))

    def file_bytes(self, entry: ManifestEntry) -> bytes:
        """A file's whole content, holes as zeros (for small files and tests)."""
        out = bytearray(entry.size)
        for e in entry.extents:
            data = self.chunk(e.object_name, e.chunk_index)
            piece = data[e.chunk_offset : e.chunk_offset + e.length]
            if len(piece) != e.length:
                raise CorruptData(f"extent of {entry.path!r} runs past its chunk")
            out[e.file_offset : e.file_offset + e.length] = piece
        return bytes(out)
