"""The manifest: the object that commits a job and describes every entry.

A job written by ``cryo backup`` holds data objects (``data/...``) and one
object named ``manifest``. The manifest's chunks are stored like any other
(see :mod:`cryo.encoding`); their decoded bytes, concatenated in index
order, are UTF-8 JSON lines:

* the first line is a header: ``{"format": "cryo-manifest", "version": 1, ...}``;
* then one line per entry, parents before children (docs/FORMAT.md lists
  the keys);
* the last line is ``{"end": true, "entries": N}``, so a truncated manifest
  is detected.

Paths and link targets are bytes: valid UTF-8 is stored as a JSON string
(``p``), anything else as base64 under the same key with a ``b`` suffix.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from cryo.errors import CryoError

FORMAT = "cryo-manifest"
VERSION = 1
MANIFEST_OBJECT = "manifest"


class ManifestError(CryoError, ValueError):
    """A manifest that cannot be read as cryo wrote it."""


def put_bytes(record: dict[str, Any], key: str, value: bytes) -> None:
    try:
        record[key] = value.decode("utf-8")
    except UnicodeDecodeError:
        record[key + "b"] = base64.b64encode(value).decode("ascii")


def get_bytes(record: dict[str, Any], key: str) -> bytes | None:
    if key in record:
        return str(record[key]).encode("utf-8")
    if key + "b" in record:
        return base64.b64decode(record[key + "b"])
    return None


@dataclass(slots=True)
class Extent:
    """``length`` bytes of a file at ``file_offset``, found in a data object's chunk."""

    file_offset: int
    object_name: str
    chunk_index: int
    chunk_offset: int
    length: int


@dataclass(slots=True)
class ManifestEntry:
    path: bytes
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user: str | None = None
    group: str | None = None
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    dev: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    extents: list[Extent] = field(default_factory=list)
    xxh3: str | None = None
    warning: str | None = None
    _line: bytes | None = field(default=None, repr=False, compare=False)

    def encoded(self) -> bytes:
        """The entry's manifest line (UTF-8, no newline); computed once, then kept.

        Call it only once the entry is final: later changes are not seen.
        """
        if self._line is None:
            r = self.record()
            try:
                # A copy of exact size: orjson's own result keeps its whole buffer.
                self._line = bytes(memoryview(orjson.dumps(r)))
            except TypeError:  # a name that is not UTF-8 (surrogates): the slow path keeps it
                self._line = _dumps(r).encode("utf-8", "surrogateescape")
        return self._line

    def to_json(self) -> str:
        return _dumps(self.record())

    def record(self) -> dict[str, Any]:
        """The entry as the JSON object of its manifest line."""
        r: dict[str, Any] = {}
        put_bytes(r, "p", self.path)
        r["t"] = self.kind
        r["m"] = self.mode
        r["u"] = self.uid
        r["g"] = self.gid
        if self.user is not None:
            r["un"] = self.user
        if self.group is not None:
            r["gn"] = self.group
        r["mt"] = self.mtime_ns
        r["ct"] = self.ctime_ns
        r["ino"] = self.ino
        r["dev"] = self.dev
        if self.size:
            r["s"] = self.size
        if self.rdev:
            r["rd"] = self.rdev
        if self.target is not None:
            put_bytes(r, "l", self.target)
        if self.xattrs:
            r["x"] = [
                [base64.b64encode(k).decode("ascii"), base64.b64encode(v).decode("ascii")]
                for k, v in sorted(self.xattrs.items())
            ]
        if self.extents:
            r["d"] = [
                [e.file_offset, e.object_name, e.chunk_index, e.chunk_offset, e.length]
                for e in self.extents
            ]
        if self.xxh3 is not None:
            r["xx"] = self.xxh3
        if self.warning is not None:
            r["w"] = self.warning
        return r

    @classmethod
    def from_json(
        cls, r: dict[str, Any], kind_path: tuple[str, bytes] | None = None
    ) -> ManifestEntry:
        """The entry of record ``r``; ``kind_path``: its ``record_kind_path``, if known."""
        get = r.get
        i = json_int
        kind, path = kind_path or record_kind_path(r)
        x = get("x")
        extents = get("d")
        try:
            return cls(
                path,
                kind,
                i(get("m", 0)),
                i(get("u", 0)),
                i(get("g", 0)),
                get("un"),
                get("gn"),
                i(get("mt", 0)),
                i(get("ct", 0)),
                i(get("ino", 0)),
                i(get("dev", 0)),
                i(get("s", 0)),
                i(get("rd", 0)),
                get_bytes(r, "l"),
                {base64.b64decode(k): base64.b64decode(v) for k, v in x} if x else {},
                [Extent(i(a), str(b), i(c), i(d), i(e)) for a, b, c, d, e in extents]
                if extents
                else [],
                get("xx"),
                get("w"),
            )
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest entry with a malformed field: {exc}") from None


