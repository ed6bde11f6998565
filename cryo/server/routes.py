"""Routes: the 2018-04-10 Backup Storage operations and cryo's job API, over a backend.

Routing looks at the raw request path, split on literal ``/`` before any
percent-decoding, so an object named ``x/complete`` (sent as
``x%2Fcomplete``) is one segment and never NotifyObjectComplete. Literal
segments are compared as sent; each label segment is then percent-decoded
to UTF-8 (``+`` stays a plus sign). Query strings are decoded the same way.

Every handler reads its inputs where the model puts them (URI label, query
string, header, JSON body or streamed payload), calls the backend, and
returns a :class:`Reply` shaped as the model's output. Failures are the
backend's modeled exceptions; malformed parameters are
``IllegalArgumentException`` naming the model's member.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import unquote_to_bytes

from cryo.errors import IllegalArgumentException, ResourceNotFoundException
from cryo.storage import wire
from cryo.storage.api import BackupObject, Chunk, Job
from cryo.storage.local import LocalBackend

JOB_API_PREFIX = ("cryo", "v1", "jobs")


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(slots=True)
class Reply:
    """What a handler answers: status, headers, and a body held in memory or an open file."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: BinaryIO | None = None
    file_length: int = 0
    #: The job the request concerned, when the path does not name it (CreateJob).
    job: str | None = None


@dataclass(slots=True)
class Call:
    """One authenticated request, as a handler sees it."""

    backend: LocalBackend
    labels: dict[str, str]
    query: dict[str, str]
    #: The whole body, for operations whose body is signed (small JSON documents).
    body: bytes
    #: The payload stream of PutChunk, PutObject and NotifyObjectComplete (None when empty).
    stream: Readable | None


Handler = Callable[[Call], Reply]


@dataclass(frozen=True, slots=True)
class Route:
    operation: str
    method: str
    segments: tuple[str, ...]
    handler: Handler
    #: The payload is a streamed blob (model ``authtype: v4-unsigned-body``).
    streaming: bool = False

    def match(self, method: str, segments: list[str]) -> dict[str, str] | None:
        if method != self.method or len(segments) != len(self.segments):
            return None
        labels: dict[str, str] = {}
        for pattern, raw in zip(self.segments, segments, strict=True):
            if pattern.startswith("{"):
                labels[pattern[1:-1]] = raw
            elif pattern != raw:
                return None
        return labels


# -- decoding ------------------------------------------------------------------


def decode_component(raw: str, what: str) -> str:
    """Percent-decode one path segment or query component to UTF-8 (``+`` is kept)."""
    try:
        return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeError:
        raise IllegalArgumentException(f"{what} is not valid percent-encoded UTF-8") from None


def parse_query(raw_query: str) -> dict[str, str]:
    query: dict[str, str] = {}
    if not raw_query:
        return query
    for pair in raw_query.split("&"):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition("=")
        name = decode_component(raw_name, "a query parameter name")
        if name in query:
            raise IllegalArgumentException(f"the query parameter {name!r} appears more than once")
        query[name] = decode_component(raw_value, f"the query parameter {name!r}")
    return query


def _required(query: Mapping[str, str], name: str, member: str) -> str:
    value = query.get(name)
    if value is None:
        raise IllegalArgumentException(f"{member} is required")
    return value


def _integer(text: str | None, member: str) -> int | None:
    if text is None:
        return None
    body = text[1:] if text[:1] in "+-" else text
    if not body.isdigit() or not body.isascii() or len(body) > 19:
        raise IllegalArgumentException(f"{member} must be an integer, got {text!r}")
    return int(text)


def _required_integer(query: Mapping[str, str], name: str, member: str) -> int:
    value = _integer(_required(query, name, member), member)
    assert value is not None
    return value


def _boolean(text: str | None, member: str) -> bool:
    if text is None:
        return False
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise IllegalArgumentException(f"{member} must be true or false, got {text!r}")


