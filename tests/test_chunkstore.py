"""The file chunk store keeps every byte of every chunk, whatever its length or pieces."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import random
import socket
import threading
from pathlib import Path

import pytest

from cryo import directio
from cryo.directio import BUFFERS, send_file
from cryo.storage.chunkstore import FileChunkStore

from .storage_helpers import refuse_direct_io
from .test_backup import cached_share, evict_from_page_cache

MiB = 1024 * 1024
LENGTHS = [0, 1, 511, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 5, 4 * MiB]


def _store_in_pieces(store: FileChunkStore, data: bytes, rng: random.Random) -> str:
    key = hashlib.sha256(data).hexdigest()
    w = store.writer()
    at = 0
    while at < len(data):
        n = rng.choice([1, 100, 4096, 70_000, MiB, 2 * MiB + 3])
        w.write(memoryview(data)[at : at + n])
        at += n
    w.commit(key)
    return key


@pytest.mark.parametrize("direct", [True, False])
def test_chunks_of_every_length_read_back_exactly(tmp_path: Path, direct: bool) -> None:
    store = FileChunkStore(tmp_path, direct=direct)
    rng = random.Random(len(LENGTHS))
    for length in LENGTHS:
        data = rng.randbytes(length)
        key = _store_in_pieces(store, data, rng)
        assert store.get(key) == data
        assert store.path_of(key).stat().st_size == length  # no padding left behind
        store.put(key + "-whole", data)  # the one-call path
        assert store.get(key + "-whole") == data
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("direct", [True, False])
def test_chunks_received_from_a_stream_are_stored_exactly(tmp_path: Path, direct: bool) -> None:
    """Bytes read straight into the writer's buffer, in pieces of any size, as a server reads."""
    store = FileChunkStore(tmp_path, direct=direct)
    rng = random.Random(7)
    for length in LENGTHS:
        data = rng.randbytes(length)
        stream = io.BytesIO(data)
        w = store.writer()
        received = bytearray()
        while len(received) < length:
            piece = w.receive(stream.readinto, rng.choice([1, 4096, 70_000, MiB, 3 * MiB]))
            assert piece, "the stream ended early"
            received += piece
            piece.release()
        key = hashlib.sha256(data).hexdigest()
        w.commit(key)
        assert received == data  # what the caller hashed is what was stored
        assert store.get(key) == data
        assert store.path_of(key).stat().st_size == length


def refuse_direct_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct opens succeed but direct writes fail, as on a file system that checks late."""
    real_write = os.write

    def refusing_write(fd: int, data: bytes) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_write)


@pytest.mark.parametrize("how", ["write", "receive"])
def test_direct_writes_refused_after_the_open_keep_every_byte_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    refuse_direct_writes(monkeypatch)
    rng = random.Random(8)
    for length in (MiB + 1, 2 * MiB + 3, 3 * MiB + MiB // 2, 4 * MiB):
        store = FileChunkStore(tmp_path / str(length))
        data = rng.randbytes(length)
        key = hashlib.sha256(data).hexdigest()
        if how == "write":
            _store_in_pieces(store, data, rng)
        else:
            w = store.writer()
            stream = io.BytesIO(data)
            while piece := w.receive(stream.readinto, rng.choice([4096, 700_000, MiB])):
                piece.release()
            w.commit(key)
        assert store.get(key) == data
        assert store.direct is False


def test_a_body_that_breaks_off_leaves_no_temporary_and_its_own_error(tmp_path: Path) -> None:
    """The client's reading fails (its traceback still holding the buffer): abort cleans up."""
    store = FileChunkStore(tmp_path)

    def breaking(view: memoryview) -> int:
        view[:10] = b"x" * 10
        raise ConnectionResetError("the client went away")

    w = store.writer()
    kept: list[BaseException] = []
    try:
        w.receive(breaking, MiB)
    except ConnectionResetError as exc:
        kept.append(exc)  # as a server's error report would keep it
    spare = [BUFFERS.take() for _ in range(BUFFERS.KEEP)]
    for buf in spare:
        BUFFERS.give(buf)  # the pool is full: the writer's buffer is closed when it comes back
    w.abort()
    assert kept and list((tmp_path / "tmp").iterdir()) == []


def test_a_file_system_without_direct_io_gets_ordinary_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_direct_io(monkeypatch)
    store = FileChunkStore(tmp_path)
    data = random.Random(1).randbytes(3 * MiB + 5)
    key = _store_in_pieces(store, data, random.Random(2))
    assert store.get(key) == data
    assert store.direct is False  # not tried again for every chunk


def test_chunk_files_on_disk_are_read_without_filling_the_page_cache(tmp_path: Path) -> None:
    store = FileChunkStore(tmp_path)
    rng = random.Random(3)
    for length in (MiB, MiB + 1, 3 * MiB + 5, 4 * MiB):
        data = rng.randbytes(length)
        key = _store_in_pieces(store, data, rng)
        path = store.path_of(key)
        assert evict_from_page_cache(path)
        assert store.get(key) == data
        assert cached_share(path) == 0.0
        path.read_bytes()
        assert cached_share(path) == 1.0
        assert store.get(key) == data  # a cached file: the ordinary read


def test_a_chunk_file_on_disk_is_read_where_direct_reads_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileChunkStore(tmp_path)
    data = random.Random(4).randbytes(2 * MiB + 7)
    key = _store_in_pieces(store, data, random.Random(5))
    assert evict_from_page_cache(store.path_of(key))
    refuse_direct_io(monkeypatch)
    assert store.get(key) == data
    assert store.direct_reads is False


def _sent(path: Path) -> bytes:
    """What ``send_file`` puts on a socket for the whole file at ``path``."""
    length = path.stat().st_size
    a, b = socket.socketpair()
    got = bytearray()

    def receive() -> None:
        while piece := b.recv(MiB):
            got.extend(piece)

    with a, b, path.open("rb") as f:
        reader = threading.Thread(target=receive)
        reader.start()
        assert send_file(a, f, length) == length
        a.shutdown(socket.SHUT_WR)
        reader.join()
    return bytes(got)


def refuse_direct_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct opens succeed but direct reads fail, as on a file system that checks late."""
    real_preadv = os.preadv

    def refusing_preadv(fd: int, buffers: list[memoryview], offset: int, *rest: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", refusing_preadv)


@pytest.mark.parametrize("refused", [None, "at the open", "at the read"])
def test_chunk_files_are_sent_whole_from_disk_or_from_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str | None
) -> None:
    store = FileChunkStore(tmp_path)
    rng = random.Random(6)
    monkeypatch.setattr(directio, "_send_direct", True)  # a refusal is remembered: undo it after
    if refused == "at the open":
        refuse_direct_io(monkeypatch)
    elif refused == "at the read":
        refuse_direct_reads(monkeypatch)
    for length in (4096, MiB + 1, 4 * MiB):
        data = rng.randbytes(length)
        path = store.path_of(_store_in_pieces(store, data, rng))
        assert evict_from_page_cache(path)
        assert _sent(path) == data  # cold: read around the page cache (unless refused)
        assert cached_share(path) == (1.0 if refused else 0.0)
        assert _sent(path) == data  # now from the page cache when it was read through it


def test_aborted_writer_leaves_nothing(tmp_path: Path) -> None:
    store = FileChunkStore(tmp_path)
    w = store.writer()
    w.write(b"x" * (MiB + 3))
    w.abort()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list(store.keys()) == []
