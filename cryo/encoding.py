"""Chunk encoding: the stored form of a chunk says how it was encoded.

A stored chunk is one tag byte followed by the payload:

====  ==========================================================
tag   payload
====  ==========================================================
0x00  the raw bytes
0x01  one zstd frame (content size in the frame header)
====  ==========================================================

New encodings (another compressor, encryption) get new tags; readers refuse
tags they do not know, so no format version is needed.

Compression is tried only where it pays: a 64 KiB sample of the chunk is
compressed first, and a chunk whose sample does not shrink below 90% is
stored raw without compressing the rest. A chunk whose full compression saves
less than 3% is stored raw as well. That keeps incompressible data (media,
archives, encrypted files) close to the speed of no compression at all.
"""

from __future__ import annotations

import mmap
import threading
from typing import Any

TAG_RAW = 0x00
TAG_ZSTD = 0x01

SAMPLE_BYTES = 64 * 1024
SAMPLE_MAX_RATIO = 0.90
KEEP_MAX_RATIO = 0.97

_RAW_PREFIX = bytes((TAG_RAW,))
_ZSTD_PREFIX = bytes((TAG_ZSTD,))
_local = threading.local()


class EncodingError(ValueError):
    """A stored chunk that cannot be decoded."""


def _compressor(level: int) -> Any:
    import zstandard

    cache: dict[int, Any] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> Any:
    import zstandard

    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def encode(
    data: bytes | bytearray | memoryview,
    level: int | None,
    frame: bytearray | mmap.mmap | None = None,
    lead: int = 1,
) -> bytes | bytearray | memoryview:
    """The stored form of ``data``; ``level`` None disables compression.

    ``frame``, where given, is a buffer whose bytes from byte ``lead`` (at
    least 1) are ``data``: a chunk stored raw is then moved to the frame's
    second byte (where ``lead`` is not 1), tagged in place and stored from
    the frame (no copy of the chunk elsewhere): a ``bytearray`` frame it
    fills is the stored form itself, an ``mmap`` frame is viewed. A shorter
    chunk in a ``bytearray`` frame is copied out.
    """
    view = memoryview(data)
    if level is not None and len(view) >= 64:
        c = _compressor(level)
        sample = view[:SAMPLE_BYTES]
        if len(view) <= SAMPLE_BYTES or len(c.compress(sample)) < len(sample) * SAMPLE_MAX_RATIO:
            packed: bytes = c.compress(view)
            if len(packed) < len(view) * KEEP_MAX_RATIO:
                return b"".join((_ZSTD_PREFIX, packed))
    if frame is not None:
        if lead != 1:
            memoryview(frame)[1 : 1 + len(view)] = view  # (overlapping: a memmove)
        frame[0] = TAG_RAW
        if not isinstance(frame, bytearray):
            return memoryview(frame)[: len(view) + 1]
        if len(frame) == len(view) + 1:
            return frame
        return bytes(memoryview(frame)[: len(view) + 1])
    return b"".join((_RAW_PREFIX, view))


def decode(
    stored: bytes | memoryview,
    expected_length: int | None = None,
    copy: bool = True,
    into: bytearray | mmap.mmap | None = None,
) -> bytes | memoryview:
    """The original bytes of a stored chunk.

    With ``copy`` False, a raw chunk comes back as a view into ``stored``
    (no copy of megabytes into fresh pages); a compressed one as new bytes,
    or, where ``into`` can hold them (its frame says their size), as a view
    of ``into``, decompressed there.
    """
    if len(stored) < 1:
        raise EncodingError("empty stored chunk")
    tag = stored[0]
    body = memoryview(stored)[1:]
    out: bytes | memoryview
    if tag == TAG_RAW:
        out = bytes(body) if copy else body
    elif tag == TAG_ZSTD:
        import zstandard

        try:
            size = zstandard.frame_content_size(body) if into is not None else -1
            if into is not None and 0 <= size <= len(into):
                out = memoryview(into)[:size]
                with _decompressor().stream_reader(body) as reader:
                    got = reader.readinto(out)
                if got != size:
                    raise EncodingError(f"a zstd frame of {size} bytes decoded to {got}")
            else:
                out = bytes(_decompressor().decompress(body))
        except zstandard.ZstdError as exc:
            raise EncodingError(f"corrupt zstd chunk: {exc}") from None
    else:
        raise EncodingError(f"unknown chunk encoding tag 0x{tag:02x}")
    if expected_length is not None and len(out) != expected_length:
        raise EncodingError(f"decoded {len(out)} bytes, expected {expected_length}")
    return out