def _timestamp(text: str | None, member: str) -> datetime | None:
    """An ISO 8601 time (as botocore sends it) or seconds since the epoch."""
    if text is None:
        return None
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), tz=UTC)
        value = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise IllegalArgumentException(
            f"{member} must be an ISO 8601 time or seconds since the epoch, got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _json_document(body: bytes, allowed: frozenset[str] | None) -> dict[str, Any]:
    """The body as a JSON object ({} when empty); ``allowed`` lists the members it may have."""
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise IllegalArgumentException("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise IllegalArgumentException("the request body must be a JSON object")
    if allowed is not None:
        unknown = sorted(set(doc) - allowed)
        if unknown:
            raise IllegalArgumentException(f"unknown member {unknown[0]!r} in the request body")
    return doc


def _json_string(doc: Mapping[str, Any], member: str) -> str | None:
    value = doc.get(member)
    if value is not None and not isinstance(value, str):
        raise IllegalArgumentException(f"{member} must be a string")
    return value


def _json_reply(document: Mapping[str, Any], status: int = 200, job: str | None = None) -> Reply:
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    return Reply(status, [("Content-Type", "application/json")], body, job=job)


def _stream(call: Call, length: int | None = None, member: str = "Length") -> BinaryIO:
    """The payload; IllegalArgumentException at once if its framing says it is not ``length``.

    A body whose Content-Length differs from the member's value is refused
    before it is read, rather than once the server has waited for all of it.
    """
    stream: Readable = call.stream if call.stream is not None else _Empty()
    framed = getattr(call.stream, "length", None)
    if length is not None and framed is not None and framed != length:
        raise IllegalArgumentException(f"{member} is {length} but the body has {framed} bytes")
    return cast(BinaryIO, stream)


class _Empty:
    def read(self, n: int = -1, /) -> bytes:
        return b""


# -- the Backup Storage operations ----------------------------------------------


def start_object(call: Call) -> Reply:
    doc = _json_document(call.body, None)
    throw = doc.get("ThrowOnDuplicate", False)
    if not isinstance(throw, bool):
        raise IllegalArgumentException("ThrowOnDuplicate must be a boolean")
    upload_id = call.backend.start_object(call.labels["jobId"], call.labels["objectName"], throw)
    return _json_reply({"UploadId": upload_id})


def put_chunk(call: Call) -> Reply:
    q = call.query
    index = _integer(call.labels["chunkIndex"], "ChunkIndex")
    assert index is not None
    length = _required_integer(q, "length", "Length")
    result = call.backend.put_chunk(
        call.labels["jobId"],
        call.labels["uploadId"],
        index,
        _stream(call, length),
        length,
        _required(q, "checksum", "Checksum"),
        _required(q, "checksum-algorithm", "ChecksumAlgorithm"),
    )
    return _json_reply(
        {
            "ChunkChecksum": result.chunk_checksum,
            "ChunkChecksumAlgorithm": result.chunk_checksum_algorithm,
        }
    )


def notify_object_complete(call: Call) -> Reply:
    q = call.query
    blob_length = _integer(q.get("metadata-blob-length"), "MetadataBlobLength")
    result = call.backend.notify_object_complete(
        call.labels["jobId"],
        call.labels["uploadId"],
        _required(q, "checksum", "ObjectChecksum"),
        _required(q, "checksum-algorithm", "ObjectChecksumAlgorithm"),
        metadata_string=q.get("metadata-string"),
        metadata_blob=(
            _stream(call, blob_length, "MetadataBlobLength") if call.stream is not None else None
        ),
        metadata_blob_length=blob_length,
        metadata_blob_checksum=q.get("metadata-checksum"),
        metadata_blob_checksum_algorithm=q.get("metadata-checksum-algorithm"),
    )
    return _json_reply(
        {
            "ObjectChecksum": result.object_checksum,
            "ObjectChecksumAlgorithm": result.object_checksum_algorithm,
        }
    )


def put_object(call: Call) -> Reply:
    q = call.query
    length = _integer(q.get("length"), "InlineChunkLength")
    if length is None:
        raise IllegalArgumentException("InlineChunkLength is required")
    result = call.backend.put_object(
        call.labels["jobId"],
        call.labels["objectName"],
        _stream(call, length, "InlineChunkLength"),
        length,
        _required(q, "checksum", "InlineChunkChecksum"),
        q.get("checksum-algorithm", "SHA256"),
        object_checksum=q.get("object-checksum"),
        object_checksum_algorithm=q.get("object-checksum-algorithm"),
        metadata_string=q.get("metadata-string"),
        throw_on_duplicate=_boolean(q.get("throwOnDuplicate"), "ThrowOnDuplicate"),
    )
    return _json_reply(
        {
            "InlineChunkChecksum": result.inline_chunk_checksum,
            "InlineChunkChecksumAlgorithm": result.inline_chunk_checksum_algorithm,
            "ObjectChecksum": result.object_checksum,
            "ObjectChecksumAlgorithm": result.object_checksum_algorithm,
        }
    )


def delete_object(call: Call) -> Reply:
    call.backend.delete_object(call.labels["jobId"], call.labels["objectName"])
    return Reply()


def _object_json(o: BackupObject) -> dict[str, Any]:
    return wire.drop_none(
        {
            "Name": o.name,
            "ChunksCount": o.chunks_count,
            "MetadataString": o.metadata_string,
            "ObjectChecksum": o.object_checksum,
            "ObjectChecksumAlgorithm": o.object_checksum_algorithm,
            "ObjectToken": o.object_token,
        }
    )


def _chunk_json(c: Chunk) -> dict[str, Any]:
    return {
        "Index": c.index,
        "Length": c.length,
        "Checksum": c.checksum,
        "ChecksumAlgorithm": c.checksum_algorithm,
        "ChunkToken": c.chunk_token,
    }


def list_objects(call: Call) -> Reply:
    q = call.query
    page = call.backend.list_objects(
        call.labels["jobId"],
        starting_object_name=q.get("starting-object-name"),
        starting_object_prefix=q.get("starting-object-prefix"),
        max_results=_integer(q.get("max-results"), "MaxResults"),
        next_token=q.get("next-token"),
        created_before=_timestamp(q.get("created-before"), "CreatedBefore"),
        created_after=_timestamp(q.get("created-after"), "CreatedAfter"),
    )
    return _json_reply(
        wire.drop_none(
            {"ObjectList": [_object_json(o) for o in page.objects], "NextToken": page.next_token}
        )
    )


def list_chunks(call: Call) -> Reply:
    q = call.query
    page = call.backend.list_chunks(
        call.labels["jobId"],
        call.labels["objectToken"],
        max_results=_integer(q.get("max-results"), "MaxResults"),
        next_token=q.get("next-token"),
    )
    return _json_reply(
        wire.drop_none(
            {"ChunkList": [_chunk_json(c) for c in page.chunks], "NextToken": page.next_token}
        )
    )


def get_chunk(call: Call) -> Reply:
    f, length, checksum = call.backend.open_chunk(call.labels["jobId"], call.labels["chunkToken"])
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("x-amz-data-length", str(length)),
        ("x-amz-checksum", checksum),
        ("x-amz-checksum-algorithm", "SHA256"),
    ]
    return Reply(200, headers, file=f, file_length=length)


def get_object_metadata(call: Call) -> Reply:
    meta = call.backend.get_object_metadata(call.labels["jobId"], call.labels["objectToken"])
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("x-amz-data-length", str(meta.metadata_blob_length)),
    ]
    if meta.metadata_string is not None:
        headers.append(("x-amz-metadata-string", meta.metadata_string))
    if meta.metadata_blob_checksum is not None:
        headers.append(("x-amz-checksum", meta.metadata_blob_checksum))
    if meta.metadata_blob_checksum_algorithm is not None:
        headers.append(("x-amz-checksum-algorithm", meta.metadata_blob_checksum_algorithm))
    return Reply(200, headers, meta.metadata_blob)


