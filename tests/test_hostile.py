"""Hostile and odd input: trees that fight back, crafted jobs, requests no honest client sends.

* **Backups** (the CLI on an embedded repository) of unreadable files and
  directories, files that vanish or grow while the backup runs, names that
  are not UTF-8 or hold line breaks, 255-byte names, paths deeper than
  PATH_MAX, symlink loops, a 10 GiB sparse file, FIFOs, sockets and devices,
  and a flat directory of 100,000 (``slow``: 1,000,000) empty files with
  peak memory measured. Every tree is restored and compared.
* **Restores** of jobs crafted to write outside the target (absolute paths,
  ``..``, symlinks and hard links leading out), in-process and through
  ``cryo server``: nothing outside the target changes.
* **Requests** to ``cryo server``: broken signatures, oversized and
  malformed parameters, bad tokens, bodies that do not match their length,
  requests that stop half way. Each gets the model's error (status and
  ``x-amzn-ErrorType``), never a 500; the server answers afterwards and logs
  no failure.

Changes "while read" are made deterministic: the trigger is the reader
opening the file scanned just before the victim, held (fanotify permission
event, where the kernel allows it) until the scanner has gone past the
victim, which it stats before moving on.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import select
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import xxhash

from cryo.checksums import chunk_checksum, summary_checksum
from cryo.manifest import Extent, ManifestEntry
from cryo.model import DATA_PATH
from cryo.restore import RestoreOptions, run_restore
from cryo.storage.local import LocalBackend

from .inotify import IN_ISDIR, Opened
from .server_helpers import (
    REGION,
    Response,
    ServerProcess,
    connect,
    raw_exchange,
    read_response,
    request_head,
    send,
    signed_headers,
)
from .storage_helpers import crafted_job, put_small
from .test_backup import (
    CLI,
    KiB,
    MiB,
    evict_from_page_cache,
    peak_rss_mib,
    without_read_override,
    xattrs_supported,
)

GiB = 1024 * MiB


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """``cryo ARGS`` in a child process: (exit status, stdout, stderr as text)."""
    r = subprocess.run(
        [*CLI, *args], capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def backup(src: Path, repo: Path, *extra: str, timeout: float = 300) -> tuple[int, str, str]:
    """``cryo backup SRC --repo REPO -q``: (exit status, JobId, stderr)."""
    code, out, err = cli("backup", str(src), "--repo", str(repo), "-q", *extra, timeout=timeout)
    assert code in (0, 3), err
    return code, out.strip(), err


def restore(job: str, repo: Path, target: Path) -> Path:
    """``cryo restore`` into ``target`` (returned), which must succeed."""
    code, _, err = cli("restore", job, "--repo", str(repo), "--to", str(target), "-q")
    assert code == 0, err
    return target


def inside(target: Path, src: Path) -> Path:
    """Where ``src`` (an absolute path that was backed up) is restored under ``target``."""
    return target / os.fsdecode(os.fsencode(src).lstrip(b"/"))


# -- comparing trees of any depth ---------------------------------------------------


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Every entry under ``root`` with what a restore must bring back; any depth.

    Walks with directory descriptors (``os.fwalk``), so paths longer than
    PATH_MAX are fine. Hard-linked files name the first path of their inode.
    """
    out: dict[bytes, tuple[object, ...]] = {}
    inodes: dict[int, bytes] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames, dirfd in os.fwalk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in sorted(dirnames + filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            info: tuple[object, ...] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
            info += (st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (*info, os.readlink(name, dir_fd=dirfd))
                continue
            info += (st.st_mtime_ns, _xattrs(dirfd, name))
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    info += ("link", inodes.setdefault(st.st_ino, rel))
                info += (st.st_size, _digest(dirfd, name))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info += (st.st_rdev,)
            out[rel] = info
    return out


def _xattrs(dirfd: int, name: bytes) -> tuple[tuple[str, bytes], ...]:
    path = b"/proc/self/fd/%d/%s" % (dirfd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
    except OSError:
        return ()


def _digest(dirfd: int, name: bytes) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        h = xxhash.xxh3_128()
        while data := os.read(fd, 4 * MiB):
            h.update(data)
        return str(h.hexdigest())
    finally:
        os.close(fd)


# -- server fixtures and checks -------------------------------------------------------

MODEL = json.loads((DATA_PATH / "backupstorage/2018-04-10/service-2.json").read_text())


def q(value: str) -> str:
    return quote(value, safe="-_.~")


class Hostile:
    """One ``cryo server`` (JSON log) for this module, with a job, an upload and tokens."""

    def __init__(self, workdir: Path) -> None:
        self.server = ServerProcess(workdir, "--log-format", "json")
        self.url = self.server.url
        self.key = self.server.first_key
        backend = self.server.client(self.key)
        self.job = backend.create_job().job_id
        for name in ("a", "b", "c", "d"):
            put_small(backend, self.job, name, name.encode() * 3)
        upload = backend.start_object(self.job, "multi")
        sums = []
        for i in range(3):
            data = b"chunk %d" % i
            sums.append(chunk_checksum(data))
            backend.put_chunk(self.job, upload, i, data, len(data), sums[-1])
        backend.notify_object_complete(self.job, upload, summary_checksum(sums))
        objects = backend.list_objects(self.job).objects
        self.object_token = next(o.object_token for o in objects if o.name == "multi")
        self.chunk_token = backend.list_chunks(self.job, self.object_token).chunks[0].chunk_token
        self.upload = backend.start_object(self.job, "pending")
        self.other_job = backend.create_job().job_id
        for name in ("zz-1", "zz-2", "zz-3"):
            put_small(backend, self.other_job, name, b"other job's data")
        backend.close()

    def headers(
        self, method: str, target: str, body: bytes = b"", payload: str | None = None
    ) -> dict[str, str]:
        return signed_headers(self.url, method, target, self.key, body=body, payload=payload)

    def signed(
        self, method: str, target: str, body: bytes = b"", payload: str | None = None
    ) -> Response:
        return send(self.url, method, target, self.headers(method, target, body, payload), body)

    def head(self, method: str, target: str, payload: str | None = None, *, length: int) -> bytes:
        """Request line and signed headers of a request whose body is sent separately."""
        return request_head(
            self.url, method, target, self.headers(method, target, payload=payload), length
        )

    def check_healthy(self) -> None:
        """The server still answers, and has logged no failure and no 500."""
        assert self.server.process.poll() is None, "cryo server exited"
        r = self.signed("GET", f"/restore-jobs/{self.job}/objects/list?max-results=2")
        assert r.status == 200, r.body
        log = self.server.log()
        assert "Traceback" not in log
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert [r for r in records if r["event"] == "error"] == []
        assert [r for r in records if (r.get("status") or 0) >= 500] == []


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    h = Hostile(tmp_path_factory.mktemp("hostile-server"))
    try:
        yield h
        h.check_healthy()  # after every request of the module
    finally:
        assert h.server.stop() == 0


def modeled(
    r: Response, status: int, error: str, word: str = "", operation: str | None = None
) -> None:
    """``r`` is the model's ``error`` with its status, a JSON message containing ``word``."""
    assert (r.status, r.error_type) == (status, error), (r.status, r.error_type, r.body[:300])
    assert MODEL["shapes"][error]["error"]["httpStatusCode"] == status
    assert 400 <= status < 500
    message = json.loads(r.body)["Message"]
    assert word in message, message
    if operation in MODEL["operations"] and error != "ResourceNotFoundException":
        # Unknown jobs and uploads are ResourceNotFoundException everywhere (docs/API.md).
        assert error in {e["shape"] for e in MODEL["operations"][operation]["errors"]}


# -- requests to cryo server: signatures -----------------------------------------------


def _auth_mangles() -> list[tuple[str, Callable[[str], str]]]:
    def scope(i: int, value: str) -> Callable[[str], str]:
        def mangle(a: str) -> str:
            head, _, rest = a.partition("Credential=")
            cred, _, tail = rest.partition(",")
            parts = cred.split("/")
            parts[i] = value
            return f"{head}Credential={'/'.join(parts)},{tail}"

        return mangle

    def header_list(value: str) -> Callable[[str], str]:
        def mangle(a: str) -> str:
            head, _, rest = a.partition("SignedHeaders=")
            _, _, tail = rest.partition(",")
            return f"{head}SignedHeaders={value},{tail}"

        return mangle

    return [
        ("truncated-after-algorithm", lambda a: a.split(" ")[0]),
        ("truncated-in-credential", lambda a: a[: a.index("Credential=") + 20]),
        ("truncated-in-signature", lambda a: a[:-10]),
        ("empty-credential", lambda a: a.replace(a[a.index("=") + 1 : a.index(",")], "")),
        ("scope-date-not-the-request-date", scope(1, "20200101")),
        ("scope-date-garbage", scope(1, "yesterday")),
        ("scope-empty-key", scope(0, "")),
        ("scope-non-ascii-key", scope(0, "AK\u00e9\u00ff")),
        ("scope-four-parts", lambda a: a.replace("/aws4_request", "")),
        ("scope-six-parts", lambda a: a.replace("/aws4_request", "/x/aws4_request")),
        ("signed-headers-without-host", header_list("x-amz-date")),
        ("signed-headers-without-date", header_list("host")),
        ("signed-headers-upper-case", header_list("Host;X-Amz-Date")),
        ("signed-headers-empty", header_list("")),
        ("signed-headers-reordered", header_list("x-amz-date;host")),
        ("signed-headers-repeated", header_list("host;host;x-amz-date")),
        ("signed-headers-extra", header_list("host;user-agent;x-amz-date")),
        ("duplicate-field", lambda a: a + ", Signature=" + "0" * 64),
        ("unknown-field", lambda a: a + ", Extra=1"),
        ("signature-upper-case", lambda a: a[:-64] + a[-64:].upper()),
        ("signature-too-long", lambda a: a + "00"),
        ("huge", lambda a: a + "," + "x" * 40_000),
    ]


@pytest.mark.parametrize(("case", "mangle"), _auth_mangles(), ids=[c for c, _ in _auth_mangles()])
def test_broken_authorization_header_is_refused(
    hostile: Hostile, case: str, mangle: Callable[[str], str]
) -> None:
    target = f"/restore-jobs/{hostile.job}/objects/list"
    headers = hostile.headers("GET", target)
    headers["Authorization"] = mangle(headers["Authorization"])
    modeled(send(hostile.url, "GET", target, headers), 403, "AccessDeniedException")


@pytest.mark.parametrize(
    "date",
    ["garbage", "", "20241301T000000Z", "20240230T000000Z", "20240101T250000Z",
     "00000101T000000Z", "99991231T235959Z", "2024-01-01T00:00:00Z", "20240101T000000",
     "20240101t000000z", "20240101T000000Z\x00"],
)  # fmt: skip
def test_garbage_request_date_is_refused(hostile: Hostile, date: str) -> None:
    target = f"/restore-jobs/{hostile.job}/objects/list"
    headers = hostile.headers("GET", target)
    headers["X-Amz-Date"] = date
    r = raw_exchange(hostile.url, _raw_head("GET", target, hostile.url, headers))
    modeled(r, 403, "AccessDeniedException")


def _raw_head(
    method: str, target: str, url: str, headers: dict[str, str] | list[tuple[str, str]]
) -> bytes:
    """A request head as it is, repeated headers included (no body)."""
    items = list(headers.items()) if isinstance(headers, dict) else headers
    if not any(k.lower() == "host" for k, _ in items):
        items.insert(0, ("Host", url.removeprefix("http://")))
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in items)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize("name", ["Authorization", "X-Amz-Date", "Host", "X-Amz-Content-SHA256"])
@pytest.mark.parametrize("order", ["valid-first", "valid-last"])
def test_duplicate_signing_headers_are_refused(hostile: Hostile, name: str, order: str) -> None:
    target = f"/restore-jobs/{hostile.job}/objects/list"
    headers = hostile.headers("GET", target, payload=hashlib_sha256(b""))
    valid = headers[name] if name != "Host" else hostile.url.removeprefix("http://")
    other = {
        "Authorization": hostile.headers("GET", target + "?max-results=1")["Authorization"],
        "X-Amz-Date": (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y%m%dT%H%M%SZ"),
        "Host": "evil.example",
        "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD",
    }[name]
    items = [(k, v) for k, v in headers.items() if k != name]
    pair = [(name, valid), (name, other)]
    items += pair if order == "valid-first" else pair[::-1]
    r = raw_exchange(hostile.url, _raw_head("GET", target, hostile.url, items))
    modeled(r, 403, "AccessDeniedException")


def hashlib_sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_text_log_line_cannot_be_forged(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    try:
        key = server.first_key
        job = server.client(key).create_job().job_id
        # A folded header puts a line break into the access key id; the id of a
        # job that does not exist, a line break and an escape sequence.
        target = f"/restore-jobs/{job}/objects/list"
        headers = signed_headers(server.url, "GET", target, key)
        headers["Authorization"] = headers["Authorization"].replace(
            "Credential=", "Credential=AKFORGED\r\n 2026-01-01T00:00:00Z 10.0.0.1 AKADMIN "
        )
        modeled(raw_exchange(server.url, _raw_head("GET", target, server.url, headers)), 403,
                "AccessDeniedException")  # fmt: skip
        forged = "x\n2026-01-01 forged line \x1b[2J"
        target = f"/cryo/v1/jobs/{q(forged)}"
        r = send(server.url, "GET", target, signed_headers(server.url, "GET", target, key))
        modeled(r, 404, "ResourceNotFoundException")
    finally:
        assert server.stop() == 0
    lines = server.log().splitlines()
    assert not [line for line in lines if "forged" in line and not line.startswith("20")]
    assert not [line for line in lines if line.startswith(" ")]
    assert "\x1b" not in server.log()


# -- requests to cryo server: parameters, tokens, names -----------------------------------

TEN_KIB = "n" * 10 * KiB


def _parameter_cases(h: Hostile) -> list[tuple[str, str, str, bytes, int, str, str]]:
    """(operation, method, target, body, status, error type, word in the message)."""
    job, up, x = h.job, h.upload, chunk_checksum(b"x")
    sha = f"checksum={q(x)}&checksum-algorithm=SHA256"
    chunk = f"/backup-jobs/{job}/chunk/{up}"
    complete = f"/backup-jobs/{job}/object/{up}/complete?checksum={q(x)}&checksum-algorithm=SUMMARY"
    put = f"/backup-jobs/{job}/object/p/put-object?{sha}"
    lst = f"/restore-jobs/{job}/objects/list"
    chunks = f"/restore-jobs/{job}/chunks/{h.object_token}/list"
    bad = "IllegalArgumentException"
    missing = "ResourceNotFoundException"
    meta = "MetadataString"
    blob_sum = chunk_checksum(b"blob")
    not_utf8 = q(base64.urlsafe_b64encode(b"\xff").decode())
    name_token = q(base64.urlsafe_b64encode(b"a").decode())
    return [
        # ChunkIndex: negative, past the largest long, not a number
        ("PutChunk", "PUT", f"{chunk}/-1?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/{2**31}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/{2**63 - 1}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/{2**63}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/{2**64}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/{10**400}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/-{2**64}?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/1.5?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/0x10?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/%EF%BC%91?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/%C2%B2?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/%20?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        ("PutChunk", "PUT", f"{chunk}/?length=1&{sha}", b"x", 400, bad, "ChunkIndex"),
        # Length: larger and smaller than the body, negative, not a number
        ("PutChunk", "PUT", f"{chunk}/0?length=2&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=0&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=1&{sha}", b"xx", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=-1&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=1e0&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=%C2%B9&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length={2**64}&{sha}", b"x", 400, bad, "Length"),
        ("PutChunk", "PUT", f"{chunk}/0?length=&{sha}", b"x", 400, bad, "Length"),
        ("PutObject", "PUT", f"{put}&length=5", b"x", 400, bad, "Length"),
        ("PutObject", "PUT", f"{put}&length=0", b"x", 400, bad, "Length"),
        ("PutObject", "PUT", f"{put}&length=one", b"x", 400, bad, "InlineChunkLength"),
        ("PutObject", "PUT", f"{put}&length=-5", b"x", 400, bad, "Length"),
        # MetadataString: over 256 bytes (counted in UTF-8), line breaks
        ("PutObject", "PUT", f"{put}&length=1&metadata-string={'m' * 257}", b"x", 400, bad, meta),
        ("PutObject", "PUT", f"{put}&length=1&metadata-string={TEN_KIB}", b"x", 400, bad, meta),
        ("PutObject", "PUT", f"{put}&length=1&metadata-string={q('日' * 86)}", b"x", 400, bad,
         meta),
        ("PutObject", "PUT", f"{put}&length=1&metadata-string=a%0Ab", b"x", 400, bad, meta),
        ("PutObject", "PUT", f"{put}&length=1&metadata-string=%FF", b"x", 400, bad, "metadata"),
        ("NotifyObjectComplete", "PUT", f"{complete}&metadata-string={TEN_KIB}", b"", 400, bad,
         meta),
        # MetadataBlob: over 4 MiB, longer or shorter than its length, wrong checksum
        ("NotifyObjectComplete", "PUT",
         f"{complete}&metadata-blob-length={4 * MiB + 1}&metadata-checksum={q(blob_sum)}"
         "&metadata-checksum-algorithm=SHA256", b"b" * (4 * MiB + 1), 400, bad,
         "MetadataBlobLength"),
        ("NotifyObjectComplete", "PUT",
         f"{complete}&metadata-blob-length=3&metadata-checksum={q(blob_sum)}"
         "&metadata-checksum-algorithm=SHA256", b"blob", 400, bad, "Length"),
        ("NotifyObjectComplete", "PUT",
         f"{complete}&metadata-blob-length=9&metadata-checksum={q(blob_sum)}"
         "&metadata-checksum-algorithm=SHA256", b"blob", 400, bad, "Length"),
        ("NotifyObjectComplete", "PUT",
         f"{complete}&metadata-blob-length=-4&metadata-checksum={q(blob_sum)}"
         "&metadata-checksum-algorithm=SHA256", b"blob", 400, bad, "MetadataBlobLength"),
        ("NotifyObjectComplete", "PUT",
         f"{complete}&metadata-blob-length=4&metadata-checksum={q(x)}"
         "&metadata-checksum-algorithm=SHA256", b"blob", 400, bad, "MetadataBlobChecksum"),
        # NextToken and Marker: garbage, tampered, out of range, exotic digits
        ("ListObjects", "GET", f"{lst}?next-token=garbage", b"", 400, bad, "NextToken"),
        ("ListObjects", "GET", f"{lst}?next-token=n%21%21", b"", 400, bad, "NextToken"),
        ("ListObjects", "GET", f"{lst}?next-token=n{not_utf8}",
         b"", 400, bad, "NextToken"),
        ("ListObjects", "GET", f"{lst}?next-token=", b"", 400, bad, "NextToken"),
        ("ListObjects", "GET", f"{lst}?next-token=n%C3%A9", b"", 400, bad, "NextToken"),
        ("ListObjects", "GET", f"{lst}?next-token={TEN_KIB}", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=garbage", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=i-1", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=i{10**30}", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=i{'9' * 5000}", b"", 400, bad, "NextToken"),
        ("ListJobs", "GET", f"/cryo/v1/jobs?marker=m{'9' * 5000}", b"", 400, bad, "Marker"),
        ("ListChunks", "GET", f"{chunks}?next-token=i%C2%B2", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=i%D9%A1", b"", 400, bad, "NextToken"),
        ("ListChunks", "GET", f"{chunks}?next-token=n{name_token}",
         b"", 400, bad, "NextToken"),
        ("ListJobs", "GET", "/cryo/v1/jobs?marker=m%C2%B2", b"", 400, bad, "Marker"),
        ("ListJobs", "GET", "/cryo/v1/jobs?marker=garbage", b"", 400, bad, "Marker"),
        ("ListObjects", "GET", f"{lst}?max-results=0", b"", 400, bad, "MaxResults"),
        ("ListObjects", "GET", f"{lst}?max-results=101", b"", 400, bad, "MaxResults"),
        ("ListObjects", "GET", f"{lst}?max-results={2**64}", b"", 400, bad, "MaxResults"),
        # Names of 10 KiB, in the path and in the query
        ("StartObject", "PUT", f"/backup-jobs/{job}/object/{TEN_KIB}", b"", 400, bad,
         "ObjectName"),
        ("StartObject", "PUT", f"/backup-jobs/{job}/object/{q('é' * 5 * KiB)}", b"", 400, bad,
         "ObjectName"),
        ("PutObject", "PUT", f"/backup-jobs/{job}/object/{TEN_KIB}/put-object?length=1&{sha}",
         b"x", 400, bad, "ObjectName"),
        ("DeleteObject", "DELETE", f"/backup-jobs/{job}/object/{TEN_KIB}", b"", 400, bad,
         "ObjectName"),
        ("ListObjects", "GET", f"{lst}?starting-object-name={TEN_KIB}", b"", 400, bad,
         "StartingObjectName"),
        ("ListObjects", "GET", f"{lst}?starting-object-prefix={TEN_KIB}", b"", 400, bad,
         "StartingObjectPrefix"),
        ("ListObjects", "GET", f"/restore-jobs/{TEN_KIB}/objects/list", b"", 404, missing,
         "does not exist"),
        ("ListChunks", "GET", f"/restore-jobs/{job}/chunks/{TEN_KIB}/list", b"", 404, missing,
         "ObjectToken"),
        ("GetChunk", "GET", f"/restore-jobs/{job}/chunk/{TEN_KIB}", b"", 404, missing,
         "ChunkToken"),
        ("GetObjectMetadata", "GET", f"/restore-jobs/{job}/object/{TEN_KIB}/metadata", b"", 404,
         missing, "ObjectToken"),
        ("PutChunk", "PUT", f"/backup-jobs/{job}/chunk/{TEN_KIB}/0?length=1&{sha}", b"x", 404,
         missing, "upload"),
        # Tokens of another kind, or another job's
        ("GetChunk", "GET", f"/restore-jobs/{job}/chunk/{h.object_token}", b"", 404, missing,
         "ChunkToken"),
        ("GetChunk", "GET", f"/restore-jobs/{h.other_job}/chunk/{h.chunk_token}", b"", 404,
         missing, "ChunkToken"),
        ("ListChunks", "GET", f"/restore-jobs/{h.other_job}/chunks/{h.object_token}/list", b"",
         404, missing, "ObjectToken"),
        ("GetChunk", "GET", f"/restore-jobs/{job}/chunk/c{2**70}.0", b"", 404, missing,
         "ChunkToken"),
        ("GetChunk", "GET", f"/restore-jobs/{job}/chunk/c1.{2**70}", b"", 404, missing,
         "ChunkToken"),
        # Unknown routes and methods
        ("", "PATCH", f"/backup-jobs/{job}/object/a", b"", 404, missing, "no operation"),
        ("", "POST", f"/backup-jobs/{job}/object/a", b"", 404, missing, "no operation"),
        ("", "GET", f"/backup-jobs/{job}/object/a/put-object", b"", 404, missing, "no operation"),
        ("", "DELETE", f"/restore-jobs/{job}/objects/list", b"", 404, missing, "no operation"),
        ("", "GET", f"/restore-jobs/{job}/objects/list/", b"", 404, missing, "no operation"),
        ("", "GET", "/", b"", 404, missing, "no operation"),
        ("", "GET", f"/{TEN_KIB}", b"", 404, missing, "no operation"),
        ("", "BREW", "/cryo/v1/jobs", b"", 404, missing, "no operation"),
    ]  # fmt: skip


def test_bad_parameters_get_the_modeled_error(hostile: Hostile) -> None:
    unsigned = "UNSIGNED-PAYLOAD"
    for operation, method, target, body, status, error, word in _parameter_cases(hostile):
        streaming = operation in ("PutChunk", "PutObject", "NotifyObjectComplete")
        r = hostile.signed(method, target, body, unsigned if streaming else None)
        try:
            modeled(r, status, error, word, operation or None)
        except AssertionError as exc:
            raise AssertionError(f"{method} {target[:200]}: {exc}") from None
    hostile.check_healthy()


def test_another_jobs_next_token_shows_nothing_of_that_job(hostile: Hostile) -> None:
    other = hostile.signed("GET", f"/restore-jobs/{hostile.other_job}/objects/list?max-results=1")
    token = other.json()["NextToken"]
    mine = f"/restore-jobs/{hostile.job}/objects/list?next-token={q(token)}"
    r = hostile.signed("GET", mine)
    # A token is a position in the listing: here, past this job's last name.
    assert r.status == 200 and r.json()["ObjectList"] == []
    first = hostile.signed("GET", f"/restore-jobs/{hostile.job}/objects/list?max-results=1")
    theirs = f"/restore-jobs/{hostile.other_job}/objects/list?next-token="
    r = hostile.signed("GET", theirs + q(first.json()["NextToken"]))
    assert {o["Name"] for o in r.json()["ObjectList"]} == {"zz-1", "zz-2", "zz-3"}
    # Another key cannot use a token to see this job at all.
    stranger = hostile.server.new_key()
    target = f"/restore-jobs/{hostile.job}/objects/list?next-token={q(token)}"
    r = send(hostile.url, "GET", target, signed_headers(hostile.url, "GET", target, stranger))
    modeled(r, 403, "AccessDeniedException", "another principal")


def _responses(sock: socket.socket, n: int) -> list[Response]:
    """The next ``n`` replies on ``sock``, read through one buffer."""
    f = sock.makefile("rb")
    out = []
    for _ in range(n):
        status = int(f.readline().split()[1])
        headers = {}
        while line := f.readline().decode("latin-1").rstrip("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        out.append(Response(status, headers, f.read(int(headers.get("content-length", "0")))))
    return out


def test_head_gets_the_error_headers_without_a_body(hostile: Hostile) -> None:
    with connect(hostile.url) as sock:
        sock.sendall(hostile.head("HEAD", "/cryo/v1/jobs", length=0))
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 ")
        assert b"x-amzn-ErrorType: ResourceNotFoundException" in head
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            rest += sock.recv(65536)
        assert rest == b""  # no content: the connection can carry the next request
        sock.settimeout(10)
        sock.sendall(hostile.head("GET", "/cryo/v1/jobs", length=0))
        assert read_response(sock).status == 200


def test_bodies_that_do_not_match_their_framing(hostile: Hostile) -> None:
    job, up = hostile.job, hostile.upload
    x = chunk_checksum(b"x")
    target = f"/backup-jobs/{job}/chunk/{up}/0?length=1&checksum={q(x)}&checksum-algorithm=SHA256"
    # Declared far larger than any chunk, never sent: refused at once, connection closed.
    for payload in ("UNSIGNED-PAYLOAD", None, hashlib_sha256(b"x")):
        with connect(hostile.url) as sock:
            sock.sendall(hostile.head("PUT", target, payload, length=10**17) + b"x")
            r = read_response(sock)
            modeled(r, 400, "IllegalArgumentException")
            assert r.headers.get("connection") == "close"
            assert sock.recv(1) == b""
    # Declared larger than Length (and sent): refused as soon as the head is read.
    with connect(hostile.url) as sock:
        sock.sendall(hostile.head("PUT", target, "UNSIGNED-PAYLOAD", length=3) + b"xyz")
        modeled(read_response(sock), 400, "IllegalArgumentException", "Length is 1")
    # Content-Length that is not a number, or too long to be one.
    for value in ("-1", "1e3", "0x10", "\xb9", str(10**19), "1, 2", ""):
        head = _raw_head("PUT", target, hostile.url, [("Content-Length", value)])
        r = raw_exchange(hostile.url, head + b"x")
        modeled(r, 400, "IllegalArgumentException")
    # More bytes than Content-Length: the rest is the next request, which is garbage.
    body = b'{"ClientToken": "framing"}'
    with connect(hostile.url) as sock:
        head = request_head(
            hostile.url, "POST", "/cryo/v1/jobs", hostile.headers("POST", "/cryo/v1/jobs", body),
            len(body),
        )  # fmt: skip
        sock.sendall(head + body + b"GARBAGE MORE BYTES THAN DECLARED\r\n\r\n")
        first, second = _responses(sock, 2)
        assert first.status == 200
        modeled(second, 400, "IllegalArgumentException", "bad HTTP request")
    # Fewer bytes than Content-Length, then the client gives up: nothing is stored.
    with connect(hostile.url) as sock:
        sock.sendall(hostile.head("PUT", target, "UNSIGNED-PAYLOAD", length=1000) + b"x" * 10)
        time.sleep(0.2)
    # A chunked body whose chunk sizes lie.
    for chunks in (b"zz\r\nx\r\n0\r\n\r\n", b"5\r\nx\r\n0\r\n\r\n", b"-1\r\nx\r\n0\r\n\r\n"):
        head = hostile.head("PUT", target, "UNSIGNED-PAYLOAD", length=0).replace(
            b"Content-Length: 0", b"Transfer-Encoding: chunked"
        )
        with connect(hostile.url) as sock:
            sock.sendall(head + chunks)
            sock.shutdown(socket.SHUT_WR)
            modeled(read_response(sock), 400, "IllegalArgumentException")
    hostile.check_healthy()


def test_requests_that_stop_half_way_hold_up_no_one(hostile: Hostile) -> None:
    key_target = "/cryo/v1/jobs"
    chunk = (
        f"/backup-jobs/{hostile.job}/chunk/{hostile.upload}/0?length=1000"
        f"&checksum={q(chunk_checksum(b'y' * 1000))}&checksum-algorithm=SHA256"
    )
    full = hostile.head("GET", key_target, length=0)
    partial = [
        b"GET /cryo/v1/jo",  # in the request line
        b"GET /cryo/v1/jobs HTTP/1.1\r\nHost: x\r\nX-Amz-Da",  # in the headers
        full[:-2],  # all but the blank line
        hostile.head("PUT", chunk, "UNSIGNED-PAYLOAD", length=1000) + b"y" * 10,  # in the body
        hostile.head("POST", key_target, length=50) + b"{",  # a signed body, cut short
    ]
    held = []
    try:
        for data in partial * 4:
            sock = connect(hostile.url)
            sock.sendall(data)
            held.append(sock)
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(5):
            assert hostile.signed("GET", key_target).status == 200
        assert time.monotonic() - started < 5
        # A request sent a few bytes at a time is served once it is whole.
        with connect(hostile.url) as slow:
            for i in range(0, len(full), 16):
                slow.sendall(full[i : i + 16])
                time.sleep(0.005)
            assert read_response(slow).status == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    hostile.check_healthy()


# -- backups: unreadable, changing and strange trees -------------------------------------

FAN_CLOEXEC, FAN_NONBLOCK, FAN_CLASS_CONTENT = 0x1, 0x2, 0x4
FAN_MARK_ADD, FAN_OPEN_PERM, FAN_ALLOW = 0x1, 0x10000, 0x1
AT_FDCWD = -100
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fanotify_mark.argtypes = [
        ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p,
    ]  # fmt: skip
    return libc


class OpenGate:
    """Runs ``action`` once the backup reads ``trigger`` and has listed directory ``ready``.

    The reader opens files in scan order, one at a time (``--read-workers 1``),
    and the scanner stats each entry before it lists the next directory. So
    when ``trigger`` is opened and ``ready`` (scanned after the victim) has
    been listed, the victim is recorded and not yet opened: ``action`` changes
    it in that window. With fanotify the open of ``trigger`` waits for the
    action (exact); with inotify only (no CAP_SYS_ADMIN) the action races the
    read of ``trigger``, which is made large enough to lose that race.
    """

    def __init__(self, trigger: Path, ready: Path, action: Callable[[], None]) -> None:
        self.libc = _libc()
        self.action = action
        self.acted = threading.Event()
        self.ready = Opened(ready)
        self.fan = self.libc.fanotify_init(
            FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC
        )
        if self.fan >= 0 and self.libc.fanotify_mark(
            self.fan, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, os.fsencode(trigger)
        ):
            os.close(self.fan)
            self.fan = -1
        self.exact = self.fan >= 0
        self.watch = None if self.exact else Opened(trigger.parent)
        self.trigger_name = os.fsencode(trigger.name)
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        source = self.fan if self.exact else self.watch.fd  # type: ignore[union-attr]
        held: list[int] = []  # fanotify events waiting for an answer
        triggered = listed = False
        deadline = float("inf")
        try:
            while True:
                readable = select.select([source, self.ready.fd, self._stop_r], [], [], 0.1)[0]
                if self._stop_r in readable:
                    return
                if self.ready.fd in readable:
                    listed = listed or any(m & IN_ISDIR for _, _, m in self.ready.events())
                if source in readable:
                    if self.exact:
                        buf = os.read(self.fan, 4096)
                        for pos in range(0, len(buf), _EVENT.size):
                            held.append(_EVENT.unpack_from(buf, pos)[5])
                        triggered = True
                    else:
                        events = self.watch.events()  # type: ignore[union-attr]
                        triggered = triggered or any(n == self.trigger_name for _, n, _ in events)
                    deadline = min(deadline, time.monotonic() + 30)
                # Never wait for ever: past the deadline, let the reader go (the test fails).
                timed_out = time.monotonic() > deadline
                if triggered and not self.acted.is_set() and (listed or timed_out):
                    if listed:
                        self.action()
                    self.acted.set()
                if self.acted.is_set():
                    self._allow(held)
        finally:
            self._allow(held)

    def _allow(self, held: list[int]) -> None:
        while held:
            fd = held.pop()
            os.write(self.fan, struct.pack("iI", fd, FAN_ALLOW))
            os.close(fd)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(10)
        for fd in (self._stop_r, self._stop_w, *([self.fan] if self.exact else [])):
            os.close(fd)
        self.ready.close()
        if self.watch is not None:
            self.watch.close()


@pytest.mark.parametrize("change", ["vanishes", "grows"])
def test_a_file_that_changes_while_the_backup_runs(tmp_path: Path, change: str) -> None:
    src = tmp_path / "src"
    (src / "c-later").mkdir(parents=True)
    (src / "a-trigger").write_bytes(os.urandom(24 * MiB))  # read just before the victim
    # Large enough for the readers (small files are read by the scanner as it finds
    # them, leaving no time to change in between): queued behind the trigger.
    victim = src / "b-victim"
    victim.write_bytes(b"as scanned\n" * 200_000)
    (src / "c-later" / "x").write_bytes(b"after the victim")
    (src / "d-last").write_bytes(os.urandom(5000))

    def act() -> None:
        if change == "vanishes":
            victim.unlink()
        else:
            with victim.open("ab") as f:
                f.write(b"grown while the backup ran\n" * 1000)

    repo = tmp_path / "repo"
    gate = OpenGate(src / "a-trigger", src / "c-later", act)
    try:
        code, job, err = backup(src, repo, "--read-workers", "1", "--chunk-size", "1")
    finally:
        gate.close()
    assert gate.acted.is_set()
    assert code == 3, err
    assert str(victim) in err and "1 file(s) could not be backed up" in err
    assert ("vanished" if change == "vanishes" else "changed while it was read") in err
    assert LocalBackend(repo).describe_job(job).status == "PARTIAL"
    out = restore(job, repo, tmp_path / "out")
    restored = snapshot(inside(out, src))
    expected = snapshot(src)
    if change == "grows":  # read after it grew, stored with the times it was scanned with
        assert (inside(out, src) / "b-victim").read_bytes() == victim.read_bytes()
        del restored[b"b-victim"], expected[b"b-victim"]
    assert restored == expected


def test_a_small_file_that_grows_before_it_is_read(tmp_path: Path) -> None:
    # A small file that is not in the page cache is opened and set aside while
    # the kernel reads it ahead; it grows before its turn comes. The scanner's
    # open of the last file waits (fanotify) until the victim has grown.
    # The no-wait read that finds the victim cold starts the kernel's read; on a
    # loaded machine that read can finish before the no-wait read looks, and the
    # victim is then read whole before it grows: rightly not reported, but the
    # window is missed. Such a run is told apart (exit 0 and the victim's first
    # content restored), and the test tries again.
    for attempt in range(5):
        src, repo = tmp_path / f"src{attempt}", tmp_path / f"repo{attempt}"
        (src / "c-later").mkdir(parents=True)
        victim = src / "b-victim"
        victim.write_bytes(b"as scanned\n" * 100)
        (src / "c-later" / "x").write_bytes(b"after the victim")
        (src / "d-last").write_bytes(os.urandom(5000))
        assert evict_from_page_cache(victim)

        def grow(victim: Path = victim) -> None:
            with victim.open("ab") as f:
                f.write(b"grown while the backup ran\n" * 1000)

        gate = OpenGate(src / "d-last", src / "c-later", grow)
        assert gate.exact, "fanotify is needed to hold the scanner at the right moment"
        try:
            code, job, err = backup(src, repo)
        finally:
            gate.close()
        assert gate.acted.is_set()
        out = restore(job, repo, tmp_path / f"out{attempt}")
        kept = (inside(out, src) / "b-victim").read_bytes()
        if not (code == 0 and kept == b"as scanned\n" * 100):
            break
    else:
        pytest.fail("the victim was read before it grew in every attempt")
    assert code == 3, err
    assert str(victim) in err and "changed while it was read" in err
    assert kept == victim.read_bytes()


def test_unreadable_files_and_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "open" / "inner").mkdir(parents=True)
    (src / "open" / "inner" / "fine.txt").write_text("fine")
    (src / "ok.txt").write_text("readable")
    (src / "locked.txt").write_text("secret")
    (src / "open" / "write-only.txt").write_text("w")
    (src / "locked-dir" / "sub").mkdir(parents=True)
    (src / "locked-dir" / "sub" / "hidden.txt").write_text("hidden")
    (src / "search-only-dir").mkdir()
    (src / "search-only-dir" / "known.txt").write_text("known name, but no listing")
    (src / "z-after").write_bytes(os.urandom(2 * MiB))
    os.chmod(src / "locked.txt", 0o000)
    os.chmod(src / "open" / "write-only.txt", 0o200)
    os.chmod(src / "locked-dir", 0o000)
    os.chmod(src / "search-only-dir", 0o111)  # noqa: S103 - the point: no listing, no read
    repo = tmp_path / "repo"
    cmd = without_read_override([*CLI, "backup", str(src), "--repo", str(repo)])
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 3, err
    unreadable = ["locked.txt", "open/write-only.txt", "locked-dir", "search-only-dir"]
    for name in unreadable:
        assert f"{src / name}:" in err, err
    assert "4 file(s) could not be backed up" in err
    job = r.stdout.decode().strip()
    assert LocalBackend(repo).describe_job(job).status == "PARTIAL"
    out = restore(job, repo, tmp_path / "out")
    expected = {
        k: v
        for k, v in snapshot(src).items()
        if k not in (b"locked.txt", b"open/write-only.txt")
        and not k.startswith((b"locked-dir/", b"search-only-dir/"))
    }
    # The directories that could not be listed come back empty, with their modes.
    assert snapshot(inside(out, src)) == expected


def test_names_that_are_not_text(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = os.fsencode(src)
    names = [
        b"caf\xe9", b"\xff\xfe\xfd", b"\xc3\x28", b"ok-\xed\xa0\x80", b"line\nbreak", b"\n",
        b"\r\n", b"tab\there", b"esc\x1b[31mred", b"x" * 255, ("\u00e9" * 127 + "x").encode(),
        b"\xff" * 255, b" leading", b"trailing ", b"-rf", b"*?[glob]", b"back\\slash",
        b"quote\"'", b".cryo-restore-0123456789abcdef.tmp", b"CACHEDIR.TAG", b"\xe2\x80\xae",
    ]  # fmt: skip
    for i, name in enumerate(names):
        with open(os.path.join(base, name), "wb") as f:
            f.write(b"content of %d: %r\n" % (i, name))
    odd_dir = os.path.join(base, b"d\n\xff" + b"y" * 252)
    os.mkdir(odd_dir)
    with open(os.path.join(odd_dir, b"\xfe" * 255), "wb") as f:
        f.write(os.urandom(100_000))
    os.symlink(b"\xff\n../../../etc/passwd", os.path.join(odd_dir, b"link\n"))
    os.link(os.path.join(base, b"line\nbreak"), os.path.join(odd_dir, b"hard\nlink\xff"))
    if xattrs_supported(src):
        os.setxattr(os.path.join(base, b"caf\xe9"), b"user.caf\xe9\n", b"\x00\xff\n")
    repo = tmp_path / "repo"
    code, job, err = backup(src, repo)
    assert code == 0, err
    out = restore(job, repo, tmp_path / "out")
    assert snapshot(inside(out, src)) == snapshot(src)


def _make_deep(root: Path, levels: int) -> int:
    """Directories ``levels`` deep under ``root`` (made through fds); returns the path length."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(top)
    length = len(os.fsencode(root))
    try:
        for i in range(levels):
            name = b"%03d-" % i + b"d" * 196
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            length += 1 + len(name)
            if i % 7 == 0:
                _write_at(fd, b"file-%d" % i, b"level %d\n" % i)
        _write_at(fd, b"bottom.bin", os.urandom(2 * MiB + 3))  # two chunks
        _write_at(fd, b"b" * 255, b"a 255-byte name at the bottom")
        os.symlink(b"../" * levels, b"to-the-top", dir_fd=fd)
        os.symlink(b"loop", b"loop", dir_fd=fd)
        os.mkfifo(b"fifo", dir_fd=fd)
        os.link(b"bottom.bin", b"bottom-link", src_dir_fd=fd, dst_dir_fd=fd)
        os.link(b"bottom.bin", b"top-link", src_dir_fd=fd, dst_dir_fd=top)
        path = b"/proc/self/fd/%d/bottom.bin" % fd
        with contextlib.suppress(OSError):
            os.setxattr(path, b"user.deep", b"yes")
        os.utime(b"bottom.bin", ns=(1, 1_234_567_890_123_456_789), dir_fd=fd)
        return length + 1 + 255
    finally:
        os.close(fd)
        os.close(top)


def _write_at(dir_fd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_paths_longer_than_path_max(tmp_path: Path) -> None:
    src = tmp_path / "deep"
    src.mkdir()
    longest = _make_deep(src, 45)
    assert longest > 2 * 4096
    repo = tmp_path / "repo"
    code, job, err = backup(src, repo, "--chunk-size", "1")
    assert code == 0, err
    out = restore(job, repo, tmp_path / "out")
    expected = snapshot(src)
    assert len(expected) > 45 + 10
    assert snapshot(inside(out, src)) == expected


def test_symlink_loops_are_stored_as_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_text("the only file")
    links = {
        "self": "self", "a": "b", "b": "a", "up": "..", "dot": ".", "dir/loop": "../dir",
        "dir/back": "../up", "abs": str(src / "abs"), "root": "/", "deep": "dir/loop/loop/loop",
    }  # fmt: skip
    for name, target in links.items():
        os.symlink(target, src / name)
    repo = tmp_path / "repo"
    code, job, err = backup(src, repo)
    assert code == 0, err
    backend = LocalBackend(repo)
    from cryo.jobreader import JobReader

    _, entries = JobReader(backend, job).manifest()
    prefix = os.fsencode(src).lstrip(b"/") + b"/"
    recorded = {e.path.removeprefix(prefix): e for e in entries if e.path.startswith(prefix)}
    assert set(recorded) == {b"dir", b"dir/file"} | {n.encode() for n in links}
    for name, target in links.items():
        assert (recorded[name.encode()].kind, recorded[name.encode()].target) == (
            "l", target.encode()
        )  # fmt: skip
    out = restore(job, repo, tmp_path / "out")
    assert snapshot(inside(out, src)) == snapshot(src)


def _regions(fd: int, size: int) -> list[tuple[int, int]]:
    regions = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        regions.append((start, end))
        pos = end
    return regions


def test_a_sparse_file_of_10_gib(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 10 * GiB
    islands = {0: os.urandom(100), 3 * GiB + 12345: os.urandom(3 * MiB), size - 100: b"e" * 100}
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        for offset, data in islands.items():
            f.seek(offset)
            f.write(data)
    assert os.stat(src / "sparse").st_blocks * 512 < 16 * MiB
    repo = tmp_path / "repo"
    started = time.monotonic()
    code, out, err = cli("backup", str(src), "--repo", str(repo), "--json")
    backup_seconds = time.monotonic() - started
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["source_bytes"] == size
    assert summary["bytes_read"] < 8 * MiB  # the holes are neither read nor stored
    assert summary["bytes_stored"] < 8 * MiB
    target = tmp_path / "out"
    started = time.monotonic()
    restore(summary["job_id"], repo, target)
    restore_seconds = time.monotonic() - started
    restored = inside(target, src) / "sparse"
    st = os.stat(restored)
    assert st.st_size == size and st.st_blocks * 512 < 16 * MiB  # holes stay holes
    with open(src / "sparse", "rb") as a, open(restored, "rb") as b:
        for fd in (a.fileno(), b.fileno()):  # every data region of either is the same in both
            for start, end in _regions(fd, size):
                assert os.pread(a.fileno(), end - start, start) == os.pread(
                    b.fileno(), end - start, start
                )
    print(f"10 GiB sparse file: backup {backup_seconds:.1f} s, restore {restore_seconds:.1f} s")
    assert backup_seconds < 30 and restore_seconds < 30


def test_fifos_sockets_and_devices_are_recorded_never_opened(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "data").write_text("kept: the tag below is not a valid one")
    os.mkfifo(src / "fifo", 0o640)
    os.mkfifo(src / "cache" / "CACHEDIR.TAG")  # --exclude-caches must not wait on it
    os.symlink("fifo", src / "to-fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fsdecode(src / "socket"))
    if os.geteuid() == 0:
        os.mknod(src / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    lone = tmp_path / "lone-fifo"  # a FIFO given as a path to back up
    os.mkfifo(lone)
    watch = Opened(src, src / "cache", tmp_path)
    repo = tmp_path / "repo"
    try:
        code, out, err = cli(
            "backup", str(src), str(lone), "--repo", str(repo), "-q", "--exclude-caches",
            timeout=120,
        )  # fmt: skip
        opened = {(d, n) for d, n, _ in watch.events(0.2)}
    finally:
        watch.close()
        sock.close()
    assert code == 0, err
    fifos = {(src, b"fifo"), (src / "cache", b"CACHEDIR.TAG"), (tmp_path, b"lone-fifo")}
    assert not fifos & opened
    out_dir = restore(out.strip(), repo, tmp_path / "out")
    assert snapshot(inside(out_dir, src)) == snapshot(src)
    assert stat.S_ISFIFO(os.lstat(inside(out_dir, lone)).st_mode)


# -- many files: memory stays flat ----------------------------------------------------


def _empty_files(root: Path, count: int) -> None:
    """``count`` empty files in one directory (no directory is more hostile to a scanner)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(b"f%07d" % i, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _many_empty_files(tmp_path: Path, count: int, growth_mib: float) -> None:
    small = tmp_path / "small"  # enough for the pipeline's buffers to fill, as in the big run
    _empty_files(small, 20_000)
    code, baseline, _ = peak_rss_mib([*CLI, "backup", str(small), "--repo", str(tmp_path / "r0")])
    assert code == 0
    src = tmp_path / "many"
    started = time.monotonic()
    _empty_files(src, count)
    created = time.monotonic() - started
    repo = tmp_path / "repo"
    code, peak, seconds = peak_rss_mib(
        [*CLI, "backup", str(src), "--repo", str(repo), "-q"], timeout=1800
    )
    assert code == 0
    print(
        f"{count} empty files: created in {created:.0f} s, backed up in {seconds:.0f} s, "
        f"peak RSS {peak:.0f} MiB ({baseline:.0f} MiB for 20,000 files)"
    )
    # Before the scanner kept only names, a flat million took 860 MiB.
    assert peak - baseline < growth_mib, f"peak RSS {peak:.0f} MiB, baseline {baseline:.0f} MiB"
    job = cli("jobs", "--repo", str(repo), "--json")[1].splitlines()[0]
    target = tmp_path / "out"
    started = time.monotonic()
    restore(json.loads(job)["job_id"], repo, target)
    print(f"{count} empty files restored in {time.monotonic() - started:.0f} s")
    with os.scandir(inside(target, src)) as it:
        names = sorted(e.name for e in it if e.stat(follow_symlinks=False).st_size == 0)
    assert names == [f"f{i:07d}" for i in range(count)]


def test_a_hundred_thousand_empty_files(tmp_path: Path) -> None:
    _many_empty_files(tmp_path, 100_000, growth_mib=25)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_million_empty_files(tmp_path: Path) -> None:
    _many_empty_files(tmp_path, 1_000_000, growth_mib=100)


# -- restores of crafted jobs ------------------------------------------------------------


PAYLOAD = b"written by a crafted job"


def _f(path: bytes) -> ManifestEntry:
    return ManifestEntry(
        path=path, kind="f", mode=0o644, size=len(PAYLOAD),
        extents=[Extent(0, "data/x", 0, 0, len(PAYLOAD))],
        xxh3=xxhash.xxh3_128(PAYLOAD).hexdigest(),
    )  # fmt: skip


def _l(path: bytes, target: bytes) -> ManifestEntry:
    return ManifestEntry(path=path, kind="l", target=target)


def _h(path: bytes, target: bytes) -> ManifestEntry:
    return ManifestEntry(path=path, kind="h", target=target)


def _d(path: bytes) -> ManifestEntry:
    return ManifestEntry(path=path, kind="d", mode=0o755)


def _hostile_entries(outside: Path) -> tuple[list[ManifestEntry], set[bytes]]:
    """Entries that try to leave the target, and the paths a restore must refuse."""
    out = os.fsencode(outside)
    refused = [
        _f(b"../escape"), _f(b"../../escape"), _f(out + b"/absolute"), _f(b"/etc/cryo-absolute"),
        _f(b"ok/../../up"), _f(b"./dot"), _f(b"trailing/"), _f(b"a//b"), _f(b""),
        _f(b"nul\x00byte"), _d(b".."), _d(b"."), _l(b"../link-outside", b"x"),
        # through a symlink that leads out
        _l(b"out", out), _f(b"out/through"), _d(b"out/dir"), _f(b"out/dir/deeper"),
        _l(b"out/link", b"x"), ManifestEntry(path=b"out/fifo", kind="p", mode=0o644),
        _h(b"out/hardlink", b"fine"),
        # through a relative symlink, and a chain of them
        _l(b"rel", b"../" + os.fsencode(outside.name)), _f(b"rel/through"),
        _l(b"chain1", b"chain2"), _l(b"chain2", out), _f(b"chain1/through"),
        # hard links to what lies outside
        _h(b"hl-through-link", b"out/secret"), _h(b"hl-absolute", out + b"/secret"),
        _h(b"hl-up", b"../" + os.fsencode(outside.name) + b"/secret"),
        _h(b"hl-relative-link", b"rel/secret"),
        # a symlink where a directory was, then a file under that name
        _l(b"swap", out), _d(b"swap"), _f(b"swap/through"),
    ]  # fmt: skip
    fine = [
        _f(b"fine"), _d(b"dir"), _f(b"dir/ok"), _h(b"dir/hl-ok", b"fine"),
        _l(b"dir/link-to-outside", out + b"/secret"),  # a link is stored, never followed
        _d(b"dup"), _l(b"dup", out), _f(b"dup/inside"),  # the directory stays a directory
        _h(b"hl-to-the-link", b"out"),  # a hard link to the symlink itself, not its target
    ]  # fmt: skip
    # The links themselves are fine; "swap" becomes a directory when entries may replace
    # others (--overwrite always), and then "swap/through" lands inside it.
    must_refuse = {
        e.path
        for e in refused
        if e.path not in (b"out", b"rel", b"chain1", b"chain2", b"swap", b"swap/through")
    }
    return refused + fine, must_refuse


def _tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``root``: names, kinds, sizes, times, link counts, contents."""
    state: dict[str, tuple[object, ...]] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(p)
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        state[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, data)
    return state


def _check_confined(
    parent: Path, target: Path, before: dict[str, tuple[object, ...]], failures: set[str],
    must_refuse: set[bytes],
) -> None:  # fmt: skip
    after = _tree_state(parent)
    outside_target = {k: v for k, v in after.items() if not k.startswith(str(target) + "/")}
    before_outside = {k: v for k, v in before.items() if not k.startswith(str(target) + "/")}
    before_outside.pop(str(target), None)
    outside_target.pop(str(target), None)
    assert outside_target == before_outside  # nothing outside the target changed
    assert not Path("/etc/cryo-absolute").exists()
    for path in must_refuse:
        assert path.decode("utf-8", "backslashreplace") in failures, path
    assert (target / "fine").read_bytes() == PAYLOAD
    assert (target / "dir" / "ok").read_bytes() == PAYLOAD
    assert os.stat(target / "dir" / "hl-ok").st_ino == os.stat(target / "fine").st_ino
    assert (target / "dup").is_dir() and (target / "dup" / "inside").read_bytes() == PAYLOAD
    assert os.readlink(target / "hl-to-the-link") == str(parent / "outside")
    assert [p for p in target.rglob(".cryo-*")] == []
    swap = target / "swap"
    if swap.is_symlink():
        assert "swap/through" in failures
    else:
        assert swap.is_dir() and (swap / "through").read_bytes() == PAYLOAD


def _hostile_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    parent = tmp_path / "parent"
    outside = parent / "outside"
    outside.mkdir(parents=True)
    (outside / "secret").write_text("must stay as it is, with one link")
    return parent, outside, parent / "target"


def test_crafted_job_restored_in_process_stays_in_the_target(tmp_path: Path) -> None:
    parent, outside, target = _hostile_case(tmp_path)
    backend = LocalBackend(tmp_path / "repo")
    entries, must_refuse = _hostile_entries(outside)
    job = crafted_job(backend, entries, PAYLOAD)
    target.mkdir()
    before = _tree_state(parent)
    for overwrite in (None, "always", "if-changed"):
        summary = run_restore(
            backend, job, RestoreOptions(target=os.fsencode(target), overwrite=overwrite)
        )
        failures = {f.path for f in summary.failures}
        _check_confined(parent, target, before, failures, must_refuse)


def test_crafted_job_restored_through_cryo_server_stays_in_the_target(
    tmp_path: Path, hostile: Hostile
) -> None:
    parent, outside, target = _hostile_case(tmp_path)
    key = hostile.server.new_key()
    backend = hostile.server.client(key)
    entries, must_refuse = _hostile_entries(outside)
    job = crafted_job(backend, entries, PAYLOAD)
    backend.close()
    # The target already holds a symlink leading out, as a local user could plant.
    target.mkdir()
    os.symlink(outside, target / "planted")
    before = _tree_state(parent)
    env = {"AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1]}
    code, out, err = cli(
        "restore", job, "--endpoint-url", hostile.url, "--region", REGION, "--to", str(target),
        "--overwrite", "always", "--json", env=env,
    )  # fmt: skip
    assert code == 1, err
    assert "Traceback" not in err
    summary = json.loads(out.splitlines()[-1])
    failures = {e["path"] for e in summary["errors"]}
    _check_confined(parent, target, before, failures, must_refuse)
    assert os.readlink(target / "planted") == str(outside)
    hostile.check_healthy()


def _out_of_range_entries() -> list[ManifestEntry]:
    """Entries whose fields no file system can hold; each alone must be refused."""

    def f(name: bytes, **changes: Any) -> ManifestEntry:
        e = _f(name)
        for k, v in changes.items():
            setattr(e, k, v)
        return e

    return [
        f(b"n" * 256),
        f(b"dir/" + b"n" * 300),
        f(b"negative-size", size=-1, extents=[]),
        f(b"huge-size", size=2**64, extents=[]),
        f(b"extent-past-end", extents=[Extent(10, "data/x", 0, 0, len(PAYLOAD))]),
        f(b"negative-offset", extents=[Extent(-5, "data/x", 0, 0, len(PAYLOAD))]),
        f(b"huge-owner", uid=2**40),
        f(b"negative-owner", gid=-3),
        f(b"huge-mtime", mtime_ns=2**70),
        f(b"huge-mode", mode=2**40),
        f(b"unknown-kind", kind="z"),
        ManifestEntry(path=b"huge-device", kind="c", mode=0o600, rdev=2**70),
        ManifestEntry(path=b"long-link", kind="l", target=b"t" * 5000),
    ]


def test_entries_out_of_range_are_refused_by_name(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    bad = _out_of_range_entries()
    job = crafted_job(backend, [_f(b"before"), *bad, _f(b"after")], PAYLOAD)
    target = tmp_path / "target"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(target)))
    refused = {f.path for f in summary.failures}
    assert refused == {e.path.decode() for e in bad}
    assert all("refusing" in f.message for f in summary.failures)
    # One bad entry costs only itself: the files around it are restored.
    assert (target / "before").read_bytes() == PAYLOAD
    assert (target / "after").read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.iterdir()) == ["after", "before"]


def test_an_extent_far_past_its_chunk_costs_only_its_file(tmp_path: Path) -> None:
    # A large file's chunk is decoded into a buffer sized from the extents; an
    # extent that says its piece starts a pebibyte into the chunk must not ask
    # for a pebibyte of memory and stop the restore.
    backend = LocalBackend(tmp_path / "repo")
    data = os.urandom(2 << 20)
    digest = xxhash.xxh3_128(data).hexdigest()
    good = ManifestEntry(
        path=b"good.bin", kind="f", mode=0o644, size=len(data),
        extents=[Extent(0, "data/x", 0, 0, len(data))], xxh3=digest,
    )  # fmt: skip
    bad = ManifestEntry(
        path=b"bad.bin", kind="f", mode=0o644, size=len(data),
        extents=[Extent(0, "data/x", 0, 2**50, len(data))], xxh3=digest,
    )  # fmt: skip
    job = crafted_job(backend, [bad, good], data)
    target = tmp_path / "target"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(target)))
    assert [(f.path, "shorter than its extent" in f.message) for f in summary.failures] == [
        ("bad.bin", True)
    ]
    assert (target / "good.bin").read_bytes() == data
    assert sorted(p.name for p in target.iterdir()) == ["good.bin"]


def test_an_entry_the_target_cannot_hold_costs_only_itself(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "repo")
    huge = _f(b"one-pebibyte")
    huge.size, huge.extents = 2**50, []  # past ext4's and most file systems' largest file
    entries = [
        _f(b"before"), huge, _d(b"dir"), _h(b"link-to-a-directory", b"dir"),
        _h(b"link-to-nothing", b"missing/file"), ManifestEntry(path=b"no-target", kind="h"),
        _f(b"after"),
    ]  # fmt: skip
    job = crafted_job(backend, entries, PAYLOAD)
    target = tmp_path / "target"
    summary = run_restore(backend, job, RestoreOptions(target=os.fsencode(target)))
    assert {f.path for f in summary.failures} == {
        "one-pebibyte", "link-to-a-directory", "link-to-nothing", "no-target",
    }  # fmt: skip
    assert not (target / "one-pebibyte").exists()
    assert (target / "before").read_bytes() == PAYLOAD
    assert (target / "after").read_bytes() == PAYLOAD
    assert (target / "dir").is_dir()
    assert [p for p in target.rglob(".cryo-*")] == []


def test_a_hard_link_whose_target_is_left_out_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x").write_bytes(b"shared")
    os.link(src / "a" / "x", src / "b" / "y")
    (src / "b" / "z").write_bytes(b"alone")
    repo = str(tmp_path / "repo")
    code, out, err = cli("backup", "-q", "--repo", repo, str(src))
    assert code == 0, err
    dest = tmp_path / "out"
    code, out, err = cli(
        "restore", out.strip(), "--repo", repo, "--to", str(dest), "--include", "b"
    )
    assert code == 1
    assert "b/y" in err and "hard link target was not restored" in err
    assert "internal error" not in err and "Traceback" not in err
    inside = dest / str(src).lstrip("/")
    assert (inside / "b" / "z").read_bytes() == b"alone"
    assert not (inside / "a").exists()


def test_restoring_hard_links_again_leaves_no_temporary_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "first").write_text("one inode, two names")
    os.link(src / "first", src / "second")
    repo = tmp_path / "repo"
    _, job, _ = backup(src, repo)
    target = tmp_path / "out"
    for overwrite in (None, "always", "if-changed"):
        extra = ("--overwrite", overwrite) if overwrite else ()
        code, _, err = cli("restore", job, "--repo", str(repo), "--to", str(target), *extra)
        assert code == 0, err
        assert sorted(p.name for p in inside(target, src).iterdir()) == ["first", "second"]
