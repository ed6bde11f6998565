"""RemoteBackend: the storage interface over HTTP, for any Backup Storage endpoint.

The nine Backup Storage operations go through a real boto3 ``backupstorage``
client built from cryo's bundled model, signed with SigV4 (signing name
``backup-storage``) using the standard AWS credential chain or a named
profile. botocore's own retries are switched off: retrying is the job of
cryo's single retry wrapper, which sees every failure translated here into
the exceptions of :mod:`cryo.errors`.

Job control is not part of the AWS API; ``cryo server`` offers it as a small
JSON API beside the Backup Storage routes (docs/API.md), signed the same way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from cryo.errors import (
    MODELED,
    AccessDeniedException,
    CryoError,
    DataAlreadyExistsException,
    EndpointUnreachable,
    IllegalArgumentException,
    ServiceInternalException,
    StorageError,
)
from cryo.exitcodes import UsageError
from cryo.model import SERVICE_NAME, SIGNING_NAME, boto3_session
from cryo.storage import wire
from cryo.storage.api import (
    JOB_COMPLETED,
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

DEFAULT_REGION = "us-east-1"
JOB_API_PREFIX = "/cryo/v1/jobs"


def _translate(exc: BaseException) -> CryoError:
    """The cryo exception for a botocore failure."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "") or code)
        cls = MODELED.get(code)
        if cls is DataAlreadyExistsException:
            return DataAlreadyExistsException(
                message,
                exc.response.get("Checksum") or err.get("Checksum"),  # type: ignore[arg-type]
                exc.response.get("ChecksumAlgorithm") or err.get("ChecksumAlgorithm"),  # type: ignore[arg-type]
            )
        if cls is not None:
            return cls(message)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status in (403, 401):
            return AccessDeniedException(message)
        return ServiceInternalException(f"unexpected error {code or status}: {message}")
    if isinstance(exc, bx.ParamValidationError):
        # botocore checks the model's constraints before sending; same error as the server's.
        return IllegalArgumentException(str(exc.kwargs.get("report") or exc))
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AccessDeniedException(f"no usable AWS credentials: {exc}")
    if isinstance(
        exc,
        bx.EndpointConnectionError
        | bx.ConnectionClosedError
        | bx.ReadTimeoutError
        | bx.ConnectTimeoutError
        | bx.ProxyConnectionError
        | bx.HTTPClientError,
    ):
        return EndpointUnreachable(str(exc))
    if isinstance(exc, bx.BotoCoreError):
        return ServiceInternalException(str(exc))
    raise exc


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - (raises for a port that is not a number from 0 to 65535)
    except ValueError:  # (that, or an unclosed IPv6 bracket)
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@contextmanager
def _translated() -> Iterator[None]:
    from botocore import exceptions as bx

    try:
        yield
    except (bx.ClientError, bx.BotoCoreError) as exc:
        raise _translate(exc) from None


