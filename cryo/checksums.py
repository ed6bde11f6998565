"""Checksums as the Backup Storage API carries them.

* A chunk's checksum is the base64 SHA-256 of the bytes sent (algorithm
  ``SHA256``).
* An object's checksum (algorithm ``SUMMARY``) is the base64 SHA-256 of the
  chunk checksum strings concatenated in ascending chunk index order, as the
  EBS direct API's linear checksum does. An object with no chunks has the
  SHA-256 of the empty string.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Any

CHUNK_ALGORITHM = "SHA256"
SUMMARY_ALGORITHM = "SUMMARY"


def chunk_checksum(data: bytes | bytearray | memoryview) -> str:
    """Base64 SHA-256 of ``data``."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def b64_of_digest(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def hex_of_checksum(checksum: str) -> str | None:
    """The hex SHA-256 that a base64 checksum encodes, or None if it is not one."""
    try:
        raw = base64.b64decode(checksum, validate=True)
    except (ValueError, TypeError):
        return None
    if len(raw) != 32 or b64_of_digest(raw) != checksum:
        return None
    return raw.hex()


def checksum_of_hex(hex_digest: str) -> str:
    return b64_of_digest(bytes.fromhex(hex_digest))


def summary_checksum(chunk_checksums: Iterable[str]) -> str:
    """The SUMMARY checksum of an object whose chunks have these checksums, in index order."""
    h = hashlib.sha256()
    for c in chunk_checksums:
        h.update(c.encode("ascii"))
    return b64_of_digest(h.digest())


_ZEROS = memoryview(bytes(1024 * 1024))


def hash_zeros(h: Any, n: int) -> None:
    """Feed ``n`` zero bytes to hash ``h`` (a hole, hashed as the zeros it reads as)."""
    while n > 0:
        step = min(n, len(_ZEROS))
        h.update(_ZEROS[:step])
        n -= step
