"""PutChunk throughput: ``cryo server`` over loopback against the embedded repository.

Uploads the same set of distinct 8 MiB chunks (so nothing deduplicates) with
8 concurrent callers, first into an embedded ``LocalBackend``, then through a
``cryo server`` process on 127.0.0.1 with ``RemoteBackend`` (boto3, one
connection per caller), each into a fresh repository, and prints both rates
and their ratio. Checksums are computed before timing starts, for both.

    python benchmarks/server_throughput.py [--chunks 48] [--concurrency 8]

The target is a ratio of at least 0.60 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryo.checksums import chunk_checksum
from cryo.storage.api import Backend
from cryo.storage.local import LocalBackend
from cryo.storage.remote import RemoteBackend

MIB = 1024 * 1024


def make_chunks(count: int, size: int) -> list[tuple[bytes, str]]:
    base = os.urandom(size)
    chunks = []
    for i in range(count):
        data = i.to_bytes(8, "big") + base[8:]
        chunks.append((data, chunk_checksum(data)))
    return chunks


def upload_all(backend: Backend, chunks: list[tuple[bytes, str]], concurrency: int) -> float:
    """Seconds to PutChunk every chunk (one object, indexes 0..n-1) with ``concurrency`` callers."""
    job = backend.create_job().job_id
    upload = backend.start_object(job, "benchmark")

    def put(i: int) -> None:
        data, checksum = chunks[i]
        backend.put_chunk(job, upload, i, data, len(data), checksum)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(put, range(len(chunks))))
    return time.perf_counter() - started


def start_server(workdir: Path, key: tuple[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    creds = workdir / "credentials"
    creds.write_text(f"{key[0]} {key[1]}\n")
    creds.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryo", "server", "--repo", str(workdir / "server-repo"),
         "--listen", "127.0.0.1:0", "--credentials", str(creds)],
        stdout=subprocess.PIPE, stderr=(workdir / "server.log").open("wb"),
    )  # fmt: skip
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"cryo server did not start:\n{(workdir / 'server.log').read_text()}")
    return proc, url


def measure(name: str, run: Callable[[], float], total_bytes: int) -> float:
    seconds = run()
    rate = total_bytes / MIB / seconds
    print(f"{name:<30} {seconds:7.2f} s  {rate:8.1f} MiB/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=48, help="chunks per run (default 48)")
    parser.add_argument("--size", type=int, default=8 * MIB, help="chunk size in bytes")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the repositories go")
    args = parser.parse_args()

    chunks = make_chunks(args.chunks, args.size)
    total = args.chunks * args.size
    print(
        f"{args.chunks} chunks of {args.size / MIB:g} MiB, {args.concurrency} concurrent, "
        f"{os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cryo-bench-") as tmp:
        workdir = Path(tmp)
        local = LocalBackend(workdir / "embedded-repo")
        try:
            embedded = measure(
                "embedded LocalBackend", lambda: upload_all(local, chunks, args.concurrency), total
            )
        finally:
            local.close()

        key = ("AKBENCH" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30))
        proc, url = start_server(workdir, key)
        try:
            remote = RemoteBackend(
                url,
                aws_access_key_id=key[0],
                aws_secret_access_key=key[1],
                max_connections=args.concurrency,
            )
            try:
                served = measure(
                    "cryo server (loopback)",
                    lambda: upload_all(remote, chunks, args.concurrency),
                    total,
                )
            finally:
                remote.close()
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"ratio server/embedded: {served / embedded:.2f} (target >= 0.60)")


if __name__ == "__main__":
    main()