def json_int(v: Any) -> int:
    """``v`` as an int: JSON gives ints already; anything else is converted or refused."""
    return v if type(v) is int else int(v)


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def header(**fields: Any) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, **fields}, separators=(",", ":"))


def footer(entries: int) -> str:
    return json.dumps({"end": True, "entries": entries}, separators=(",", ":"))


def raw_lines(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each line of the manifest whose decoded chunks are ``chunks``, raw and parsed."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        lines = data.split(b"\n")
        carry = lines.pop()
        for line in lines:
            if line:
                try:
                    yield line, orjson.loads(line)
                except ValueError as exc:
                    raise ManifestError(f"corrupt manifest line: {exc}") from None
    if carry.strip():
        raise ManifestError("manifest ends in the middle of a line")


def parse_lines(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """JSON records of the manifest whose decoded chunks are ``chunks``."""
    return (record for _, record in raw_lines(chunks))


def check_header(head: dict[str, Any]) -> None:
    if head.get("format") != FORMAT:
        raise ManifestError("not a cryo manifest")
    if head.get("version") != VERSION:
        raise ManifestError(f"manifest version {head.get('version')} is not supported")


def raw_entries(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """The entry lines of a manifest, raw and parsed; raises ManifestError if it is not whole."""
    lines = raw_lines(chunks)
    first = next(lines, None)
    if first is None:
        raise ManifestError("empty manifest")
    check_header(first[1])
    for count, (raw, r) in enumerate(lines):
        if r.get("end") is True:
            if r.get("entries") != count:
                raise ManifestError("manifest entry count does not match its footer")
            return
        yield raw, r
    raise ManifestError("manifest is truncated (no end record)")


def read_records(
    records: Iterator[dict[str, Any]],
) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The header and the entries' JSON records; the iterator raises ManifestError
    if the footer is missing."""
    try:
        head = next(records)
    except StopIteration:
        raise ManifestError("empty manifest") from None
    check_header(head)

    def entries() -> Iterator[dict[str, Any]]:
        for count, r in enumerate(records):
            if r.get("end") is True:
                if r.get("entries") != count:
                    raise ManifestError("manifest entry count does not match its footer")
                return
            yield r
        raise ManifestError("manifest is truncated (no end record)")

    return head, entries()


def read_entries(
    records: Iterator[dict[str, Any]],
) -> tuple[dict[str, Any], Iterator[ManifestEntry]]:
    """The header and the entries; the iterator raises ManifestError if the footer is missing."""
    head, entries = read_records(records)
    return head, map(ManifestEntry.from_json, entries)


def record_kind_path(r: dict[str, Any]) -> tuple[str, bytes]:
    """An entry record's type and path, without decoding the rest of it."""
    try:
        path = get_bytes(r, "p")
    except (TypeError, ValueError) as exc:  # base64 that is not
        raise ManifestError(f"manifest entry with a malformed path: {exc}") from None
    if path is None or "t" not in r:
        raise ManifestError("entry without path or type")
    return str(r["t"]), path