# -- cryo's job API (docs/API.md) -------------------------------------------------

_CREATE_MEMBERS = frozenset({"ClientToken", "BaseJobId", "PoolId", "Attributes"})
_COMPLETE_MEMBERS = frozenset({"Status", "Attributes"})


def _attributes(doc: Mapping[str, Any]) -> dict[str, object] | None:
    value = doc.get("Attributes")
    if value is not None and not isinstance(value, dict):
        raise IllegalArgumentException("Attributes must be a JSON object")
    return value


def _job_reply(job: Job) -> Reply:
    return _json_reply(wire.job_to_json(job), job=job.job_id)


def create_job(call: Call) -> Reply:
    doc = _json_document(call.body, _CREATE_MEMBERS)
    job = call.backend.create_job(
        client_token=_json_string(doc, "ClientToken"),
        base_job_id=_json_string(doc, "BaseJobId"),
        pool_id=_json_string(doc, "PoolId"),
        attributes=_attributes(doc),
    )
    return _job_reply(job)


def list_jobs(call: Call) -> Reply:
    q = call.query
    page = call.backend.list_jobs(
        marker=q.get("marker"),
        limit=_integer(q.get("limit"), "Limit"),
        pool_id=q.get("pool-id"),
    )
    return _json_reply(
        wire.drop_none(
            {"Jobs": [wire.job_to_json(j) for j in page.jobs], "NextMarker": page.next_marker}
        )
    )


