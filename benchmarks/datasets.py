"""Deterministic benchmark datasets: ``big-random``, ``big-text`` and ``small``.

Each dataset is a directory under ``WORKDIR/datasets/{full,smoke}/NAME``,
generated once and reused: a marker file ``NAME.json`` beside the directory
holds the parameters it was made with and its counts, and generation is
skipped while the marker matches. Generation writes into ``NAME.partial`` and
renames it at the end, so an interrupted run never leaves a half dataset that
looks complete.

``big-random``
    A 1 GiB and a 256 MiB file of incompressible pseudo-random bytes
    (``random.Random(seed).randbytes`` in 4 MiB blocks).
``big-text``
    About 512 MiB of compressible real text in four files: a corpus read from
    the Python standard library's sources, ``/usr/share/doc`` and
    ``/usr/share/man`` (gunzipped), cut into line-aligned pieces of 32-256 KiB
    taken at seeded random offsets, each piece with a numbered header line and
    a few letters swapped (a different seeded swap per piece). The text keeps
    the statistics of real text, yet neither fixed 4 MiB chunks nor
    content-defined chunks find repeated data in it.
``small``
    About 35,000 real files: the Python standard library (without
    ``site-packages`` and ``__pycache__``), ``/usr/share/doc``,
    ``/usr/share/man`` and, to reach the count, the rest of ``/usr/share`` in
    sorted order; copied with their modes, mtimes and symlinks, plus empty
    files, empty directories, more symlinks (relative, dangling, to a
    directory, absolute) and one file whose name is not UTF-8
    (``b'caf\\xe9.txt'``).

``--smoke`` makes tiny versions (a few MiB, a few hundred files) for CI.
Generated files and synthetic entries carry fixed mtimes, so a dataset is the
same bytes and metadata every time it is made on a given machine image (the
``small`` and ``big-text`` data depend on what that image has installed).

    python benchmarks/datasets.py [--workdir DIR] [--smoke] [--datasets small,big-text]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import stat
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = 4 * MIB
SEED = 20261121
GENERATOR_VERSION = 1
FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z, for every generated entry
DATASETS = ("big-random", "big-text", "small")
DEFAULT_WORKDIR = Path("/var/tmp/cryo-bench")  # noqa: S108 - kept across checkouts, on purpose

# Sizes and counts: (full, smoke)
RANDOM_FILES = {
    "full": (("random-1g.bin", GIB), ("random-256m.bin", 256 * MIB)),
    "smoke": (("random-1g.bin", 4 * MIB), ("random-256m.bin", 1 * MIB)),
}
TEXT_FILES = 4
TEXT_FILE_SIZE = {"full": 128 * MIB, "smoke": 768 * 1024}
TEXT_CORPUS = {"full": 96 * MIB, "smoke": 3 * MIB}
SMALL_FILES = {"full": 35_000, "smoke": 300}
SMALL_EXTRAS = {"full": (50, 20), "smoke": (5, 3)}  # empty files, empty directories
SMALL_MAX_FILE = {"full": 1 << 62, "smoke": 256 * 1024}  # larger files are left out


@dataclass
class DatasetInfo:
    """A generated dataset: where it is and what it holds."""

    name: str
    path: str
    files: int
    dirs: int
    symlinks: int
    bytes: int  # sum of regular file sizes
    params: dict[str, object]

    def describe(self) -> str:
        return (
            f"{self.name}: {self.files} files, {self.dirs} directories, "
            f"{self.symlinks} symlinks, {self.bytes} bytes ({self.bytes / MIB:.1f} MiB) "
            f"in {self.path}"
        )


def mode_name(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def dataset_dir(workdir: Path, name: str, smoke: bool) -> Path:
    """Where dataset ``name`` lives under ``workdir``."""
    return workdir / "datasets" / mode_name(smoke) / name


def params_for(name: str, smoke: bool) -> dict[str, object]:
    """Everything that decides a dataset's content; a change regenerates it."""
    mode = mode_name(smoke)
    params: dict[str, object] = {
        "name": name,
        "mode": mode,
        "seed": SEED,
        "version": GENERATOR_VERSION,
    }
    if name == "big-random":
        params["files"] = [list(x) for x in RANDOM_FILES[mode]]
    elif name == "big-text":
        params.update(files=TEXT_FILES, file_size=TEXT_FILE_SIZE[mode], corpus=TEXT_CORPUS[mode])
    elif name == "small":
        params.update(
            files=SMALL_FILES[mode],
            extras=list(SMALL_EXTRAS[mode]),
            max_file=SMALL_MAX_FILE[mode],
            stdlib=stdlib_dir(),
        )
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return params


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def ensure(workdir: Path, name: str, smoke: bool, *, force: bool = False) -> DatasetInfo:
    """The dataset ``name``, generated now unless a matching marker says it exists."""
    target = dataset_dir(workdir, name, smoke)
    marker = target.with_name(name + ".json")
    params = params_for(name, smoke)
    if not force and marker.exists() and target.is_dir():
        try:
            info = DatasetInfo(**json.loads(marker.read_text()))
        except (ValueError, TypeError):
            info = None
        if info is not None and info.params == params:
            return info
    partial = target.with_name(name + ".partial")
    for old in (partial, target):
        if old.is_symlink() or old.exists():
            shutil.rmtree(old)
    marker.unlink(missing_ok=True)
    partial.mkdir(parents=True)
    GENERATORS[name](partial, mode_name(smoke))
    partial.rename(target)
    files, dirs, links, size = count_tree(target)
    info = DatasetInfo(name, str(target), files, dirs, links, size, params)
    tmp = marker.with_suffix(".json.new")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    tmp.replace(marker)
    return info


