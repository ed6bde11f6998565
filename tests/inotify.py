"""Which files a process opens, seen from outside it (inotify IN_OPEN)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from pathlib import Path

IN_OPEN = 0x20
IN_ISDIR = 0x40000000


class Opened:
    """Names opened in some directories, as inotify reports them (IN_OPEN)."""

    def __init__(self, *dirs: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.dirs: dict[int, Path] = {}
        for d in dirs:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(d), IN_OPEN)
            assert wd >= 0, ctypes.get_errno()
            self.dirs[wd] = d

    @classmethod
    def tree(cls, root: Path) -> Opened:
        """Watch ``root`` and every directory under it."""
        return cls(root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()))

    def events(self, timeout: float = 0.0) -> list[tuple[Path, bytes, int]]:
        """(watched directory, name or b"" for the directory itself, mask) of new events."""
        out = []
        while select.select([self.fd], [], [], timeout)[0]:
            buf = os.read(self.fd, 1 << 16)
            pos = 0
            while pos < len(buf):
                wd, mask, _, size = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + size].rstrip(b"\0")
                pos += 16 + size
                out.append((self.dirs[wd], name, mask))
            timeout = 0
        return out

    def opened_files(self) -> set[Path]:
        """The files (not directories) opened since the last call."""
        return {
            d / os.fsdecode(name)
            for d, name, mask in self.events(0.2)
            if name and not mask & IN_ISDIR
        }

    def close(self) -> None:
        os.close(self.fd)