def describe_job(call: Call) -> Reply:
    return _job_reply(call.backend.describe_job(call.labels["jobId"]))


def complete_job(call: Call) -> Reply:
    doc = _json_document(call.body, _COMPLETE_MEMBERS)
    status = _json_string(doc, "Status")
    job = call.backend.complete_job(
        call.labels["jobId"],
        status if status is not None else "COMPLETED",
        attributes=_attributes(doc),
    )
    return _job_reply(job)


def delete_job(call: Call) -> Reply:
    call.backend.delete_job(call.labels["jobId"])
    return Reply(204)


def _route(
    operation: str, method: str, path: str, handler: Handler, *, streaming: bool = False
) -> Route:
    return Route(operation, method, tuple(path.strip("/").split("/")), handler, streaming)


ROUTES: tuple[Route, ...] = (
    _route("StartObject", "PUT", "/backup-jobs/{jobId}/object/{objectName}", start_object),
    _route(
        "PutChunk",
        "PUT",
        "/backup-jobs/{jobId}/chunk/{uploadId}/{chunkIndex}",
        put_chunk,
        streaming=True,
    ),
    _route(
        "NotifyObjectComplete",
        "PUT",
        "/backup-jobs/{jobId}/object/{uploadId}/complete",
        notify_object_complete,
        streaming=True,
    ),
    _route(
        "PutObject",
        "PUT",
        "/backup-jobs/{jobId}/object/{objectName}/put-object",
        put_object,
        streaming=True,
    ),
    _route("DeleteObject", "DELETE", "/backup-jobs/{jobId}/object/{objectName}", delete_object),
    _route("ListObjects", "GET", "/restore-jobs/{jobId}/objects/list", list_objects),
    _route("ListChunks", "GET", "/restore-jobs/{jobId}/chunks/{objectToken}/list", list_chunks),
    _route("GetChunk", "GET", "/restore-jobs/{jobId}/chunk/{chunkToken}", get_chunk),
    _route(
        "GetObjectMetadata",
        "GET",
        "/restore-jobs/{jobId}/object/{objectToken}/metadata",
        get_object_metadata,
    ),
    _route("CreateJob", "POST", "/cryo/v1/jobs", create_job),
    _route("ListJobs", "GET", "/cryo/v1/jobs", list_jobs),
    _route("DescribeJob", "GET", "/cryo/v1/jobs/{jobId}", describe_job),
    _route("CompleteJob", "POST", "/cryo/v1/jobs/{jobId}/complete", complete_job),
    _route("DeleteJob", "DELETE", "/cryo/v1/jobs/{jobId}", delete_job),
)


def match(method: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
    """The route for a method and raw path, with its raw (still encoded) labels."""
    if not raw_path.startswith("/"):
        return None
    segments = raw_path[1:].split("/")
    for route in ROUTES:
        labels = route.match(method, segments)
        if labels is not None:
            return route, labels
    return None


def decode_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels percent-decoded; errors name the model's member (``jobId`` -> ``JobId``)."""
    return {
        name: decode_component(raw, name[:1].upper() + name[1:]) for name, raw in labels.items()
    }


def not_found(method: str, raw_path: str) -> ResourceNotFoundException:
    shown = raw_path if len(raw_path) <= 200 else raw_path[:200] + "..."
    return ResourceNotFoundException(f"no operation matches {method} {shown}")