class RemoteBackend:
    """The storage interface against a Backup Storage endpoint URL."""

    def __init__(
        self,
        endpoint_url: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        max_connections: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        session: Any = None,
    ) -> None:
        """``session``: a boto3 session to share (its credentials win over the others).

        Raises UsageError for an endpoint that is not an http(s) URL, or a
        profile that does not exist.
        """
        from botocore import exceptions as bx
        from botocore.config import Config

        if not _is_http_url(endpoint_url):
            raise UsageError(f"endpoint URL {endpoint_url!r} is not an http:// or https:// URL")
        self.endpoint_url = endpoint_url.rstrip("/")
        try:
            session = session or boto3_session(
                profile_name=profile,
                aws_access_key_id=aws_access_key_id,
                aws_secret_access_key=aws_secret_access_key,
                aws_session_token=aws_session_token,
            )
        except bx.ProfileNotFound as exc:
            raise UsageError(
                f"no AWS profile {exc.kwargs.get('profile')!r} in the AWS config or "
                "credentials file"
            ) from None
        self.region = region or session.region_name or DEFAULT_REGION
        self._session = session
        config = Config(
            region_name=self.region,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tcp_keepalive=True,
        )
        factory: Any = session.client  # the stubs know only the services botocore ships
        self.client: Any = factory(SERVICE_NAME, endpoint_url=self.endpoint_url, config=config)
        self._http: Any = None
        self._max_connections = max_connections
        self._timeouts = (connect_timeout, read_timeout)

    def before_fork(self) -> None:
        """Nothing to do: a forked process never uses this client's connections."""

    def reopen(self) -> RemoteBackend:
        """The same endpoint and credentials over new connections (e.g. in a forked process).

        The session, and the models it has loaded, are shared; nothing the
        original holds open is used.
        """
        connect, read = self._timeouts
        return RemoteBackend(
            self.endpoint_url, region=self.region, session=self._session,
            max_connections=self._max_connections, connect_timeout=connect, read_timeout=read,
        )  # fmt: skip

    def close(self) -> None:
        with _ignore_errors():
            self.client.close()
        if self._http is not None:
            with _ignore_errors():
                self._http.close()

    # -- backup side -------------------------------------------------------
    def start_object(
        self, backup_job_id: str, object_name: str, throw_on_duplicate: bool = False
    ) -> str:
        with _translated():
            r = self.client.start_object(
                BackupJobId=backup_job_id,
                ObjectName=object_name,
                ThrowOnDuplicate=throw_on_duplicate,
            )
        return str(r["UploadId"])

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
        with _translated():
            r = self.client.put_chunk(
                BackupJobId=backup_job_id,
                UploadId=upload_id,
                ChunkIndex=chunk_index,
                Data=data,
                Length=length,
                Checksum=checksum,
                ChecksumAlgorithm=checksum_algorithm,
            )
        return PutChunkResult(r["ChunkChecksum"], r["ChunkChecksumAlgorithm"])

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
        kwargs: dict[str, Any] = {
            "BackupJobId": backup_job_id,
            "UploadId": upload_id,
            "ObjectChecksum": object_checksum,
            "ObjectChecksumAlgorithm": object_checksum_algorithm,
        }
        _maybe(kwargs, "MetadataString", metadata_string)
        _maybe(kwargs, "MetadataBlob", metadata_blob)
        _maybe(kwargs, "MetadataBlobLength", metadata_blob_length)
        _maybe(kwargs, "MetadataBlobChecksum", metadata_blob_checksum)
        _maybe(kwargs, "MetadataBlobChecksumAlgorithm", metadata_blob_checksum_algorithm)
        with _translated():
            r = self.client.notify_object_complete(**kwargs)
        return ObjectChecksum(r["ObjectChecksum"], r["ObjectChecksumAlgorithm"])

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
        kwargs: dict[str, Any] = {
            "BackupJobId": backup_job_id,
            "ObjectName": object_name,
            "InlineChunk": inline_chunk,
            "InlineChunkLength": inline_chunk_length,
            "InlineChunkChecksum": inline_chunk_checksum,
            "InlineChunkChecksumAlgorithm": inline_chunk_checksum_algorithm,
            "ThrowOnDuplicate": throw_on_duplicate,
        }
        _maybe(kwargs, "ObjectChecksum", object_checksum)
        _maybe(kwargs, "ObjectChecksumAlgorithm", object_checksum_algorithm)
        _maybe(kwargs, "MetadataString", metadata_string)
        with _translated():
            r = self.client.put_object(**kwargs)
        return PutObjectResult(
            r["InlineChunkChecksum"],
            r["InlineChunkChecksumAlgorithm"],
            r["ObjectChecksum"],
            r["ObjectChecksumAlgorithm"],
        )

    def delete_object(self, backup_job_id: str, object_name: str) -> None:
        with _translated():
            self.client.delete_object(BackupJobId=backup_job_id, ObjectName=object_name)

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
        kwargs: dict[str, Any] = {"StorageJobId": storage_job_id}
        _maybe(kwargs, "StartingObjectName", starting_object_name)
        _maybe(kwargs, "StartingObjectPrefix", starting_object_prefix)
        _maybe(kwargs, "MaxResults", max_results)
        _maybe(kwargs, "NextToken", next_token)
        _maybe(kwargs, "CreatedBefore", created_before)
        _maybe(kwargs, "CreatedAfter", created_after)
        with _translated():
            r = self.client.list_objects(**kwargs)
        objects = tuple(
            BackupObject(
                o["Name"],
                int(o.get("ChunksCount", 0)),
                o.get("MetadataString"),
                o["ObjectChecksum"],
                o["ObjectChecksumAlgorithm"],
                o["ObjectToken"],
            )
            for o in r.get("ObjectList", [])
        )
        return ObjectPage(objects, r.get("NextToken"))

    def list_chunks(
        self,
        storage_job_id: str,
        object_token: str,
        max_results: int | None = None,
        next_token: str | None = None,
    ) -> ChunkPage:
        kwargs: dict[str, Any] = {"StorageJobId": storage_job_id, "ObjectToken": object_token}
        _maybe(kwargs, "MaxResults", max_results)
        _maybe(kwargs, "NextToken", next_token)
        with _translated():
            r = self.client.list_chunks(**kwargs)
        chunks = tuple(
            Chunk(c["Index"], c["Length"], c["Checksum"], c["ChecksumAlgorithm"], c["ChunkToken"])
            for c in r.get("ChunkList", [])
        )
        return ChunkPage(chunks, r.get("NextToken"))

    def get_chunk(self, storage_job_id: str, chunk_token: str) -> ChunkData:
        with _translated():
            r = self.client.get_chunk(StorageJobId=storage_job_id, ChunkToken=chunk_token)
            body = r["Data"]
            try:
                data = body.read()
            finally:
                body.close()
        return ChunkData(data, int(r["Length"]), r["Checksum"], r["ChecksumAlgorithm"])

    def get_object_metadata(self, storage_job_id: str, object_token: str) -> ObjectMetadata:
        with _translated():
            r = self.client.get_object_metadata(
                StorageJobId=storage_job_id, ObjectToken=object_token
            )
            body = r.get("MetadataBlob")
            blob = b""
            if body is not None:
                try:
                    blob = body.read()
                finally:
                    body.close()
        return ObjectMetadata(
            _header_text(r.get("MetadataString")),
            blob,
            int(r.get("MetadataBlobLength") or 0),
            r.get("MetadataBlobChecksum"),
            r.get("MetadataBlobChecksumAlgorithm"),
        )

    # -- job control (cryo's JSON API) -------------------------------------
    def _job_api(
        self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None
    ) -> Any:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.httpsession import URLLib3Session

        credentials = self._session.get_credentials()
        if credentials is None:
            raise AccessDeniedException("no usable AWS credentials")
        url = self.endpoint_url + path
        if query:
            # Encoded as SigV4 canonicalises a query (RFC 3986 unreserved characters bare).
            url += "?" + urlencode(dict(query), safe="-_.~", quote_via=quote)
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        request = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(credentials.get_frozen_credentials(), SIGNING_NAME, self.region).add_auth(request)
        if self._http is None:
            # As the boto3 client's: without TCP_NODELAY, a body sent after its headers
            # waits for the server's delayed acknowledgement (40 ms a request).
            options: Any = [  # (the stubs say list[str]; urllib3 takes setsockopt triples)
                (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            ]
            self._http = URLLib3Session(
                timeout=self._timeouts,  # type: ignore[arg-type]  # urllib3 takes (connect, read)
                max_pool_connections=self._max_connections,
                socket_options=options,
            )
        from botocore import exceptions as bx

        try:
            response = self._http.send(request.prepare())
        except (bx.HTTPClientError, bx.ConnectionError) as exc:
            raise EndpointUnreachable(str(exc)) from None
        payload = response.content
        if response.status_code >= 300:
            raise _job_api_error(response.status_code, response.headers, payload)
        return json.loads(payload) if payload else None

    def create_job(
        self,
        client_token: str | None = None,
        base_job_id: str | None = None,
        pool_id: str | None = None,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        body = wire.drop_none(
            {
                "ClientToken": client_token,
                "BaseJobId": base_job_id,
                "PoolId": pool_id,
                "Attributes": dict(attributes) if attributes is not None else None,
            }
        )
        return wire.job_from_json(self._job_api("POST", JOB_API_PREFIX, body=body))

    def complete_job(
        self,
        job_id: str,
        status: str = JOB_COMPLETED,
        attributes: Mapping[str, object] | None = None,
    ) -> Job:
        body = wire.drop_none(
            {
                "Status": status,
                "Attributes": dict(attributes) if attributes is not None else None,
            }
        )
        path = f"{JOB_API_PREFIX}/{quote(job_id, safe='')}/complete"
        return wire.job_from_json(self._job_api("POST", path, body=body))

    def describe_job(self, job_id: str) -> Job:
        path = f"{JOB_API_PREFIX}/{quote(job_id, safe='')}"
        return wire.job_from_json(self._job_api("GET", path))

    def list_jobs(
        self, marker: str | None = None, limit: int | None = None, pool_id: str | None = None
    ) -> JobPage:
        query = wire.drop_none(
            {
                "marker": marker,
                "limit": str(limit) if limit is not None else None,
                "pool-id": pool_id,
            }
        )
        r = self._job_api("GET", JOB_API_PREFIX, query=query)
        return JobPage(tuple(wire.job_from_json(j) for j in r["Jobs"]), r.get("NextMarker"))

    def delete_job(self, job_id: str) -> None:
        self._job_api("DELETE", f"{JOB_API_PREFIX}/{quote(job_id, safe='')}")


def _job_api_error(status: int, headers: Mapping[str, str], payload: bytes) -> StorageError:
    code = headers.get("x-amzn-ErrorType", "").split(":")[0]
    try:
        message = str(json.loads(payload).get("Message", ""))
    except (ValueError, AttributeError):
        message = payload.decode("utf-8", "replace")[:200]
    cls = MODELED.get(code)
    if cls is None:
        return ServiceInternalException(f"unexpected HTTP {status} from the job API: {message}")
    return cls(message)


def _header_text(value: str | None) -> str | None:
    """A header value as sent: HTTP clients decode header bytes as Latin-1, the server
    sends UTF-8 (a MetadataString may hold any character but a line break)."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _maybe(kwargs: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        kwargs[key] = value


@contextmanager
def _ignore_errors() -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - closing connections must never mask the real outcome
        return