def count_tree(root: Path) -> tuple[int, int, int, int]:
    """Regular files, directories (the root excluded), symlinks and file bytes under root."""
    files = dirs = links = size = 0
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                links += 1
            elif stat.S_ISDIR(st.st_mode):
                dirs += 1
            elif stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, dirs, links, size


def _fix_mtime(path: Path | bytes) -> None:
    os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)


# -- big-random ----------------------------------------------------------------------


def make_big_random(root: Path, mode: str) -> None:
    for i, (name, size) in enumerate(RANDOM_FILES[mode]):
        rng = random.Random(SEED + i)
        path = root / name
        with path.open("wb") as f:
            left = size
            while left:
                n = min(BLOCK, left)
                f.write(rng.randbytes(n))
                left -= n
        _fix_mtime(path)
    _fix_mtime(root)


# -- big-text ------------------------------------------------------------------------


def _text_sources() -> list[Path]:
    """Candidate text files: stdlib sources, /usr/share/doc and /usr/share/man, sorted."""
    found: list[Path] = []
    stdlib = Path(stdlib_dir())
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    for top in (Path("/usr/share/doc"), Path("/usr/share/man")):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            found += [Path(dirpath) / f for f in sorted(filenames)]
    return found


def _read_text(path: Path) -> bytes | None:
    """A file's text (gunzipped if it ends in .gz), or None for binary or unreadable files."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return None
    if not data or b"\0" in data[:8192]:
        return None
    return data if data.endswith(b"\n") else data + b"\n"


def text_corpus(limit: int) -> bytes:
    """About ``limit`` bytes of real text from files picked in a seeded order."""
    sources = _text_sources()
    random.Random(SEED).shuffle(sources)
    parts: list[bytes] = []
    total = 0
    for path in sources:
        data = _read_text(path)
        if data is None:
            continue
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    if total == 0:
        raise RuntimeError("no text found in the standard library, /usr/share/doc or man")
    return b"".join(parts)


_LOWER = b"abcdefghijklmnopqrstuvwxyz"


def _swap_table(rng: random.Random, pairs: int) -> bytes:
    """A translation table that swaps ``pairs`` random letter pairs (both cases)."""
    letters = list(_LOWER)
    picked = rng.sample(range(26), 2 * pairs)
    for a, b in zip(picked[::2], picked[1::2], strict=True):
        letters[a], letters[b] = letters[b], letters[a]
    swapped = bytes(letters)
    return bytes.maketrans(_LOWER + _LOWER.upper(), swapped + swapped.upper())


def text_pieces(corpus: bytes, rng: random.Random) -> Iterator[bytes]:
    """Endless line-aligned pieces of the corpus, each numbered and lightly varied."""
    n = 0
    size = len(corpus)
    while True:
        start = rng.randrange(size)
        nl = corpus.find(b"\n", start)
        start = 0 if nl < 0 or nl + 1 >= size else nl + 1
        end = corpus.find(b"\n", min(size, start + rng.randrange(32 * 1024, 256 * 1024)))
        end = size if end < 0 else end + 1
        header = b"==== piece %d, offset %d ====\n" % (n, start)
        yield header + corpus[start:end].translate(_swap_table(rng, 3))
        n += 1


def make_big_text(root: Path, mode: str) -> None:
    corpus = text_corpus(TEXT_CORPUS[mode])
    pieces = text_pieces(corpus, random.Random(SEED))
    size = TEXT_FILE_SIZE[mode]
    for i in range(TEXT_FILES):
        path = root / f"text-{i + 1}.txt"
        with path.open("wb") as f:
            left = size
            while left:
                piece = next(pieces)[:left]
                f.write(piece)
                left -= len(piece)
        _fix_mtime(path)
    _fix_mtime(root)


# -- small ---------------------------------------------------------------------------


def _small_sources() -> list[tuple[str, Path, tuple[str, ...]]]:
    """(directory name in the dataset, source tree, top-level names skipped in it)."""
    return [
        ("stdlib", Path(stdlib_dir()), ("site-packages",)),
        ("usr-share-doc", Path("/usr/share/doc"), ()),
        ("usr-share-man", Path("/usr/share/man"), ()),
        ("usr-share", Path("/usr/share"), ("doc", "man")),
    ]


def _copy_tree(src: Path, dst: Path, skip: tuple[str, ...], budget: int, max_file: int) -> int:
    """Copy ``src`` to ``dst`` in sorted order until ``budget`` regular files are copied.

    ``skip`` names are left out at the top level, ``__pycache__`` everywhere,
    and so are files larger than ``max_file`` bytes.
    Modes, mtimes and symlinks are kept; special files and unreadable files are
    skipped. Returns the number of regular files copied.
    """
    copied = 0
    dst.mkdir()
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        if copied >= budget:
            break
        if entry.name in skip or entry.name == "__pycache__":
            continue
        target = dst / entry.name
        try:
            if entry.is_symlink():
                target.symlink_to(os.readlink(entry.path))
                os.utime(target, ns=_mtime_ns(entry), follow_symlinks=False)
            elif entry.is_dir():
                copied += _copy_tree(Path(entry.path), target, (), budget - copied, max_file)
            elif entry.is_file() and entry.stat(follow_symlinks=False).st_size <= max_file:
                shutil.copy2(entry.path, target, follow_symlinks=False)
                copied += 1
        except PermissionError:
            continue
    shutil.copystat(src, dst, follow_symlinks=False)
    return copied


def _mtime_ns(entry: os.DirEntry[str]) -> tuple[int, int]:
    st = entry.stat(follow_symlinks=False)
    return st.st_atime_ns, st.st_mtime_ns


def make_small(root: Path, mode: str) -> None:
    budget = SMALL_FILES[mode]
    sources = _small_sources()
    if mode == "smoke":  # a little of each kind of file, not just the first source
        quotas = [budget // 3, budget // 3, budget - 2 * (budget // 3), 0]
    else:
        quotas = [budget] * len(sources)
    for (name, src, skip), quota in zip(sources, quotas, strict=True):
        quota = min(quota, budget)
        if quota <= 0 or not src.is_dir():
            continue
        budget -= _copy_tree(src, root / name, skip, quota, SMALL_MAX_FILE[mode])
    _make_extras(root / "extra", *SMALL_EXTRAS[mode])
    _fix_mtime(root)


def _make_extras(extra: Path, empty_files: int, empty_dirs: int) -> None:
    """Empty files and directories, symlinks of every kind, a non-UTF-8 file name."""
    (extra / "empty-files").mkdir(parents=True)
    for i in range(empty_files):
        path = extra / "empty-files" / f"empty-{i:03d}"
        path.touch()
        _fix_mtime(path)
    (extra / "empty-dirs").mkdir()
    for i in range(empty_dirs):
        path = extra / "empty-dirs" / f"dir-{i:03d}"
        path.mkdir()
        _fix_mtime(path)
    links = extra / "links"
    links.mkdir()
    (links / "file.txt").write_text("the target of some symlinks\n")
    _fix_mtime(links / "file.txt")
    for name, target in (
        ("to-file", "file.txt"),
        ("to-dir", "../empty-dirs"),
        ("dangling", "does-not-exist"),
        ("absolute", "/nonexistent/absolute/target"),
    ):
        (links / name).symlink_to(target)
        _fix_mtime(links / name)
    odd = os.path.join(os.fsencode(extra), b"caf\xe9.txt")
    with open(odd, "wb") as f:
        f.write(b"a file whose name is Latin-1, not UTF-8: caf\xe9\n")
    os.chmod(odd, 0o640)  # noqa: PTH101 - the name is bytes, which pathlib cannot hold
    _fix_mtime(odd)
    for path in (links, extra / "empty-files", extra / "empty-dirs", extra):
        _fix_mtime(path)


GENERATORS: dict[str, Callable[[Path, str], None]] = {
    "big-random": make_big_random,
    "big-text": make_big_text,
    "small": make_small,
}


def parse_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in DATASETS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where datasets go (default {DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--datasets",
        type=parse_names,
        default=list(DATASETS),
        help="comma-separated names (default: all)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny versions for CI")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    for name in args.datasets:
        started = time.perf_counter()
        info = ensure(args.workdir.resolve(), name, args.smoke, force=args.force)
        print(f"{info.describe()} [{time.perf_counter() - started:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
