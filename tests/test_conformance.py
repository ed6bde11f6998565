"""Conformance suite for the storage interface: every operation, rule and error.

Runs unchanged against every backend in ``conftest.BACKEND_KINDS``. It uses the
``Backend`` protocol only, never a backend's internals, so what passes here is
what any client of the Backup Storage API can rely on.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from cryo.checksums import chunk_checksum, summary_checksum
from cryo.errors import (
    DataAlreadyExistsException,
    IllegalArgumentException,
    ResourceNotFoundException,
)
from cryo.storage.api import Backend

from .storage_helpers import all_objects, contents, put_small, read_object, upload

ODD_NAMES = [
    "a/b/c.txt",
    "with space",
    "percent%20literal",
    "plus+sign",
    "ünïcødé/日本語",
    "x/complete",
    "y/put-object",
    "trailing/",
    "?query&like=1#frag",
]


def new_job(backend: Backend, **kw: object) -> str:
    return backend.create_job(**kw).job_id  # type: ignore[arg-type]


# -- objects and chunks -----------------------------------------------------


def test_put_object_round_trip(backend: Backend) -> None:
    job = new_job(backend)
    data = os.urandom(1000)
    r = backend.put_object(job, "one", data, len(data), chunk_checksum(data), metadata_string="m")
    assert r.inline_chunk_checksum == chunk_checksum(data)
    assert r.object_checksum == summary_checksum([chunk_checksum(data)])
    assert r.object_checksum_algorithm == "SUMMARY"
    [obj] = all_objects(backend, job)
    assert (obj.name, obj.chunks_count, obj.metadata_string) == ("one", 1, "m")
    assert read_object(backend, job, obj) == [data]


def test_multi_chunk_object_with_metadata(backend: Backend) -> None:
    job = new_job(backend)
    chunks = [os.urandom(5000), b"", b"tail" * 10]
    blob = os.urandom(70_000)
    summary = upload(backend, job, "big", chunks, metadata_string="meta data", blob=blob)
    [obj] = all_objects(backend, job)
    assert obj.object_checksum == summary and obj.chunks_count == 3
    assert read_object(backend, job, obj) == chunks
    meta = backend.get_object_metadata(job, obj.object_token)
    assert meta.metadata_string == "meta data"
    assert meta.metadata_blob == blob
    assert meta.metadata_blob_length == len(blob)
    assert meta.metadata_blob_checksum == chunk_checksum(blob)


def test_object_without_chunks_or_metadata(backend: Backend) -> None:
    job = new_job(backend)
    upload(backend, job, "empty", [])
    [obj] = all_objects(backend, job)
    assert obj.chunks_count == 0 and obj.metadata_string is None
    assert obj.object_checksum == summary_checksum([])
    assert backend.list_chunks(job, obj.object_token).chunks == ()
    meta = backend.get_object_metadata(job, obj.object_token)
    assert meta.metadata_blob == b"" and meta.metadata_blob_length == 0


@pytest.mark.parametrize("name", ODD_NAMES)
def test_object_names_round_trip(backend: Backend, name: str) -> None:
    job = new_job(backend)
    put_small(backend, job, name, name.encode())
    assert contents(backend, job) == {name: name.encode()}
    backend.delete_object(job, name)
    assert all_objects(backend, job) == []


def test_unfinished_upload_is_invisible(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "pending")
    data = b"abc"
    backend.put_chunk(job, upload_id, 0, data, 3, chunk_checksum(data))
    assert all_objects(backend, job) == []
    backend.notify_object_complete(job, upload_id, summary_checksum([chunk_checksum(data)]))
    assert [o.name for o in all_objects(backend, job)] == ["pending"]


def test_put_chunk_checksum_mismatch_stores_nothing(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    with pytest.raises(IllegalArgumentException, match="Checksum"):
        backend.put_chunk(job, upload_id, 0, b"real bytes", 10, chunk_checksum(b"other bytes"))
    # Index 0 was never stored: completing with any summary reports nothing uploaded.
    with pytest.raises(IllegalArgumentException):
        backend.notify_object_complete(job, upload_id, summary_checksum([chunk_checksum(b"x")]))
    assert all_objects(backend, job) == []


def test_put_chunk_wrong_length(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    data = b"0123456789"
    with pytest.raises(IllegalArgumentException, match="Length"):
        backend.put_chunk(job, upload_id, 0, data, 11, chunk_checksum(data))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("Checksum", {"checksum": "not base64!"}),
        ("ChecksumAlgorithm", {"checksum_algorithm": "MD5"}),
        ("ChunkIndex", {"chunk_index": -1}),
    ],
)
def test_put_chunk_bad_arguments_name_the_field(
    backend: Backend, field: str, kwargs: dict[str, object]
) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    args: dict[str, object] = {
        "backup_job_id": job,
        "upload_id": upload_id,
        "chunk_index": 0,
        "data": b"x",
        "length": 1,
        "checksum": chunk_checksum(b"x"),
        "checksum_algorithm": "SHA256",
    }
    args.update(kwargs)
    with pytest.raises(IllegalArgumentException, match=field):
        backend.put_chunk(**args)  # type: ignore[arg-type]


def test_put_object_checksum_mismatch(backend: Backend) -> None:
    job = new_job(backend)
    with pytest.raises(IllegalArgumentException, match="InlineChunkChecksum"):
        backend.put_object(job, "o", b"abc", 3, chunk_checksum(b"abd"))
    with pytest.raises(IllegalArgumentException, match="ObjectChecksum"):
        backend.put_object(
            job, "o", b"abc", 3, chunk_checksum(b"abc"), "SHA256", chunk_checksum(b"x"), "SUMMARY"
        )
    with pytest.raises(IllegalArgumentException, match="Length"):
        backend.put_object(job, "o", b"abc", 4, chunk_checksum(b"abc"))
    assert all_objects(backend, job) == []


def test_summary_mismatch_keeps_object_invisible(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    a, b = b"first", b"second"
    backend.put_chunk(job, upload_id, 0, a, len(a), chunk_checksum(a))
    backend.put_chunk(job, upload_id, 1, b, len(b), chunk_checksum(b))
    wrong = summary_checksum([chunk_checksum(b), chunk_checksum(a)])  # wrong order
    with pytest.raises(IllegalArgumentException, match="ObjectChecksum"):
        backend.notify_object_complete(job, upload_id, wrong)
    assert all_objects(backend, job) == []
    right = summary_checksum([chunk_checksum(a), chunk_checksum(b)])
    backend.notify_object_complete(job, upload_id, right)
    assert contents(backend, job) == {"o": a + b}


def test_gap_in_chunk_indexes(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    a, c = b"a", b"c"
    backend.put_chunk(job, upload_id, 0, a, 1, chunk_checksum(a))
    backend.put_chunk(job, upload_id, 2, c, 1, chunk_checksum(c))
    with pytest.raises(IllegalArgumentException, match="gap"):
        backend.notify_object_complete(
            job, upload_id, summary_checksum([chunk_checksum(a), chunk_checksum(c)])
        )


def test_chunks_arrive_in_any_order_and_can_be_resent(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    parts = [os.urandom(100) for _ in range(5)]
    for i in [3, 1, 4, 0, 2, 3]:  # index 3 sent twice, as a retry would
        backend.put_chunk(job, upload_id, i, parts[i], 100, chunk_checksum(parts[i]))
    backend.notify_object_complete(job, upload_id, summary_checksum(map(chunk_checksum, parts)))
    assert contents(backend, job) == {"o": b"".join(parts)}


def test_notify_retry_after_success_is_idempotent(backend: Backend) -> None:
    job = new_job(backend)
    upload_id = backend.start_object(job, "o")
    backend.put_chunk(job, upload_id, 0, b"z", 1, chunk_checksum(b"z"))
    summary = summary_checksum([chunk_checksum(b"z")])
    backend.notify_object_complete(job, upload_id, summary)
    again = backend.notify_object_complete(job, upload_id, summary)
    assert again.object_checksum == summary
    assert contents(backend, job) == {"o": b"z"}


def test_throw_on_duplicate(backend: Backend) -> None:
    job = new_job(backend)
    first = put_small(backend, job, "dup", b"one")
    with pytest.raises(DataAlreadyExistsException) as info:
        backend.start_object(job, "dup", throw_on_duplicate=True)
    assert info.value.checksum == first
    with pytest.raises(DataAlreadyExistsException) as info2:
        put_small(backend, job, "dup", b"two", throw_on_duplicate=True)
    assert info2.value.checksum == first
    assert contents(backend, job) == {"dup": b"one"}


def test_duplicate_without_flag_replaces_atomically(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "name", b"old")
    upload_id = backend.start_object(job, "name")
    backend.put_chunk(job, upload_id, 0, b"new!", 4, chunk_checksum(b"new!"))
    assert contents(backend, job) == {"name": b"old"}  # old one visible until completion
    backend.notify_object_complete(job, upload_id, summary_checksum([chunk_checksum(b"new!")]))
    assert contents(backend, job) == {"name": b"new!"}


def test_metadata_limits(backend: Backend) -> None:
    job = new_job(backend)
    with pytest.raises(IllegalArgumentException, match="MetadataString"):
        put_small(backend, job, "o", b"x", metadata_string="m" * 257)
    put_small(backend, job, "ok", b"x", metadata_string="é" * 128)  # 256 bytes
    upload_id = backend.start_object(job, "o")
    with pytest.raises(IllegalArgumentException, match="MetadataString"):
        backend.notify_object_complete(
            job, upload_id, summary_checksum([]), metadata_string="x" * 300
        )
    big = b"\0" * (4 * 1024 * 1024 + 1)
    with pytest.raises(IllegalArgumentException, match="MetadataBlob"):
        backend.notify_object_complete(
            job, upload_id, summary_checksum([]), "SUMMARY", None, big, len(big),
            chunk_checksum(big), "SHA256",
        )  # fmt: skip
    blob = b"blob"
    with pytest.raises(IllegalArgumentException, match="MetadataBlobChecksum"):
        backend.notify_object_complete(
            job, upload_id, summary_checksum([]), "SUMMARY", None, blob, 4,
            chunk_checksum(b"blub"), "SHA256",
        )  # fmt: skip
    assert [o.name for o in all_objects(backend, job)] == ["ok"]


def test_object_name_limits(backend: Backend) -> None:
    job = new_job(backend)
    with pytest.raises(IllegalArgumentException, match="ObjectName"):
        backend.start_object(job, "n" * 1025)
    with pytest.raises(IllegalArgumentException, match="ObjectName"):
        put_small(backend, job, "n" * 10_240, b"x")


def test_delete_object(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "a", b"a")
    put_small(backend, job, "b", b"b")
    backend.delete_object(job, "a")
    assert contents(backend, job) == {"b": b"b"}
    with pytest.raises(ResourceNotFoundException):
        backend.delete_object(job, "a")


# -- listing ------------------------------------------------------------------


def test_list_objects_pages_in_name_order(backend: Backend) -> None:
    job = new_job(backend)
    names = [f"f{i:04d}" for i in range(230)]
    for n in reversed(names):
        put_small(backend, job, n, n.encode())
    pages = []
    token = None
    while True:
        page = backend.list_objects(job, next_token=token)
        pages.append([o.name for o in page.objects])
        token = page.next_token
        if token is None:
            break
    assert [len(p) for p in pages] == [100, 100, 30]
    assert [n for p in pages for n in p] == names
    small = backend.list_objects(job, max_results=7)
    assert [o.name for o in small.objects] == names[:7] and small.next_token


def test_list_objects_filters(backend: Backend) -> None:
    job = new_job(backend)
    for n in ["a/1", "a/2", "ab", "b/1", "b/2", "c"]:
        put_small(backend, job, n, b"x")
    names = [o.name for o in all_objects(backend, job, starting_object_prefix="a/")]
    assert names == ["a/1", "a/2"]
    names = [o.name for o in all_objects(backend, job, starting_object_name="b/1")]
    assert names == ["b/1", "b/2", "c"]
    paged = [o.name for o in all_objects(backend, job, starting_object_prefix="b", max_results=1)]
    assert paged == ["b/1", "b/2"]


def test_list_objects_created_window(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "early", b"1")
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    put_small(backend, job, "late", b"2")
    assert [o.name for o in all_objects(backend, job, created_after=middle)] == ["late"]
    assert [o.name for o in all_objects(backend, job, created_before=middle)] == ["early"]
    later = middle + timedelta(hours=1)
    assert all_objects(backend, job, created_after=later) == []


@pytest.mark.parametrize("max_results", [0, 101, -5])
def test_max_results_out_of_range(backend: Backend, max_results: int) -> None:
    job = new_job(backend)
    put_small(backend, job, "a", b"a")
    [obj] = all_objects(backend, job)
    with pytest.raises(IllegalArgumentException, match="MaxResults"):
        backend.list_objects(job, max_results=max_results)
    with pytest.raises(IllegalArgumentException, match="MaxResults"):
        backend.list_chunks(job, obj.object_token, max_results=max_results)


def test_bad_next_token(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "a", b"a")
    [obj] = all_objects(backend, job)
    with pytest.raises(IllegalArgumentException, match="NextToken"):
        backend.list_objects(job, next_token="garbage!")
    with pytest.raises(IllegalArgumentException, match="NextToken"):
        backend.list_chunks(job, obj.object_token, next_token="garbage!")


def test_list_chunks_pages_in_index_order(backend: Backend) -> None:
    job = new_job(backend)
    parts = [i.to_bytes(2, "big") for i in range(205)]
    upload(backend, job, "many", parts)
    [obj] = all_objects(backend, job)
    assert obj.chunks_count == 205
    first = backend.list_chunks(job, obj.object_token)
    assert len(first.chunks) == 100 and first.next_token
    assert read_object(backend, job, obj) == parts


# -- unknown resources -----------------------------------------------------------


def test_unknown_resources(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "a", b"a")
    [obj] = all_objects(backend, job)
    with pytest.raises(ResourceNotFoundException):
        backend.start_object("no-such-job", "x")
    with pytest.raises(ResourceNotFoundException):
        backend.list_objects("no-such-job")
    with pytest.raises(ResourceNotFoundException):
        backend.put_chunk(job, "no-such-upload", 0, b"x", 1, chunk_checksum(b"x"))
    with pytest.raises(ResourceNotFoundException):
        backend.notify_object_complete(job, "no-such-upload", summary_checksum([]))
    with pytest.raises(ResourceNotFoundException):
        backend.list_chunks(job, "no-such-object")
    with pytest.raises(ResourceNotFoundException):
        backend.get_object_metadata(job, "o999999")
    with pytest.raises(ResourceNotFoundException):
        backend.get_chunk(job, "no-such-chunk")
    # A token of one job is not valid in another.
    other = new_job(backend)
    with pytest.raises(ResourceNotFoundException):
        backend.list_chunks(other, obj.object_token)
    chunk = backend.list_chunks(job, obj.object_token).chunks[0]
    with pytest.raises(ResourceNotFoundException):
        backend.get_chunk(other, chunk.chunk_token)
    with pytest.raises(ResourceNotFoundException):
        backend.describe_job("no-such-job")


# -- jobs -------------------------------------------------------------------------


def test_create_job_is_idempotent_per_client_token(backend: Backend) -> None:
    a = backend.create_job(client_token="nightly-1", pool_id="GLACIER", attributes={"host": "h"})
    b = backend.create_job(client_token="nightly-1", pool_id="GLACIER")
    c = backend.create_job(client_token="nightly-2", pool_id="GLACIER")
    assert a.job_id == b.job_id != c.job_id
    assert a.status == "IN_PROGRESS" and a.pool_id == "GLACIER"
    assert dict(a.attributes) == {"host": "h"}
    with pytest.raises(IllegalArgumentException, match="ClientToken"):
        backend.create_job(client_token="nightly-1", pool_id="DEEP_ARCHIVE")


def test_complete_describe_and_writes_after_completion(backend: Backend) -> None:
    job = new_job(backend)
    put_small(backend, job, "a", b"a")
    pending = backend.start_object(job, "never-finished")
    backend.put_chunk(job, pending, 0, b"p", 1, chunk_checksum(b"p"))
    done = backend.complete_job(job, attributes={"files": 1})
    assert done.status == "COMPLETED" and done.completed is not None
    assert done.object_count == 1 and dict(done.attributes) == {"files": 1}
    assert backend.describe_job(job) == done
    assert backend.complete_job(job).status == "COMPLETED"  # idempotent
    with pytest.raises(IllegalArgumentException, match="COMPLETED"):
        put_small(backend, job, "b", b"b")
    with pytest.raises(IllegalArgumentException):
        backend.complete_job(job, status="FAILED")
    with pytest.raises(IllegalArgumentException, match="Status"):
        backend.complete_job(new_job(backend), status="BOGUS")
    assert contents(backend, job) == {"a": b"a"}


def test_list_jobs_newest_first_with_marker(backend: Backend) -> None:
    ids = [new_job(backend, pool_id="GLACIER" if i % 2 else "DEEP_ARCHIVE") for i in range(7)]
    seen = []
    marker = None
    while True:
        page = backend.list_jobs(marker=marker, limit=3)
        seen.extend(j.job_id for j in page.jobs)
        marker = page.next_marker
        if marker is None:
            break
    assert seen[: len(ids)] == list(reversed(ids))
    glacier = [j.job_id for j in backend.list_jobs(pool_id="GLACIER").jobs]
    assert glacier[:3] == [ids[5], ids[3], ids[1]]
    with pytest.raises(IllegalArgumentException, match="Limit"):
        backend.list_jobs(limit=0)
    with pytest.raises(IllegalArgumentException, match="Marker"):
        backend.list_jobs(marker="bogus")


def test_deleted_job_is_gone_and_its_id_never_reused(backend: Backend) -> None:
    job = new_job(backend, client_token="t")
    put_small(backend, job, "a", b"a")
    backend.delete_job(job)
    with pytest.raises(ResourceNotFoundException):
        backend.describe_job(job)
    with pytest.raises(ResourceNotFoundException):
        backend.list_objects(job)
    assert job not in {j.job_id for j in backend.list_jobs().jobs}
    later = {new_job(backend) for _ in range(50)}
    assert job not in later and len(later) == 50


def test_incremental_job_is_copy_on_write(backend: Backend) -> None:
    base = new_job(backend)
    put_small(backend, base, "keep", b"keep")
    put_small(backend, base, "drop", b"drop")
    upload(backend, base, "change", [b"v1"])
    backend.complete_job(base)
    inc = backend.create_job(base_job_id=base)
    assert inc.base_job_id == base and inc.object_count == 3
    backend.delete_object(inc.job_id, "drop")
    upload(backend, inc.job_id, "change", [b"v2"])
    put_small(backend, inc.job_id, "new", b"new")
    backend.complete_job(inc.job_id)
    assert contents(backend, base) == {"keep": b"keep", "drop": b"drop", "change": b"v1"}
    assert contents(backend, inc.job_id) == {"keep": b"keep", "change": b"v2", "new": b"new"}
    backend.delete_job(base)
    assert contents(backend, inc.job_id) == {"keep": b"keep", "change": b"v2", "new": b"new"}


def test_base_must_be_complete(backend: Backend) -> None:
    base = new_job(backend)
    with pytest.raises(IllegalArgumentException, match="base"):
        backend.create_job(base_job_id=base)
    with pytest.raises(ResourceNotFoundException):
        backend.create_job(base_job_id="no-such-job")


def test_bad_pool_id(backend: Backend) -> None:
    with pytest.raises(IllegalArgumentException, match="PoolId"):
        backend.create_job(pool_id="no spaces allowed")


def test_shared_chunks_survive_deletion_of_one_job(backend: Backend) -> None:
    shared = os.urandom(4096)
    a = new_job(backend)
    b = new_job(backend)
    upload(backend, a, "x", [shared, b"a-only"])
    upload(backend, b, "y", [b"b-only", shared])
    backend.complete_job(a)
    backend.complete_job(b)
    backend.delete_job(a)
    assert contents(backend, b) == {"y": b"b-only" + shared}
