"""Helpers the storage tests share: upload and read back whole objects through the API."""

from __future__ import annotations

import errno
import os
from typing import Any

from cryo.checksums import chunk_checksum, summary_checksum
from cryo.encoding import encode
from cryo.manifest import MANIFEST_OBJECT, ManifestEntry, footer, header
from cryo.storage.api import Backend, BackupObject, iter_chunks, iter_objects


def upload(
    backend: Backend,
    job_id: str,
    name: str,
    chunks: list[bytes],
    *,
    metadata_string: str | None = None,
    blob: bytes | None = None,
    throw_on_duplicate: bool = False,
) -> str:
    """StartObject, PutChunk each chunk, NotifyObjectComplete; returns the SUMMARY checksum."""
    upload_id = backend.start_object(job_id, name, throw_on_duplicate=throw_on_duplicate)
    sums = []
    for i, data in enumerate(chunks):
        c = chunk_checksum(data)
        sums.append(c)
        r = backend.put_chunk(job_id, upload_id, i, data, len(data), c)
        assert r.chunk_checksum == c and r.chunk_checksum_algorithm == "SHA256"
    summary = summary_checksum(sums)
    kwargs = {}
    if blob is not None:
        kwargs = {
            "metadata_blob": blob,
            "metadata_blob_length": len(blob),
            "metadata_blob_checksum": chunk_checksum(blob),
            "metadata_blob_checksum_algorithm": "SHA256",
        }
    r2 = backend.notify_object_complete(
        job_id, upload_id, summary, "SUMMARY", metadata_string=metadata_string, **kwargs
    )
    assert r2.object_checksum == summary
    return summary


def put_small(backend: Backend, job_id: str, name: str, data: bytes, **kw: object) -> str:
    r = backend.put_object(job_id, name, data, len(data), chunk_checksum(data), **kw)  # type: ignore[arg-type]
    return r.object_checksum


def all_objects(backend: Backend, job_id: str, **kw: object) -> list[BackupObject]:
    return list(iter_objects(backend, job_id, **kw))


def read_object(backend: Backend, job_id: str, obj: BackupObject) -> list[bytes]:
    """Every chunk of ``obj``, each verified against its listed checksum, and the SUMMARY."""
    chunks = []
    listed = list(iter_chunks(backend, job_id, obj.object_token))
    assert [c.index for c in listed] == list(range(len(listed)))
    for c in listed:
        got = backend.get_chunk(job_id, c.chunk_token)
        assert got.checksum == c.checksum
        assert chunk_checksum(got.data) == c.checksum, f"chunk {c.index} of {obj.name} corrupt"
        assert got.length == len(got.data) == c.length
        chunks.append(got.data)
    assert summary_checksum(c.checksum for c in listed) == obj.object_checksum
    return chunks


def contents(backend: Backend, job_id: str) -> dict[str, bytes]:
    return {o.name: b"".join(read_object(backend, job_id, o)) for o in all_objects(backend, job_id)}


def crafted_job(backend: Any, entries: list[ManifestEntry], data: bytes) -> str:
    """A complete job whose manifest says whatever the test wants, written through the API.

    Its one data object, ``data/x``, holds ``data`` in a single chunk.
    """
    job = backend.create_job().job_id
    stored = encode(data, None)
    backend.put_object(job, "data/x", stored, len(stored), chunk_checksum(stored))
    lines = [header(job=job, host="evil", paths=["/"], chunk_size=1 << 20, created="now")]
    lines += [e.to_json() for e in entries]
    lines.append(footer(len(entries)))
    manifest = encode(("\n".join(lines) + "\n").encode(), 3)
    upload_id = backend.start_object(job, MANIFEST_OBJECT)
    c = chunk_checksum(manifest)
    backend.put_chunk(job, upload_id, 0, manifest, len(manifest), c)
    backend.notify_object_complete(job, upload_id, summary_checksum([c]))
    backend.complete_job(job)
    return str(job)


def refuse_direct_io(monkeypatch: Any) -> None:
    """Make every open with O_DIRECT fail as a file system without direct I/O fails it."""
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
