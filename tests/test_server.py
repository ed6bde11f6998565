"""``cryo server`` as its clients see it: a real server process on 127.0.0.1, real
boto3 and the AWS CLI, signed requests made by hand where a client would refuse
to send them.

The storage semantics themselves are covered by the conformance suite, which
runs against a ``cryo server`` too (``remote`` kind of the ``backend`` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from cryo.checksums import chunk_checksum, summary_checksum
from cryo.errors import AccessDeniedException, ThrottlingException
from cryo.model import DATA_PATH, boto3_session

from .server_helpers import (
    REGION,
    ServerProcess,
    connect,
    raw_exchange,
    read_response,
    request_head,
    send,
    signed_headers,
)
from .storage_helpers import all_objects, contents, put_small

Key = tuple[str, str]


def q(value: str) -> str:
    """A query or path component encoded as botocore encodes it."""
    return quote(value, safe="-_.~")


def boto_client(server: ServerProcess, key: Key) -> Any:
    from botocore.config import Config

    session = boto3_session(aws_access_key_id=key[0], aws_secret_access_key=key[1])
    factory: Any = session.client
    return factory(
        "backupstorage",
        endpoint_url=server.url,
        region_name=REGION,
        config=Config(retries={"total_max_attempts": 1}),
    )


@pytest.fixture
def owned_job(cryo_server: ServerProcess) -> Iterator[tuple[Key, str]]:
    key = cryo_server.new_key()
    backend = cryo_server.client(key)
    job = backend.create_job().job_id
    put_small(backend, job, "a", b"a")
    backend.close()
    yield key, job


def list_target(job: str, query: str = "") -> str:
    return f"/restore-jobs/{job}/objects/list" + (f"?{query}" if query else "")


def put_object_target(job: str, name: str, data: bytes) -> str:
    return (
        f"/backup-jobs/{job}/object/{q(name)}/put-object?checksum={q(chunk_checksum(data))}"
        f"&checksum-algorithm=SHA256&length={len(data)}"
    )


# -- an independent client: the AWS CLI -------------------------------------------------


def test_aws_cli_puts_lists_and_gets_a_chunk_back(
    cryo_server: ServerProcess, tmp_path: Path
) -> None:
    key = cryo_server.new_key()
    job = cryo_server.client(key).create_job().job_id
    data = os.urandom(300_000)
    src = tmp_path / "chunk.bin"
    src.write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CRYO_"))}
    env.update(
        {
            "AWS_DATA_PATH": str(DATA_PATH),
            "AWS_ACCESS_KEY_ID": key[0],
            "AWS_SECRET_ACCESS_KEY": key[1],
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )

    def aws(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "awscli", "backupstorage", *args,
             "--endpoint-url", cryo_server.url, "--region", REGION, "--output", "json"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def ok(*args: str) -> Any:
        r = aws(*args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if r.stdout.strip() else None

    name = "dir/a file+plus%.bin"
    put = ok(
        "put-object", "--backup-job-id", job, "--object-name", name,
        "--inline-chunk", str(src), "--inline-chunk-length", str(len(data)),
        "--inline-chunk-checksum", chunk_checksum(data),
        "--inline-chunk-checksum-algorithm", "SHA256", "--metadata-string", "from the CLI",
    )  # fmt: skip
    assert put["ObjectChecksum"] == summary_checksum([chunk_checksum(data)])
    listed = ok("list-objects", "--storage-job-id", job)["ObjectList"]
    assert [(o["Name"], o["MetadataString"]) for o in listed] == [(name, "from the CLI")]
    chunks = ok("list-chunks", "--storage-job-id", job, "--object-token", listed[0]["ObjectToken"])
    [chunk] = chunks["ChunkList"]
    assert (chunk["Index"], chunk["Length"]) == (0, len(data))
    out = tmp_path / "out.bin"
    got = ok("get-chunk", "--storage-job-id", job, "--chunk-token", chunk["ChunkToken"], str(out))
    assert out.read_bytes() == data
    assert (got["Checksum"], got["Length"]) == (chunk_checksum(data), len(data))
    # What the CLI wrote, cryo reads (and the other way round).
    assert contents(cryo_server.client(key), job) == {name: data}
    # Errors reach the CLI as the model's exceptions, with the server's message.
    r = aws("get-chunk", "--storage-job-id", job, "--chunk-token", "c0.0", str(tmp_path / "x"))
    assert r.returncode != 0
    assert "(ResourceNotFoundException)" in r.stderr and "c0.0" in r.stderr


# -- authentication --------------------------------------------------------------------


def test_a_correctly_signed_hand_made_request_is_accepted(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    target = list_target(job, "max-results=5")
    r = send(cryo_server.url, "GET", target, signed_headers(cryo_server.url, "GET", target, key))
    assert r.status == 200, r.body
    assert [o["Name"] for o in r.json()["ObjectList"]] == ["a"]


def assert_denied(r: Any, *words: str) -> None:
    assert r.status == 403, r.body
    assert r.error_type == "AccessDeniedException"
    message = r.json()["Message"]
    for word in words:
        assert word in message, message


def test_missing_signature_is_refused(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    _, job = owned_job
    assert_denied(send(cryo_server.url, "GET", list_target(job), {}), "not signed")
    # The job API too.
    assert_denied(send(cryo_server.url, "GET", "/cryo/v1/jobs", {}), "not signed")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda a: "Bearer " + a,
        lambda a: a.replace("Credential=", "Credentials="),
        lambda a: a.split(", SignedHeaders")[0],
        lambda a: a.replace("/aws4_request", "/aws5_request"),
        lambda a: a[:-64] + "not-hex" * 8,
        lambda a: a.replace("SignedHeaders=", "SignedHeaders=content-type;"),
    ],
    ids=["scheme", "field-name", "truncated", "terminator", "signature", "absent-header"],
)
def test_malformed_authorization_is_refused(
    cryo_server: ServerProcess, owned_job: tuple[Key, str], mangle: Callable[[str], str]
) -> None:
    key, job = owned_job
    headers = signed_headers(cryo_server.url, "GET", list_target(job), key)
    headers["Authorization"] = mangle(headers["Authorization"])
    assert_denied(send(cryo_server.url, "GET", list_target(job), headers))


def test_unknown_key_and_wrong_secret_raise_the_modeled_exception(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    unknown = boto_client(cryo_server, ("AKNOSUCHKEY0000", "whatever"))
    with pytest.raises(unknown.exceptions.AccessDeniedException, match="unknown access key"):
        unknown.list_objects(StorageJobId=job)
    wrong = boto_client(cryo_server, (key[0], key[1] + "x"))
    with pytest.raises(wrong.exceptions.AccessDeniedException, match="signature does not match"):
        wrong.list_objects(StorageJobId=job)
    # Through cryo's own client: the same refusal, as cryo's exception.
    with pytest.raises(AccessDeniedException, match="signature"):
        cryo_server.client((key[0], "not-the-secret")).list_jobs()


def test_a_request_changed_after_signing_is_refused(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    headers = signed_headers(cryo_server.url, "GET", list_target(job, "max-results=5"), key)
    assert_denied(send(cryo_server.url, "GET", list_target(job, "max-results=6"), headers))
    other = cryo_server.client(key).create_job().job_id
    assert_denied(send(cryo_server.url, "GET", list_target(other, "max-results=5"), headers))


@pytest.mark.parametrize("minutes", [-16, 16])
def test_clock_skew_over_15_minutes_is_refused(
    cryo_server: ServerProcess, owned_job: tuple[Key, str], minutes: int
) -> None:
    key, job = owned_job
    target = list_target(job)
    skewed = datetime.now(UTC) + timedelta(minutes=minutes)
    headers = signed_headers(cryo_server.url, "GET", target, key, when=skewed)
    assert_denied(send(cryo_server.url, "GET", target, headers), "clock")
    near = datetime.now(UTC) + timedelta(minutes=14 if minutes > 0 else -14)
    headers = signed_headers(cryo_server.url, "GET", target, key, when=near)
    assert send(cryo_server.url, "GET", target, headers).status == 200


@pytest.mark.parametrize(
    ("scope", "word"), [({"region": "eu-west-1"}, "region"), ({"service": "s3"}, "service")]
)
def test_scope_must_name_this_region_and_service(
    cryo_server: ServerProcess, owned_job: tuple[Key, str], scope: dict[str, str], word: str
) -> None:
    key, job = owned_job
    headers = signed_headers(cryo_server.url, "GET", list_target(job), key, **scope)  # type: ignore[arg-type]
    assert_denied(send(cryo_server.url, "GET", list_target(job), headers), word)


def test_unsigned_payload_only_where_the_model_allows_it(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    target = list_target(job)
    headers = signed_headers(cryo_server.url, "GET", target, key, payload="UNSIGNED-PAYLOAD")
    assert_denied(send(cryo_server.url, "GET", target, headers), "UNSIGNED-PAYLOAD")
    body = b'{"ClientToken": "t"}'
    headers = signed_headers(
        cryo_server.url, "POST", "/cryo/v1/jobs", key, body=body, payload="UNSIGNED-PAYLOAD"
    )
    assert_denied(send(cryo_server.url, "POST", "/cryo/v1/jobs", headers, body))
    data = b"unsigned payload"
    target = put_object_target(job, "u", data)
    headers = signed_headers(
        cryo_server.url, "PUT", target, key, body=data, payload="UNSIGNED-PAYLOAD"
    )
    assert send(cryo_server.url, "PUT", target, headers, data).status == 200


def test_signed_bodies_are_checked(cryo_server: ServerProcess, owned_job: tuple[Key, str]) -> None:
    key, job = owned_job
    url = cryo_server.url
    # A JSON body is hashed by the server: another body of the same size is refused.
    target = f"/backup-jobs/{job}/object/n"
    signed = b'{"ThrowOnDuplicate":false}'
    headers = signed_headers(url, "PUT", target, key, body=signed)
    assert_denied(send(url, "PUT", target, headers, b'{"ThrowOnDuplicate":true!}'))
    assert send(url, "PUT", target, headers, signed).status == 200
    # A payload signed with its SHA-256 in X-Amz-Content-SHA256 must be that payload...
    data = os.urandom(50_000)
    target = put_object_target(job, "hashed", data)
    forged = bytes([data[0] ^ 1]) + data[1:]
    headers = signed_headers(url, "PUT", target, key, payload=_sha256(data))
    assert_denied(send(url, "PUT", target, headers, forged), "X-Amz-Content-SHA256")
    assert send(url, "PUT", target, headers, data).status == 200
    # ...and without that header the server hashes the payload itself.
    target = put_object_target(job, "hashed-by-server", data)
    headers = signed_headers(url, "PUT", target, key, body=data)
    assert "X-Amz-Content-SHA256" not in headers
    assert send(url, "PUT", target, headers, data).status == 200
    backend = cryo_server.client(key)
    assert {n: v for n, v in contents(backend, job).items() if n.startswith("hashed")} == {
        "hashed": data,
        "hashed-by-server": data,
    }


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_removed_key_is_refused_without_a_restart(cryo_server: ServerProcess) -> None:
    key = cryo_server.new_key()
    backend = cryo_server.client(key)
    backend.list_jobs()
    cryo_server.revoke(key[0])
    time.sleep(1.2)
    with pytest.raises(AccessDeniedException, match="unknown access key"):
        backend.list_jobs()


def test_keys_from_the_environment(tmp_path: Path) -> None:
    key = ("AKFROMENV", "env-secret-value")
    server = ServerProcess(
        tmp_path,
        env={"CRYO_SERVER_ACCESS_KEY_ID": key[0], "CRYO_SERVER_SECRET_ACCESS_KEY": key[1]},
        credentials_file=False,
    )
    try:
        backend = server.client(key)
        job = backend.create_job().job_id
        assert [j.job_id for j in backend.list_jobs().jobs] == [job]
        with pytest.raises(AccessDeniedException):
            server.client(server.first_key).list_jobs()  # in a file this server does not read
    finally:
        assert server.stop() == 0


def test_jobs_belong_to_the_key_that_created_them(cryo_server: ServerProcess) -> None:
    alice = cryo_server.client()
    bob = cryo_server.client()
    job = alice.create_job(client_token="nightly").job_id
    put_small(alice, job, "private", b"alice's data")
    [obj] = all_objects(alice, job)
    chunk = alice.list_chunks(job, obj.object_token).chunks[0]
    attempts: list[Callable[[], object]] = [
        lambda: bob.describe_job(job),
        lambda: bob.list_objects(job),
        lambda: bob.list_chunks(job, obj.object_token),
        lambda: bob.get_chunk(job, chunk.chunk_token),
        lambda: bob.get_object_metadata(job, obj.object_token),
        lambda: bob.start_object(job, "intruder"),
        lambda: put_small(bob, job, "intruder", b"x"),
        lambda: bob.delete_object(job, "private"),
        lambda: bob.complete_job(job),
        lambda: bob.delete_job(job),
    ]
    for attempt in attempts:
        with pytest.raises(AccessDeniedException, match="another principal"):
            attempt()
    alice.complete_job(job)
    with pytest.raises(AccessDeniedException):
        bob.create_job(base_job_id=job)
    assert job not in {j.job_id for j in bob.list_jobs().jobs}
    assert bob.create_job(client_token="nightly").job_id != job
    assert contents(alice, job) == {"private": b"alice's data"}
    assert alice.describe_job(job).status == "COMPLETED"


def test_secrets_never_reach_the_log(cryo_server: ServerProcess) -> None:
    cryo_server.client((cryo_server.first_key[0], "wrong")).close()
    with pytest.raises(AccessDeniedException):
        cryo_server.client((cryo_server.first_key[0], "wrong-secret")).list_jobs()
    log = cryo_server.log()
    assert "AccessDeniedException" in log
    for secret in cryo_server.secrets():
        assert secret not in log


# -- routing, decoding, errors -------------------------------------------------------------


def test_query_values_keep_plus_and_percent(cryo_server: ServerProcess) -> None:
    backend = cryo_server.client()
    job = backend.create_job().job_id
    meta = "a+b c%20d&e=f"
    put_small(backend, job, "o", b"x", metadata_string=meta)
    [obj] = all_objects(backend, job)
    assert obj.metadata_string == meta
    assert backend.get_object_metadata(job, obj.object_token).metadata_string == meta


def test_unicode_metadata_string_survives_the_header(cryo_server: ServerProcess) -> None:
    backend = cryo_server.client()
    job = backend.create_job().job_id
    meta = "naïve 日本語 ✓"
    put_small(backend, job, "o", b"x", metadata_string=meta)
    [obj] = all_objects(backend, job)
    assert backend.get_object_metadata(job, obj.object_token).metadata_string == meta


def test_modeled_exceptions_carry_the_servers_message(cryo_server: ServerProcess) -> None:
    key = cryo_server.new_key()
    client = boto_client(cryo_server, key)
    backend = cryo_server.client(key)
    job = backend.create_job().job_id
    put_small(backend, job, "dup", b"one")
    with pytest.raises(client.exceptions.DataAlreadyExistsException) as info:
        client.start_object(BackupJobId=job, ObjectName="dup", ThrowOnDuplicate=True)
    assert info.value.response["Checksum"] == summary_checksum([chunk_checksum(b"one")])
    assert info.value.response["ChecksumAlgorithm"] == "SUMMARY"
    assert "already exists" in info.value.response["Error"]["Message"]
    with pytest.raises(client.exceptions.ResourceNotFoundException, match="no-such-job"):
        client.list_objects(StorageJobId="no-such-job")
    with pytest.raises(client.exceptions.IllegalArgumentException, match="NextToken"):
        client.list_objects(StorageJobId=job, NextToken="garbage!")


def test_bad_input_gets_a_modeled_error_never_a_500(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    upload = cryo_server.client(key).start_object(job, "pending")
    x = chunk_checksum(b"x")
    unsigned = "UNSIGNED-PAYLOAD"
    cases: list[tuple[str, str, bytes, str | None, int, str]] = [
        ("PUT", f"/backup-jobs/{job}/object/%FF%FE", b"", None, 400, "ObjectName"),
        ("PUT", f"/backup-jobs/{job}/object/n", b"not json", None, 400, "JSON"),
        ("PUT", f"/backup-jobs/{job}/object/n", b'{"ThrowOnDuplicate": "yes"}', None, 400,
         "ThrowOnDuplicate"),
        ("PUT", f"/backup-jobs/{job}/chunk/{upload}/first?length=1&checksum={q(x)}"
         "&checksum-algorithm=SHA256", b"x", unsigned, 400, "ChunkIndex"),
        ("PUT", f"/backup-jobs/{job}/chunk/{upload}/0?checksum={q(x)}&checksum-algorithm=SHA256",
         b"x", unsigned, 400, "Length"),
        ("PUT", f"/backup-jobs/{job}/chunk/{upload}/0?length=1&length=2&checksum={q(x)}"
         "&checksum-algorithm=SHA256", b"x", unsigned, 400, "length"),
        ("PUT", f"/backup-jobs/{job}/chunk/{upload}/0?length=99999999999&checksum={q(x)}"
         "&checksum-algorithm=SHA256", b"x", unsigned, 400, "Length"),
        ("PUT", f"/backup-jobs/{job}/object/{upload}/complete?checksum=abc", b"", unsigned, 400,
         "ObjectChecksumAlgorithm"),
        ("PUT", f"/backup-jobs/{job}/object/n/put-object?checksum={q(x)}", b"x", unsigned, 400,
         "InlineChunkLength"),
        ("PUT", f"/backup-jobs/{job}/object/n/put-object?length=1&checksum={q(x)}"
         "&throwOnDuplicate=maybe", b"x", unsigned, 400, "ThrowOnDuplicate"),
        ("GET", list_target(job, "max-results=ten"), b"", None, 400, "MaxResults"),
        ("GET", list_target(job, "created-after=yesterday"), b"", None, 400, "CreatedAfter"),
        ("GET", f"/restore-jobs/{job}/chunk/%C0%AF", b"", None, 400, "ChunkToken"),
        ("GET", "/no/such/operation", b"", None, 404, "no operation"),
        ("POST", f"/restore-jobs/{job}/objects/list", b"", None, 404, "no operation"),
        ("POST", "/cryo/v1/jobs", b'{"Bogus": 1}', None, 400, "Bogus"),
        ("POST", "/cryo/v1/jobs", b"[1, 2]", None, 400, "JSON object"),
        ("POST", "/cryo/v1/jobs", b'{"Attributes": [1]}', None, 400, "Attributes"),
        ("POST", f"/cryo/v1/jobs/{job}/complete", b'{"Status": 7}', None, 400, "Status"),
        ("GET", "/cryo/v1/jobs?limit=many", b"", None, 400, "Limit"),
        ("POST", "/cryo/v1/jobs", b"x" * (2 * 1024 * 1024), None, 400, "larger"),
    ]  # fmt: skip
    for method, target, body, payload, status, word in cases:
        headers = signed_headers(cryo_server.url, method, target, key, body=body, payload=payload)
        r = send(cryo_server.url, method, target, headers, body)
        assert r.status == status, (target, r.status, r.body)
        assert r.error_type in ("IllegalArgumentException", "ResourceNotFoundException")
        assert word in r.json()["Message"], (target, r.json())
    # The connection-level checks come before authentication.
    for raw in [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n",
    ]:
        r = raw_exchange(cryo_server.url, raw)
        assert r.status == 400 and r.error_type == "IllegalArgumentException", r.body
        assert r.json()["Message"]
    assert "Traceback" not in cryo_server.log()


def test_object_named_like_a_route_is_an_object(
    cryo_server: ServerProcess, owned_job: tuple[Key, str]
) -> None:
    key, job = owned_job
    backend = cryo_server.client(key)
    for name in ["complete", "x/complete", "put-object", "x/put-object", "..", "."]:
        put_small(backend, job, name, name.encode())
    names = {o.name for o in all_objects(backend, job)}
    assert {"complete", "x/complete", "put-object", "x/put-object", "..", "."} <= names


def test_chunked_request_body(cryo_server: ServerProcess, owned_job: tuple[Key, str]) -> None:
    key, job = owned_job
    backend = cryo_server.client(key)
    upload = backend.start_object(job, "chunked")
    data = os.urandom(200_000)
    target = (
        f"/backup-jobs/{job}/chunk/{upload}/0?checksum={q(chunk_checksum(data))}"
        f"&checksum-algorithm=SHA256&length={len(data)}"
    )
    headers = signed_headers(cryo_server.url, "PUT", target, key, payload="UNSIGNED-PAYLOAD")
    lines = [f"PUT {target} HTTP/1.1", f"Host: {cryo_server.url.removeprefix('http://')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + ["Transfer-Encoding: chunked"]
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + 65_000]), data[i : i + 65_000])
        for i in range(0, len(data), 65_000)
    )
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body + b"0\r\n\r\n"
    r = raw_exchange(cryo_server.url, request)
    assert r.status == 200, r.body
    backend.notify_object_complete(job, upload, summary_checksum([chunk_checksum(data)]))
    assert contents(backend, job)["chunked"] == data


# -- throttling, memory, shutdown, logging --------------------------------------------


def test_too_many_requests_per_key_is_throttled(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--max-requests-per-key", "1")
    try:
        key = server.first_key
        backend = server.client(key)
        job = backend.create_job().job_id
        upload = backend.start_object(job, "slow")
        data = os.urandom(100_000)
        target = (
            f"/backup-jobs/{job}/chunk/{upload}/0?checksum={q(chunk_checksum(data))}"
            f"&checksum-algorithm=SHA256&length={len(data)}"
        )
        headers = signed_headers(server.url, "PUT", target, key, payload="UNSIGNED-PAYLOAD")
        client = boto_client(server, key)
        with connect(server.url) as slow:
            slow.sendall(request_head(server.url, "PUT", target, headers, len(data)) + data[:10])
            deadline = time.monotonic() + 10
            while True:  # until the server holds the slow request
                try:
                    client.list_objects(StorageJobId=job)
                except client.exceptions.ThrottlingException as exc:
                    assert "requests in progress" in exc.response["Error"]["Message"]
                    break
                assert time.monotonic() < deadline, "the slow request was never admitted"
                time.sleep(0.05)
            with pytest.raises(ThrottlingException):
                backend.list_jobs()
            slow.sendall(data[10:])
            assert read_response(slow).status == 200
        other = server.client()  # another key is not held back
        other.list_jobs()
        backend.list_jobs()
    finally:
        assert server.stop() == 0


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_memory_stays_flat_with_many_concurrent_8mib_uploads(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--max-requests-per-key", "0")
    try:
        n, size = 32, 8 * 1024 * 1024
        backend = server.client(server.first_key, max_connections=n)
        job = backend.create_job().job_id
        base = os.urandom(size)

        def chunk(i: int) -> bytes:
            return i.to_bytes(8, "big") + base[8:]

        def put(i: int) -> None:
            data = chunk(i)
            upload = backend.start_object(job, f"o{i}")
            backend.put_chunk(job, upload, 0, data, size, chunk_checksum(data))

        for i in range(4):  # warm up: code paths, catalog, allocator
            put(1000 + i)
        before = _peak_rss(server.process.pid)
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(put, range(n)))
        grown = _peak_rss(server.process.pid) - before
        # 256 MiB were in flight at once; a server holding bodies would grow by that much.
        assert grown < 80 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        assert server.stop() == 0


def test_sigterm_lets_requests_in_progress_finish_then_exits_0(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    key = server.first_key
    backend = server.client(key)
    job = backend.create_job().job_id
    put_small(backend, job, "before", b"before")
    backend.close()
    data = os.urandom(3_000_000)
    finishing = put_object_target(job, "in-flight", data)
    abandoned = put_object_target(job, "abandoned", data)

    def head(target: str) -> bytes:
        headers = signed_headers(server.url, "PUT", target, key, payload="UNSIGNED-PAYLOAD")
        return request_head(server.url, "PUT", target, headers, len(data))

    idle = connect(server.url)  # a keep-alive connection with nothing to do
    listing = list_target(job)
    idle.sendall(
        request_head(server.url, "GET", listing, signed_headers(server.url, "GET", listing, key), 0)
    )
    assert read_response(idle).status == 200
    with connect(server.url) as sock, connect(server.url) as quitter:
        sock.sendall(head(finishing) + data[:1_000_000])
        quitter.sendall(head(abandoned) + data[:1_000_000])
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the listening socket closes; new clients are refused
            try:
                connect(server.url).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert idle.recv(1) == b""  # idle connections are closed at once
        assert server.process.poll() is None  # still serving what is in progress
        quitter.close()  # this client gives up half way
        sock.sendall(data[1_000_000:])
        reply = read_response(sock)
    idle.close()
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert server.stop() == 0
    # On the same repository: the finished upload is there whole, the abandoned one is not.
    again = ServerProcess(tmp_path)
    try:
        assert contents(again.client(key), job) == {"before": b"before", "in-flight": data}
        assert list((tmp_path / "repo" / "tmp").iterdir()) == []
    finally:
        assert again.stop() == 0


def test_json_access_log(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--log-format", "json")
    try:
        backend = server.client(server.first_key)
        job = backend.create_job().job_id
        put_small(backend, job, "a", b"abc")
        with pytest.raises(Exception, match="does not exist"):
            backend.describe_job("no-such-job")
    finally:
        assert server.stop() == 0
    records = [json.loads(line) for line in server.log().splitlines()]
    requests = [r for r in records if r["event"] == "request"]
    put = next(r for r in requests if r["operation"] == "PutObject")
    assert put["job"] == job and put["status"] == 200 and put["key"] == server.first_key[0]
    assert put["bytes"] >= 3 and put["ms"] >= 0
    create = next(r for r in requests if r["operation"] == "CreateJob")
    assert create["job"] == job
    missing = next(r for r in requests if r["operation"] == "DescribeJob")
    assert missing["status"] == 404 and missing["error"] == "ResourceNotFoundException"
    assert {"listening", "stopping", "stopped"} <= {r["event"] for r in records}
    assert server.first_key[1] not in server.log()


# -- the command line ----------------------------------------------------------------------


def run_cryo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRYO_")}
    return subprocess.run(
        [sys.executable, "-m", "cryo", *args],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})},
    )  # fmt: skip


def test_public_address_needs_an_explicit_flag(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("AKX secret\n")
    r = run_cryo("server", "--repo", str(tmp_path / "r"), "--listen", "0.0.0.0:0",
                 "--credentials", str(creds))  # fmt: skip
    assert r.returncode == 2 and "--allow-public" in r.stderr
    r = run_cryo("server", "--repo", str(tmp_path / "r"), "--listen", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def test_server_without_keys_says_how_to_give_them(tmp_path: Path) -> None:
    r = run_cryo("server", "--repo", str(tmp_path / "r"), "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "--credentials" in r.stderr
    bad = tmp_path / "bad"
    bad.write_text("AKX only-one-field and-another extra\n")
    r = run_cryo("server", "--repo", str(tmp_path / "r"), "--listen", "127.0.0.1:0",
                 "--credentials", str(bad))  # fmt: skip
    assert r.returncode == 2 and "line 1" in r.stderr and "only-one-field" not in r.stderr


def _threads_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_bounded_workers_make_room_by_closing_idle_connections(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--max-connections", "2")
    try:
        key = server.first_key
        target = "/cryo/v1/jobs"

        def one_request(sock: Any) -> int:
            headers = signed_headers(server.url, "GET", target, key)
            sock.sendall(request_head(server.url, "GET", target, headers, 0))
            return read_response(sock).status

        idle = [connect(server.url), connect(server.url)]
        assert [one_request(s) for s in idle] == [200, 200]  # both workers now hold a connection
        started = time.monotonic()
        third = server.client(key)
        third.list_jobs()  # a third client is served at once...
        assert time.monotonic() - started < 5
        assert idle[0].recv(1) == b""  # ...by closing the connection idle the longest
        third.close()
        for s in idle:
            s.close()
        time.sleep(0.2)
        before = _threads_and_fds(server.process.pid)
        for _ in range(100):  # connections come and go; threads and descriptors do not pile up
            with connect(server.url) as sock:
                assert one_request(sock) == 200
        time.sleep(0.2)
        assert _threads_and_fds(server.process.pid) == before
    finally:
        assert server.stop() == 0
