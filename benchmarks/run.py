"""Benchmark cryo (embedded and through ``cryo server``) against restic and borg.

One command runs everything and writes the report:

    python benchmarks/run.py [--datasets big-random,big-text,small] [--reps 3]
                             [--tools cryo-embedded,cryo-server,restic,borg]
                             [--smoke] [--workdir DIR] [--results-dir DIR]

For each dataset (see ``datasets.py``; generated on first use) it first
measures the machine's limits on that data: reading it with
``tar -cf - DIR | cat > /dev/null``, then SHA-256, xxh3-128 and zstd levels 1
and 3 on up to 256 MiB of its bytes, and on a dataset of many files the
restore floor (``measure_create``). The same untimed read is repeated right
before each tool's repetition, so that every tool finds the dataset in the
page cache alike (borg drops the pages it read, and this kind of virtual
machine shrinks its page cache by itself). Then, for each repetition, each tool in
turn (the order rotates from one repetition to the next, so drift of the
machine hits all tools alike) runs four steps against a fresh repository:

``backup-full``
    first backup of the dataset;
``backup-nochange``
    the same backup again with nothing changed (incremental where the tool is);
``backup-touched``
    again after 1% of the regular files (at least one) were changed: a few bytes
    rewritten in the middle (appended to empty files), which also bumps their
    mtime. The change is undone right after this step (bytes, size and mtime put
    back), so every repetition and tool starts from the same pristine dataset;
``restore``
    full restore of the first backup into a new directory, then checked against
    the dataset (type, size and content hash of every file, symlink targets,
    modes, mtimes to the second): a failed check marks the figure invalid.
    Restored trees are kept until the end of the run, since deleting many files
    slows later file creation on some file systems for minutes.

Each step runs as a child process whose wall time, CPU time (user + system,
from ``wait4``) and peak memory are recorded (``ru_maxrss``, or, when higher, the
peak of the summed ``Pss`` of the command and all its processes, sampled every
50 ms: a restore may share its work among processes); for ``cryo-server``
also the server's peak RSS (``VmHWM``, reset before each step through
``/proc/PID/clear_refs``) and CPU time per step. The repository's size is
taken after the first backup. A tool that is not installed is reported absent;
a step that fails or times out is recorded with its stderr and the run goes on
(the exit status is then 1).

Results go to ``RESULTS_DIR/results.md`` (tables of medians, ratios to restic
and borg and to the machine limits, failures), ``results.json`` (every raw
sample) and ``results.png`` (a chart, when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import xxhash
import zstandard

MIB = 1024 * 1024
GIB = 1024 * MIB
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TOOLS = ("cryo-embedded", "cryo-server", "restic", "borg")
STEPS = ("backup-full", "backup-nochange", "backup-touched", "restore")
LIMIT_SAMPLE = 256 * MIB
TOUCH_FRACTION = 0.01
TOUCH_BYTES = 16
SERVER_KEY_ID = "AKBENCH0000000001"
REGION = "us-east-1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the issues: cryo's wall time as a fraction of the faster of restic and borg.
WALL_TARGETS: dict[tuple[str, str], float] = {
    ("backup-full", "cryo-embedded"): 0.5,
    ("backup-full", "cryo-server"): 0.75,
    ("restore", "cryo-embedded"): 0.5,
    ("restore", "cryo-server"): 0.75,
}
# Incremental targets apply to the small dataset (the one with many files).
INCREMENTAL_TARGETS: dict[tuple[str, str], float] = {
    ("backup-nochange", "cryo-embedded"): 0.5,
    ("backup-touched", "cryo-embedded"): 0.5,
}
RSS_TARGET = 1.5  # cryo's peak RSS as a multiple of restic's, first backup and restore


FINDINGS: list[str] = []  # odd things seen along the way, for the report


class BenchError(Exception):
    """A step could not be set up or run; recorded, and the run goes on."""


# -- running and measuring a child process --------------------------------------------


@dataclass
class Proc:
    """One finished child process and what it used."""

    returncode: int
    wall: float
    cpu: float  # user + system seconds, the child and its reaped children
    maxrss_kib: int
    stdout: str
    stderr_tail: str
    timed_out: bool

    def failure(self) -> str | None:
        if self.timed_out:
            return f"timed out after {self.wall:.0f} s; stderr: {self.stderr_tail}"
        if self.returncode != 0:
            return f"exit {self.returncode}; stderr: {self.stderr_tail}"
        return None


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# A child's ru_maxrss starts from the RSS of the process that forked it (the kernel
# carries the parent's high-water mark over through fork and exec), and this
# process holds datasets' manifests and a 256 MiB sample. So every measured
# command is started by this small launcher (python -S: about 8 MiB), which
# spawns it, waits for it with wait4 and writes its exit status, wall time, CPU
# time and peak RSS to the file named first.
#
# ru_maxrss is the peak of the largest single process, so for a command that runs
# several processes at once (a cryo restore shares a job of many files among
# processes) the launcher also samples, every 50 ms, the sum of the proportional set
# sizes (Pss: each shared page counted once, split among its sharers) of the command
# and all its descendants. The figure reported is the larger of the two; for a
# single process it is its ru_maxrss.
LAUNCHER = """
import os, sys, threading, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
peak = [0]
done = threading.Event()
def tree(p):
    out = [p]
    try:
        for t in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{t}/children") as f:
                for c in f.read().split():
                    out += tree(int(c))
    except OSError:
        pass
    return out
def sample():
    while not done.wait(0.05):
        total = 0
        for p in tree(pid):
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1])
                            break
            except OSError:
                pass
        peak[0] = max(peak[0], total)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - started
done.set()
with open(report, "w") as f:
    f.write(f"{status} {wall!r} {ru.ru_utime + ru.ru_stime!r} {max(ru.ru_maxrss, peak[0])}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(
    cmd: Sequence[str], *, env: dict[str, str], log: Path, timeout: float, cwd: Path | None = None
) -> Proc:
    """Run ``cmd`` to the end; its wall time and rusage (from wait4), output in ``log``.*."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    usage_path = log.with_suffix(".usage")
    usage_path.unlink(missing_ok=True)
    lock = threading.Lock()
    state = {"done": False, "killed": False}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        err.write((" ".join(cmd) + "\n").encode())
        err.flush()
        started = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", LAUNCHER, str(usage_path), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

        def kill() -> None:
            with lock:
                if not state["done"]:
                    state["killed"] = True
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            # Wait without reaping, so the timer can never signal a recycled pid.
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            with lock:
                state["done"] = True
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - started
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    proc = Proc(
        returncode=p.returncode,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_kib=usage.ru_maxrss,  # the launcher's: replaced below by the command's own
        stdout=out_path.read_text(errors="replace"),
        stderr_tail=_tail(err_path),
        timed_out=state["killed"],
    )
    with contextlib.suppress(OSError, ValueError, IndexError):  # (none written: a full disk)
        fields = usage_path.read_text().split()
        proc.returncode = os.waitstatus_to_exitcode(int(fields[0]))
        proc.wall, proc.cpu, proc.maxrss_kib = float(fields[1]), float(fields[2]), int(fields[3])
    return proc


def which(name: str) -> str | None:
    return shutil.which(name)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any CRYO_, AWS_, RESTIC_ or BORG_ setting, plus ``extra``."""
    prefixes = ("CRYO_", "AWS_", "RESTIC_", "BORG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def version_of(cmd: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "unknown"


# -- what a dataset holds, and checking a restored copy against it ---------------------


@dataclass(frozen=True)
class Entry:
    """One entry of a tree: what a restore must reproduce."""

    kind: str  # "f" file, "d" directory, "l" symlink, "o" other
    size: int = 0
    digest: str = ""
    mode: int = 0
    mtime: int = 0  # whole seconds
    target: bytes = b""


Manifest = dict[bytes, Entry]


def file_digest(path: bytes) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return str(h.hexdigest())


def build_manifest(root: Path) -> Manifest:
    """Every entry under ``root`` (the root itself as b''), files hashed with xxh3-128."""
    manifest: Manifest = {}
    base = os.fsencode(root)

    def add(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        mtime = int(st.st_mtime)
        if stat.S_ISREG(st.st_mode):
            entry = Entry("f", st.st_size, file_digest(path), mode, mtime)
        elif stat.S_ISDIR(st.st_mode):
            entry = Entry("d", mode=mode, mtime=mtime)
        elif stat.S_ISLNK(st.st_mode):
            entry = Entry("l", target=os.readlink(path))
        else:
            entry = Entry("o", mode=mode)
        manifest[rel] = entry

    add(base, b"")
    for dirpath, dirnames, filenames in os.walk(base):
        reldir = os.path.relpath(dirpath, base)
        for name in dirnames + filenames:
            rel = name if reldir == b"." else os.path.join(reldir, name)
            add(os.path.join(dirpath, name), rel)
    return manifest


def manifest_digest(manifest: Manifest) -> str:
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(rel + b"\0" + repr(manifest[rel]).encode() + b"\n")
    return h.hexdigest()


@dataclass
class CheckResult:
    errors: int = 0
    notes: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def add(self, message: str, *, error: bool = True) -> None:
        if error:
            self.errors += 1
        else:
            self.notes += 1
        if len(self.examples) < 12:
            self.examples.append(("" if error else "note: ") + message)


def check_restore(restored: Path, expected: Manifest) -> CheckResult:
    """Compare a restored tree with the dataset's manifest.

    Errors (the figure becomes invalid): a missing or extra entry, a different
    type, file size, content, file or directory mode, file mtime (to the
    second) or symlink target. Notes (reported, tolerated): a directory's
    mtime, which tools set with varying care.
    """
    result = CheckResult()
    if not restored.is_dir():
        result.add(f"restored tree not found at {restored}")
        return result
    got = build_manifest(restored)
    for rel, want in sorted(expected.items()):
        name = os.fsdecode(rel) or "."
        have = got.get(rel)
        if have is None:
            result.add(f"missing: {name}")
        elif have.kind != want.kind:
            result.add(f"type {have.kind} instead of {want.kind}: {name}")
        elif want.kind == "f":
            if have.size != want.size or have.digest != want.digest:
                result.add(f"content differs ({have.size} bytes, {want.size} expected): {name}")
            if have.mode != want.mode:
                result.add(f"mode {have.mode:o} instead of {want.mode:o}: {name}")
            if have.mtime != want.mtime:
                result.add(f"mtime {have.mtime} instead of {want.mtime}: {name}")
        elif want.kind == "l":
            if have.target != want.target:
                result.add(f"symlink target {have.target!r} instead of {want.target!r}: {name}")
        elif want.kind == "d":
            if have.mode != want.mode:
                result.add(f"mode {have.mode:o} instead of {want.mode:o}: {name}")
            if have.mtime != want.mtime:
                result.add(
                    f"directory mtime {have.mtime} instead of {want.mtime}: {name}", error=False
                )
    for rel in sorted(set(got) - set(expected)):
        result.add(f"unexpected entry: {os.fsdecode(rel)}")
    return result


# -- touching 1% of the files, and undoing it ----------------------------------------


@dataclass
class Touch:
    path: str  # fsdecoded; fsencode gives the bytes back
    offset: int
    original: str  # hex of the bytes overwritten (empty: bytes were appended)
    size: int
    atime_ns: int
    mtime_ns: int


def touch_plan(manifest: Manifest) -> list[bytes]:
    """The regular files to change: 1% of them (at least one), picked with a fixed seed."""
    files = sorted(rel for rel, e in manifest.items() if e.kind == "f")
    count = min(len(files), max(1, round(len(files) * TOUCH_FRACTION)))
    return sorted(random.Random(datasets.SEED).sample(files, count))


@contextlib.contextmanager
def touched(root: Path, plan: list[bytes], journal: Path) -> Iterator[None]:
    """Change the planned files for the duration of the block, then put them back.

    What is needed to undo the change is written to ``journal`` first, so a run
    that dies in between is undone by the next run (``undo_journal``).
    """
    base = os.fsencode(root)
    touches: list[Touch] = []
    for rel in plan:
        path = os.path.join(base, rel)
        st = os.lstat(path)
        offset = st.st_size // 2
        with open(path, "rb") as f:
            f.seek(offset)
            original = f.read(TOUCH_BYTES)
        touches.append(
            Touch(
                os.fsdecode(path),
                offset,
                original.hex(),
                st.st_size,
                st.st_atime_ns,
                st.st_mtime_ns,
            )
        )
    journal.write_text(json.dumps([asdict(t) for t in touches]))
    try:
        for t in touches:
            original = bytes.fromhex(t.original)
            with open(os.fsencode(t.path), "r+b") as f:
                if original:
                    f.seek(t.offset)
                    f.write(bytes(b ^ 0xFF for b in original))
                else:
                    f.seek(0, os.SEEK_END)
                    f.write(b"touched by the benchmark\n"[:TOUCH_BYTES])
        yield
    finally:
        undo_journal(journal)


def undo_journal(journal: Path) -> int:
    """Put back the files a ``touched`` block changed; the number of files restored."""
    if not journal.exists():
        return 0
    touches = [Touch(**t) for t in json.loads(journal.read_text())]
    for t in touches:
        path = os.fsencode(t.path)
        with open(path, "r+b") as f:
            f.seek(t.offset)
            f.write(bytes.fromhex(t.original))
            f.truncate(t.size)
        os.utime(path, ns=(t.atime_ns, t.mtime_ns))
    journal.unlink()
    return len(touches)


# -- the tools -----------------------------------------------------------------------


@dataclass
class RepDirs:
    """Where one (dataset, tool, repetition) keeps its repository, caches and logs."""

    base: Path  # repository and caches; deleted after the repetition
    logs: Path
    restore: Path  # restore target; kept until the end of the run
    timeout: float

    @property
    def repo(self) -> Path:
        return self.base / "repo"

    @property
    def cache(self) -> Path:
        return self.base / "cache"


class Tool:
    """A backup tool driven through its command line."""

    name = ""

    def available(self) -> str | None:
        """The tool's version, or None when it is not installed."""
        raise NotImplementedError

    def prepare(self, d: RepDirs) -> None:
        """A fresh, empty repository (not timed)."""

    def backup(self, d: RepDirs, source: Path, n: int) -> tuple[Proc, str | None]:
        """Backup number ``n`` of ``source``: the process and a reference to restore it."""
        raise NotImplementedError

    def restore(self, d: RepDirs, ref: str, target: Path) -> Proc:
        raise NotImplementedError

    def repo_path(self, d: RepDirs) -> Path:
        return d.repo

    def step_begin(self) -> None:
        """Called right before a timed step."""

    def step_end(self) -> tuple[int | None, float | None]:
        """Server peak RSS (KiB) and CPU seconds during the step, for tools with a server."""
        return None, None

    def finish(self, d: RepDirs) -> None:
        """Stop whatever ``prepare`` started."""


def byte_compile_cryo() -> None:
    """Compile cryo's modules ahead of the run, as installing a package does.

    pip compiles a package's modules when it installs it; an editable
    install run with ``PYTHONDONTWRITEBYTECODE`` set would instead compile
    every module changed since its last bytecode at every start (tens of
    milliseconds per command), which no installed copy pays.
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("cryo")
    if spec is not None and spec.origin is not None:
        compileall.compile_dir(str(Path(spec.origin).parent), quiet=1)


class CryoEmbedded(Tool):
    name = "cryo-embedded"

    def available(self) -> str | None:
        byte_compile_cryo()
        return f"cryo {importlib.metadata.version('cryo')} ({git_revision()})"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "cryo"]

    def where(self, d: RepDirs) -> list[str]:
        return ["--repo", str(d.repo)]

    def env(self, d: RepDirs) -> dict[str, str]:
        return clean_env(XDG_CACHE_HOME=str(d.cache))

    def backup(self, d: RepDirs, source: Path, n: int) -> tuple[Proc, str | None]:
        cmd = [*self.command(), "backup", str(source), *self.where(d), "--quiet"]
        p = run_measured(cmd, env=self.env(d), log=d.logs / f"backup-{n}", timeout=d.timeout)
        lines = p.stdout.split()
        return p, (lines[-1] if lines else None)

    def restore(self, d: RepDirs, ref: str, target: Path) -> Proc:
        cmd = [*self.command(), "restore", ref, *self.where(d), "--to", str(target), "--quiet"]
        return run_measured(cmd, env=self.env(d), log=d.logs / "restore", timeout=d.timeout)


class CryoServer(CryoEmbedded):
    """cryo as a client of a ``cryo server`` on 127.0.0.1 (both on this machine)."""

    name = "cryo-server"

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.secret = ""
        self.step_cpu = 0.0
        self.can_reset_peak = True
        self.server_usage: dict[str, float] = {}

    def repo_path(self, d: RepDirs) -> Path:
        return d.base / "server-repo"

    def prepare(self, d: RepDirs) -> None:
        d.base.mkdir(parents=True, exist_ok=True)
        d.logs.mkdir(parents=True, exist_ok=True)
        self.secret = hashlib.sha256(os.urandom(32)).hexdigest()
        creds = d.base / "credentials"
        creds.touch(mode=0o600)
        creds.write_text(f"{SERVER_KEY_ID} {self.secret}\n")
        creds.chmod(0o600)
        url_file = d.logs / "server.out"
        cmd = [
            *self.command(),
            "server",
            "--repo",
            str(self.repo_path(d)),
            "--listen",
            "127.0.0.1:0",
            "--credentials",
            str(creds),
            "--region",
            REGION,
        ]
        with url_file.open("wb") as out, (d.logs / "server.err").open("wb") as err:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=clean_env(XDG_CACHE_HOME=str(d.cache)),
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            text = url_file.read_text(errors="replace")
            if "\n" in text:
                self.url = text.splitlines()[0].strip()
                break
            time.sleep(0.02)
        if not self.url.startswith("http://127.0.0.1:"):
            self.finish(d)
            raise BenchError(
                f"cryo server did not start: {self.url!r}; {_tail(d.logs / 'server.err')}"
            )

    def where(self, d: RepDirs) -> list[str]:
        return ["--endpoint-url", self.url]

    def env(self, d: RepDirs) -> dict[str, str]:
        return clean_env(
            XDG_CACHE_HOME=str(d.cache),
            AWS_ACCESS_KEY_ID=SERVER_KEY_ID,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_EC2_METADATA_DISABLED="true",
            CRYO_REGION=REGION,
        )

    def _proc_file(self, name: str) -> Path:
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/{name}")

    def _cpu(self) -> float:
        try:
            fields = self._proc_file("stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def step_begin(self) -> None:
        if self.process is None:
            return
        if self.can_reset_peak:
            try:
                self._proc_file("clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                self.can_reset_peak = False
        self.step_cpu = self._cpu()

    def step_end(self) -> tuple[int | None, float | None]:
        if self.process is None:
            return None, None
        try:
            status = self._proc_file("status").read_text()
        except OSError:
            return None, None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return (int(match.group(1)) if match else None), self._cpu() - self.step_cpu

    def finish(self, d: RepDirs) -> None:
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
        if code != 0:
            what = "did not stop within 60 s of SIGTERM" if code is None else f"exited {code}"
            FINDINGS.append(f"- cryo server {what} on SIGTERM; log: {d.logs / 'server.err'}")
        self.url = ""


class Restic(Tool):
    name = "restic"
    password = "benchmark-password"  # noqa: S105 - a throw-away repository of test data

    def __init__(self, template: Path) -> None:
        self.exe = which("restic")
        self.template = template

    def available(self) -> str | None:
        return version_of([self.exe, "version"]) if self.exe else None

    def env(self, d: RepDirs) -> dict[str, str]:
        return clean_env(
            RESTIC_REPOSITORY=str(d.repo),
            RESTIC_PASSWORD=self.password,
            RESTIC_CACHE_DIR=str(d.cache),
        )

    def prepare(self, d: RepDirs) -> None:
        # One `restic init` per run (it calibrates its key derivation, a few seconds),
        # copied for each repetition: an empty repository, with a cache of its own.
        assert self.exe is not None
        d.base.mkdir(parents=True, exist_ok=True)
        if not (self.template / "config").exists():
            shutil.rmtree(self.template, ignore_errors=True)
            init = run_measured(
                [self.exe, "init"],
                env=clean_env(
                    RESTIC_REPOSITORY=str(self.template),
                    RESTIC_PASSWORD=self.password,
                    RESTIC_CACHE_DIR=str(self.template.parent / "restic-init-cache"),
                ),
                log=d.logs / "init",
                timeout=d.timeout,
            )
            if init.failure():
                raise BenchError(f"restic init: {init.failure()}")
        shutil.copytree(self.template, d.repo)

    def backup(self, d: RepDirs, source: Path, n: int) -> tuple[Proc, str | None]:
        assert self.exe is not None
        p = run_measured(
            [self.exe, "backup", str(source)],
            env=self.env(d),
            log=d.logs / f"backup-{n}",
            timeout=d.timeout,
        )
        match = re.search(r"^snapshot ([0-9a-f]+) saved", p.stdout, re.MULTILINE)
        return p, (match.group(1) if match else None)

    def restore(self, d: RepDirs, ref: str, target: Path) -> Proc:
        assert self.exe is not None
        return run_measured(
            [self.exe, "restore", ref, "--target", str(target)],
            env=self.env(d),
            log=d.logs / "restore",
            timeout=d.timeout,
        )


class Borg(Tool):
    name = "borg"

    def __init__(self) -> None:
        self.exe = which("borg")

    def available(self) -> str | None:
        return version_of([self.exe, "--version"]) if self.exe else None

    def env(self, d: RepDirs) -> dict[str, str]:
        return clean_env(
            BORG_BASE_DIR=str(d.cache),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )

    def prepare(self, d: RepDirs) -> None:
        assert self.exe is not None
        d.base.mkdir(parents=True, exist_ok=True)
        init = run_measured(
            [self.exe, "init", "--encryption", "none", str(d.repo)],
            env=self.env(d),
            log=d.logs / "init",
            timeout=d.timeout,
        )
        if init.failure():
            raise BenchError(f"borg init: {init.failure()}")

    def backup(self, d: RepDirs, source: Path, n: int) -> tuple[Proc, str | None]:
        assert self.exe is not None
        name = f"bench-{n}"
        p = run_measured(
            [self.exe, "create", f"{d.repo}::{name}", str(source)],
            env=self.env(d),
            log=d.logs / f"backup-{n}",
            timeout=d.timeout,
        )
        return p, name

    def restore(self, d: RepDirs, ref: str, target: Path) -> Proc:
        assert self.exe is not None
        target.mkdir(parents=True)
        return run_measured(
            [self.exe, "extract", f"{d.repo}::{ref}"],
            env=self.env(d),
            log=d.logs / "restore",
            timeout=d.timeout,
            cwd=target,
        )


# -- one repetition of one tool on one dataset ---------------------------------------


@dataclass
class Sample:
    """One measured step."""

    dataset: str
    tool: str
    step: str
    rep: int
    ok: bool
    wall: float | None = None
    cpu: float | None = None
    rss_kib: int | None = None
    server_rss_kib: int | None = None
    server_cpu: float | None = None
    stored_bytes: int | None = None
    check: str | None = None  # "ok" or "failed", restores only
    check_errors: int = 0
    check_notes: int = 0
    check_examples: list[str] = field(default_factory=list)
    error: str | None = None


def tree_bytes(root: Path) -> int:
    """Apparent size of every regular file under root."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def dataset_unchanged(record: Path, info: datasets.DatasetInfo, manifest: Manifest) -> bool:
    """False if the dataset no longer matches the digest recorded on its first use.

    The digest covers every entry's type, size, content hash, mode, mtime and
    symlink target; it is recorded (with the dataset's parameters) when absent
    or when the parameters changed.
    """
    digest = manifest_digest(manifest)
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("params") == info.params:
        return bool(recorded.get("digest") == digest)
    record.write_text(json.dumps({"params": info.params, "digest": digest}) + "\n")
    return True


@dataclass
class DatasetRun:
    info: datasets.DatasetInfo
    manifest: Manifest
    plan: list[bytes]
    journal: Path


def run_repetition(
    tool: Tool, ds: DatasetRun, rep: int, d: RepDirs, report: Callable[[Sample], None]
) -> None:
    """The four steps of one tool on one dataset, each sample passed to ``report``."""
    source = Path(ds.info.path)
    name = ds.info.name
    done: set[str] = set()

    def timed(step: str, run: Callable[[], tuple[Proc, str | None]]) -> tuple[Sample, str | None]:
        # What earlier steps wrote goes to disk first, so no step pays for
        # another's writeback (about 0.6 s of CPU for a restored `small` tree).
        os.sync()
        tool.step_begin()
        try:
            proc, ref = run()
        except (OSError, subprocess.SubprocessError, BenchError) as e:
            tool.step_end()
            return Sample(name, tool.name, step, rep, ok=False, error=str(e)), None
        server_rss, server_cpu = tool.step_end()
        failure = proc.failure()
        if failure is None and ref is None and step.startswith("backup"):
            failure = f"no snapshot reference in the output: {proc.stdout[-300:]!r}"
        sample = Sample(
            name,
            tool.name,
            step,
            rep,
            ok=failure is None,
            wall=proc.wall,
            cpu=proc.cpu,
            rss_kib=proc.maxrss_kib,
            server_rss_kib=server_rss,
            server_cpu=server_cpu,
            error=failure,
        )
        return sample, ref

    def emit(sample: Sample) -> None:
        done.add(sample.step)
        report(sample)

    try:
        try:
            tool.prepare(d)
        except (OSError, subprocess.SubprocessError, BenchError) as e:
            emit(Sample(name, tool.name, STEPS[0], rep, ok=False, error=f"set-up: {e}"))
            return
        first, ref = timed("backup-full", lambda: tool.backup(d, source, 1))
        if first.ok:
            first.stored_bytes = tree_bytes(tool.repo_path(d))
        emit(first)
        if not first.ok or ref is None:
            return
        emit(timed("backup-nochange", lambda: tool.backup(d, source, 2))[0])
        try:
            with touched(source, ds.plan, ds.journal):
                emit(timed("backup-touched", lambda: tool.backup(d, source, 3))[0])
        except OSError as e:
            emit(Sample(name, tool.name, "backup-touched", rep, ok=False, error=f"touch: {e}"))
        sample, _ = timed("restore", lambda: (tool.restore(d, ref, d.restore), ""))
        if sample.ok:
            restored = d.restore / source.relative_to(source.anchor)
            result = check_restore(restored, ds.manifest)
            sample.check = "ok" if result.ok else "failed"
            sample.check_errors, sample.check_notes = result.errors, result.notes
            sample.check_examples = result.examples
        emit(sample)
    finally:
        for step in STEPS:
            if step not in done:
                report(
                    Sample(
                        name,
                        tool.name,
                        step,
                        rep,
                        ok=False,
                        error="skipped: an earlier step failed",
                    )
                )
        tool.finish(d)


# -- machine limits ------------------------------------------------------------------


def measure_read(root: Path, total: int, timeout: float, logs: Path) -> dict[str, Any]:
    """``tar -cf - DIR | cat > /dev/null`` throughput in MiB/s (it also warms the page cache)."""
    limits: dict[str, Any] = {}
    tar, cat = which("tar"), which("cat")
    if tar and cat:
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "tar.err").open("wb") as err:
            started = time.perf_counter()
            t = subprocess.Popen(
                [tar, "-cf", "-", "-C", str(root.parent), root.name],
                stdout=subprocess.PIPE,
                stderr=err,
            )
            c = subprocess.Popen([cat], stdin=t.stdout, stdout=subprocess.DEVNULL)
            assert t.stdout is not None
            t.stdout.close()
            try:
                c.wait(timeout)
                t.wait(timeout)
            except subprocess.TimeoutExpired:
                t.kill()
                c.kill()
                t.wait()
                c.wait()
            seconds = time.perf_counter() - started
        if t.returncode in (0, 1) and c.returncode == 0:  # tar exits 1 for files that changed
            limits["tar_cat"] = total / MIB / seconds
    return limits


def measure_compute(root: Path, manifest: Manifest) -> dict[str, Any]:
    """Hash and compression throughput on this dataset's bytes, in MiB/s (one thread)."""
    limits: dict[str, Any] = {}
    # Up to 256 MiB of the dataset's bytes, in 4 MiB blocks like cryo's chunks.
    buf = bytearray()
    base = os.fsencode(root)
    for rel, e in sorted(manifest.items()):
        if e.kind != "f" or e.size == 0:
            continue
        with open(os.path.join(base, rel), "rb") as f:
            buf += f.read(LIMIT_SAMPLE - len(buf))
        if len(buf) >= LIMIT_SAMPLE:
            break
    blocks = [bytes(buf[i : i + datasets.BLOCK]) for i in range(0, len(buf), datasets.BLOCK)]
    size = len(buf) / MIB
    limits["sample_mib"] = size
    if not blocks:
        return limits

    def rate(fn: Callable[[bytes], object]) -> float:
        started = time.perf_counter()
        for b in blocks:
            fn(b)
        return size / max(time.perf_counter() - started, 1e-9)

    limits["sha256"] = rate(lambda b: hashlib.sha256(b).digest())
    limits["xxh3_128"] = rate(lambda b: xxhash.xxh3_128(b).digest())
    for level in (1, 3):
        compressor = zstandard.ZstdCompressor(level=level)
        limits[f"zstd{level}"] = rate(compressor.compress)
    compressed = [zstandard.ZstdCompressor(level=1).compress(b) for b in blocks]
    limits["zstd1_ratio"] = len(buf) / max(1, sum(len(c) for c in compressed))
    decompressor = zstandard.ZstdDecompressor()
    started = time.perf_counter()
    for c in compressed:
        decompressor.decompress(c)
    limits["zstd1_decompress"] = size / max(time.perf_counter() - started, 1e-9)
    # What hashing and compressing every byte costs, spread over all cores: the
    # ceiling for a backup that reads, SHA-256es, xxh3es and zstd-1s every chunk.
    per_byte = 1 / limits["sha256"] + 1 / limits["xxh3_128"] + 1 / limits["zstd1"]
    limits["compute_bound_backup"] = (os.cpu_count() or 1) / per_byte
    per_byte = 1 / limits["sha256"] + 1 / limits["xxh3_128"] + 1 / limits["zstd1_decompress"]
    limits["compute_bound_restore"] = (os.cpu_count() or 1) / per_byte
    return limits


CREATE_FLOOR_MIN_FILES = 1000
"""The restore floor is measured on datasets of at least this many regular files
(a tenth of it with ``--smoke``, whose ``small`` dataset has a few hundred)."""


def measure_create(manifest: Manifest, dest: Path, min_files: int) -> dict[str, Any]:
    """Seconds to create the dataset's tree at ``dest`` with nothing but the system calls.

    A floor for a restore of the dataset on this machine, by this method:
    directories made first, then the regular files shared by one process per
    CPU in contiguous runs (each created under its final name, written from
    memory, given its mode and mtime; hard links are written as copies),
    symlinks, and last the directories' modes and mtimes. Nothing is read,
    verified, decompressed or named twice. Measured once per run, on
    datasets of at least ``min_files`` files only, where making files, not
    moving bytes, is the work. The tree is left in place: deleting it would
    slow the file creation of what follows. A failure is reported in the
    findings and the run goes on.
    """
    files = sorted((rel, e) for rel, e in manifest.items() if e.kind == "f")
    if len(files) < min_files:
        return {}
    procs = max(1, len(os.sched_getaffinity(0)))
    runs = [files[len(files) * k // procs : len(files) * (k + 1) // procs] for k in range(procs)]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.sync()  # the dirty pages of what came before are not this measurement's
        seconds = _create_tree(sorted(manifest.items()), runs, dest)
        os.sync()  # nor are its dirty pages the next step's
    except OSError as exc:
        FINDINGS.append(f"- the restore floor could not be measured under {dest}: {exc}")
        return {}
    return {"create_floor": seconds, "create_floor_procs": procs}


def _create_tree(
    entries: list[tuple[bytes, Entry]], runs: list[list[tuple[bytes, Entry]]], dest: Path
) -> float:
    """``measure_create``'s work: seconds from the first directory to the last mtime."""
    block = os.urandom(8 * MIB)
    children: list[int] = []
    started = time.perf_counter()
    dest.mkdir(mode=0o700)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel, e in entries:
            if rel and e.kind == "d":
                os.mkdir(rel, 0o700, dir_fd=root)
        for index, run in enumerate(runs):
            pid = os.fork()
            if pid == 0:  # the child: its run of files, then os._exit
                code = 1
                try:
                    os.umask(0)
                    for rel, e in run:
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                        fd = os.open(rel, flags, e.mode, dir_fd=root)
                        left = e.size
                        while left:
                            left -= os.write(fd, memoryview(block)[: min(left, len(block))])
                        os.utime(fd, (e.mtime, e.mtime))
                        os.close(fd)
                    if index == 0:
                        for rel, e in entries:
                            if e.kind == "l":
                                os.symlink(e.target, rel, dir_fd=root)
                    code = 0
                except BaseException:  # noqa: BLE001 - reported on stderr, then the exit code
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            children.append(pid)
        failed = 0
        while children:
            failed += os.waitpid(children.pop(), 0)[1] != 0
        if failed:
            raise OSError(f"{failed} of {len(runs)} processes failed (their errors are above)")
        for rel, e in reversed(entries):
            if e.kind == "d":
                os.chmod(rel or b".", e.mode, dir_fd=root)
                os.utime(rel or b".", (e.mtime, e.mtime), dir_fd=root)
        return time.perf_counter() - started
    finally:
        for pid in children:  # (a fork or a directory failed: the others still end)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os.close(root)


# -- the machine and the run ---------------------------------------------------------


def git_revision() -> str:
    git = which("git")
    if not git:
        return "no git"
    try:
        rev = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [git, "status", "--porcelain", "--", "cryo"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"git {rev}" + (", with uncommitted changes in cryo/" if dirty else "")


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    fs = "unknown"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            inside = str(workdir).startswith(mount.rstrip("/") + "/") or str(workdir) == mount
            if inside and len(mount) >= len(best):
                best, fs = mount, f"{parts[2]} ({parts[0]} on {mount})"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(mem_kib / MIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir_filesystem": fs,
    }


def make_tools(names: list[str], template: Path) -> list[Tool]:
    factories: dict[str, Callable[[], Tool]] = {
        "cryo-embedded": CryoEmbedded,
        "cryo-server": CryoServer,
        "restic": lambda: Restic(template),
        "borg": Borg,
    }
    return [factories[n]() for n in names]


def parse_list(known: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in names if x not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown) or '(empty)'}; known: {', '.join(known)}"
            )
        return names

    return parse


def disk_shortfall(where: Path, need: int) -> str | None:
    """Why ``need`` bytes will not fit under ``where`` (the nearest existing directory), or None.

    (A dataset's restored trees are kept until the end of the run, see ``measure_create``:
    the caller counts one per tool and repetition.)
    """
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free >= need:
        return None
    return (
        f"it needs about {need / GIB:.1f} GiB free under {where}, {free / GIB:.1f} GiB are "
        "(fewer --reps, --tools or --datasets, or another --workdir)"
    )


def allocated_bytes(root: Path) -> int:
    """The disk space ``root``'s tree takes (blocks, as ``du``), directories included:
    35,000 small files take a third more than their sizes add up to."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total + os.lstat(root).st_blocks * 512


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


CLEANED = "last-cleanup"
"""When the last run deleted its restored trees (seconds since the epoch), in WORKDIR."""

SETTLE_SECONDS = 360
"""How long file creation stays slow after mass deletion here: ext4 without a
journal passes over inodes freed in the last 60 s, or 360 s while their
inode table block is not yet written back (``recently_deleted``)."""


def settle_after_cleanup(workdir: Path) -> None:
    """Wait out the slow file creation that follows the last run's deletion of its trees."""
    try:
        cleaned = float((workdir / CLEANED).read_text())
    except (OSError, ValueError):
        return
    wait = cleaned + SETTLE_SECONDS - time.time()
    if 0 < wait <= SETTLE_SECONDS:
        print(
            f"the last run deleted its restored trees {SETTLE_SECONDS - wait:.0f} s ago; "
            f"waiting {wait:.0f} s, until file creation is no longer slowed by it",
            flush=True,
        )
        time.sleep(wait)


# -- summaries -----------------------------------------------------------------------


@dataclass
class Figure:
    """The repetitions of one (dataset, step, tool), summarized."""

    runs: int
    good: int  # runs that succeeded
    wall: float | None  # median of the successful runs
    wall_min: float | None
    wall_max: float | None
    cpu: float | None
    rss_kib: float | None
    server_rss_kib: float | None
    server_cpu: float | None
    stored_bytes: float | None
    checks_failed: int
    errors: list[str]

    @property
    def valid(self) -> bool:
        return self.wall is not None and self.checks_failed == 0


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: list[Sample]) -> dict[tuple[str, str, str], Figure]:
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.dataset, s.step, s.tool), []).append(s)
    figures = {}
    for key, group in groups.items():
        good = [s for s in group if s.ok]
        walls = [s.wall for s in good if s.wall is not None]
        figures[key] = Figure(
            runs=len(group),
            good=len(good),
            wall=statistics.median(walls) if walls else None,
            wall_min=min(walls) if walls else None,
            wall_max=max(walls) if walls else None,
            cpu=_median([s.cpu for s in good]),
            rss_kib=_median([s.rss_kib for s in good]),
            server_rss_kib=_median([s.server_rss_kib for s in good]),
            server_cpu=_median([s.server_cpu for s in good]),
            stored_bytes=_median([s.stored_bytes for s in good]),
            checks_failed=sum(1 for s in good if s.check == "failed"),
            errors=[f"rep {s.rep}: {s.error}" for s in group if s.error],
        )
    return figures


def _fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _ratio(a: Figure | None, b: Figure | None) -> float | None:
    if a is None or b is None or a.wall is None or not b.wall:
        return None
    return a.wall / b.wall


def _faster(*figures: Figure | None) -> Figure | None:
    present = [f for f in figures if f is not None and f.wall is not None]
    return min(present, key=lambda f: f.wall or 0.0) if present else None


def _verdict(ratio: float | None, target: float | None, *valid: bool) -> str:
    if ratio is None or target is None:
        return "-"
    mark = "yes" if ratio <= target else "**no**"
    return mark if all(valid) else mark + " (invalid)"


def _wall_target(dataset: str, step: str, tool: str) -> float | None:
    if (step, tool) in WALL_TARGETS:
        return WALL_TARGETS[(step, tool)]
    if dataset == "small":
        return INCREMENTAL_TARGETS.get((step, tool))
    return None


def render_markdown(
    meta: dict[str, Any],
    infos: list[datasets.DatasetInfo],
    limits: dict[str, dict[str, Any]],
    plans: dict[str, int],
    figures: dict[tuple[str, str, str], Figure],
    tools: list[str],
    chart: str | None,
) -> str:
    out: list[str] = ["# cryo benchmark results", ""]
    m = meta["machine"]
    out += [
        f"- date: {m['date']}",
        f"- machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, {m['memory_gib']} GiB memory, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"- file system of the work directory: {m['workdir_filesystem']}",
        "- tools: " + "; ".join(f"{k}: {v or 'absent'}" for k, v in meta["versions"].items()),
        f"- repetitions: {meta['reps']} per tool, the dataset read into the page cache "
        "before every tool's repetition; "
        f"tool order rotates every repetition; {'SMOKE sizes' if meta['smoke'] else 'full sizes'}",
        f"- command: `{meta['command']}`",
        "",
        "## Datasets",
        "",
        "| dataset | files | directories | symlinks | MiB | files touched (1%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for info in infos:
        out.append(
            f"| {info.name} | {info.files} | {info.dirs} | {info.symlinks} | "
            f"{info.bytes / MIB:.1f} | {plans.get(info.name, 0)} |"
        )
    out += [
        "",
        "## Machine limits (same run, one thread, MiB/s)",
        "",
        "`tar|cat` reads the whole dataset (`tar -cf - DIR | cat > /dev/null`), from the page "
        "cache after the first pass; the others run in this process on the first "
        "256 MiB of the dataset's bytes (or all of them) in 4 MiB blocks. "
        "The compute bounds spread SHA-256 + xxh3-128 + zstd-1 (or its decompression) "
        "over all CPUs: the most a backup (restore) that does all three can reach.",
        "",
        "| dataset | tar\\|cat | SHA-256 | xxh3-128 | zstd-1 | zstd-3 | zstd-1 decompress "
        "| zstd-1 ratio | compute bound backup | compute bound restore | sample MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for info in infos:
        lim = limits.get(info.name, {})
        cells = [
            _fmt(lim.get(k), 0)
            for k in ("tar_cat", "sha256", "xxh3_128", "zstd1", "zstd3", "zstd1_decompress")
        ]
        cells.append(_fmt(lim.get("zstd1_ratio"), 2))
        cells += [_fmt(lim.get(k), 0) for k in ("compute_bound_backup", "compute_bound_restore")]
        cells.append(_fmt(lim.get("sample_mib"), 0))
        out.append(f"| {info.name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Medians",
        "",
        "Wall and CPU (user + system) time of the client process (and its children) in "
        "seconds, peak RSS in MiB (`ru_maxrss`, or the peak of the summed Pss of all the "
        "client's processes when higher); for cryo-server also the server's peak RSS and "
        "CPU during the step. Stored: repository size after the first backup. Check: the "
        "restored tree compared with the dataset.",
        "",
        "| dataset | step | tool | wall s | min-max s | CPU s | peak RSS MiB | server RSS MiB "
        "| server CPU s | stored MiB | check | runs ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for info in infos:
        for step in STEPS:
            for tool in tools:
                f = figures.get((info.name, step, tool))
                if f is None:
                    continue
                spread = (
                    f"{f.wall_min:.2f}-{f.wall_max:.2f}"
                    if f.wall_min is not None and f.wall_max is not None
                    else "-"
                )
                if step != "restore":
                    check = "-"
                elif f.good == 0:
                    check = "not run"
                else:
                    check = (
                        "ok" if f.checks_failed == 0 else f"**FAILED {f.checks_failed}/{f.good}**"
                    )
                wall = _fmt(f.wall) + ("" if f.valid or f.wall is None else " (invalid)")
                out.append(
                    f"| {info.name} | {step} | {tool} | {wall} | {spread} | {_fmt(f.cpu)} | "
                    f"{_fmt(f.rss_kib, 0, 1024)} | {_fmt(f.server_rss_kib, 0, 1024)} | "
                    f"{_fmt(f.server_cpu)} | {_fmt(f.stored_bytes, 1, MIB)} | {check} | "
                    f"{f.good}/{f.runs} |"
                )
    out += [
        "",
        "## Ratios of wall time: cryo / restic and borg (lower is better)",
        "",
        "Faster = the faster of restic and borg on that dataset and step, the reference of "
        "the targets. Target: the issue's bound on cryo / faster; met: whether this run meets "
        "it.",
        "",
        "| dataset | step | cryo | / restic | / borg | / faster | target | met |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for info in infos:
        for step in STEPS:
            restic = figures.get((info.name, step, "restic"))
            borg = figures.get((info.name, step, "borg"))
            faster = _faster(restic, borg)
            for tool in ("cryo-embedded", "cryo-server"):
                f = figures.get((info.name, step, tool))
                if f is None:
                    continue
                target = _wall_target(info.name, step, tool)
                r_faster = _ratio(f, faster)
                valid = [x.valid for x in (f, faster) if x is not None]
                out.append(
                    f"| {info.name} | {step} | {tool} | {_fmt(_ratio(f, restic))} | "
                    f"{_fmt(_ratio(f, borg))} | {_fmt(r_faster)} | "
                    f"{'-' if target is None else f'≤ {target}'} | "
                    f"{_verdict(r_faster, target, *valid)} |"
                )
    floors = [(i, limits.get(i.name, {})) for i in infos]
    floors = [(i, lim) for i, lim in floors if lim.get("create_floor")]
    if floors:
        out += [
            "",
            "## Restore floor",
            "",
            "A floor for a restore of a dataset of many files on this machine: its tree "
            "created with nothing but the system calls, by one process per CPU (every file "
            "created under its final name, written from memory, given its mode and mtime; "
            "nothing read, verified or named twice), measured once in the run. Floor / faster: "
            "about the lowest ratio a restore could reach in this run.",
            "",
            "| dataset | processes | floor s | floor / faster | target | cryo-embedded / floor "
            "| cryo-server / floor |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for info, lim in floors:
            floor = lim["create_floor"]
            faster = _faster(
                figures.get((info.name, "restore", "restic")),
                figures.get((info.name, "restore", "borg")),
            )
            cells = []
            for tool in ("cryo-embedded", "cryo-server"):
                f = figures.get((info.name, "restore", tool))
                cells.append(_fmt(f.wall / floor if f is not None and f.wall else None))
            target = WALL_TARGETS[("restore", "cryo-embedded")]
            out.append(
                f"| {info.name} | {lim.get('create_floor_procs', '-')} | {floor:.2f} | "
                f"{_fmt(floor / faster.wall if faster and faster.wall else None)} | "
                f"≤ {target} | " + " | ".join(cells) + " |"
            )
    out += [
        "",
        "## Peak RSS: cryo / restic",
        "",
        f"Target: the cryo client's peak RSS ≤ {RSS_TARGET}x restic's on the first backup and "
        "the restore. The server column (cryo server's own peak during the step / restic) is "
        "for information.",
        "",
        "| dataset | step | cryo | client / restic | target | met | server / restic |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for info in infos:
        for step in ("backup-full", "restore"):
            restic = figures.get((info.name, step, "restic"))
            base = restic.rss_kib if restic is not None else None
            for tool in ("cryo-embedded", "cryo-server"):
                f = figures.get((info.name, step, tool))
                if f is None:
                    continue
                r = f.rss_kib / base if f.rss_kib and base else None
                rs = f.server_rss_kib / base if f.server_rss_kib and base else None
                out.append(
                    f"| {info.name} | {step} | {tool} | {_fmt(r)} | ≤ {RSS_TARGET} | "
                    f"{_verdict(r, RSS_TARGET)} | {_fmt(rs)} |"
                )
    out += [
        "",
        "## cryo / machine limits",
        "",
        "Throughput = dataset bytes / median wall time, in MiB/s, against reading the dataset "
        "with `tar|cat` and against the compute bound above.",
        "",
        "| dataset | step | tool | MiB/s | / tar\\|cat | / compute bound |",
        "|---|---|---|---:|---:|---:|",
    ]
    for info in infos:
        lim = limits.get(info.name, {})
        for step in ("backup-full", "restore"):
            bound = lim.get(
                "compute_bound_backup" if step != "restore" else "compute_bound_restore"
            )
            for tool in tools:
                f = figures.get((info.name, step, tool))
                if f is None or not f.wall:
                    continue
                rate = info.bytes / MIB / f.wall
                tar_cat = lim.get("tar_cat")
                out.append(
                    f"| {info.name} | {step} | {tool} | {rate:.0f} | "
                    f"{_fmt(rate / tar_cat if tar_cat else None)} | "
                    f"{_fmt(rate / bound if bound else None)} |"
                )
    out += ["", "## Chart", ""]
    out.append(
        f"![wall time per step]({chart})"
        if chart
        else "Chart skipped: matplotlib is not installed (`pip install -e '.[bench]'`)."
    )
    problems = []
    for (dataset, step, tool), f in sorted(figures.items()):
        problems += [f"- {dataset} / {step} / {tool}: {e}" for e in f.errors]
    notes = meta.get("check_notes", [])
    out += ["", "## Failures and check findings", ""]
    out += problems or ["No step failed."]
    if notes:
        out += ["", *notes]
    out.append("")
    return "\n".join(out)


def render_chart(
    path: Path,
    infos: list[datasets.DatasetInfo],
    figures: dict[tuple[str, str, str], Figure],
    tools: list[str],
    title: str,
) -> bool:
    """A PNG with one panel per dataset, a bar group per step; False without matplotlib."""
    try:
        import matplotlib  # optional: the run goes on without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(infos), figsize=(5.5 * len(infos), 4.8), squeeze=False)
    width = 0.8 / max(1, len(tools))
    for ax, info in zip(axes[0], infos, strict=True):
        for i, tool in enumerate(tools):
            xs, heights, lows, highs, hatches = [], [], [], [], []
            for j, step in enumerate(STEPS):
                f = figures.get((info.name, step, tool))
                if f is None or f.wall is None:
                    continue
                xs.append(j + (i - (len(tools) - 1) / 2) * width)
                heights.append(f.wall)
                lows.append(f.wall - (f.wall_min or f.wall))
                highs.append((f.wall_max or f.wall) - f.wall)
                hatches.append("" if f.valid else "//")
            bars = ax.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=tool)
            for bar, hatch in zip(bars, hatches, strict=True):
                bar.set_hatch(hatch)
        ax.set_xticks(range(len(STEPS)), [s.replace("-", "\n", 1) for s in STEPS])
        ax.set_title(f"{info.name} ({info.bytes / MIB:.0f} MiB, {info.files} files)")
        ax.set_ylabel("wall time, s (median, min-max)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(tools)), frameon=False)
    fig.suptitle(title + " (hatched: restore check failed)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark cryo against restic and borg; see benchmarks/README.md."
    )
    parser.add_argument(
        "--datasets",
        type=parse_list(datasets.DATASETS),
        default=list(datasets.DATASETS),
        help="comma-separated (default: all)",
    )
    parser.add_argument(
        "--tools",
        type=parse_list(TOOLS),
        default=list(TOOLS),
        help="comma-separated (default: all; absent ones are reported)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per tool (default 3)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny datasets, for CI (results default to WORKDIR/results)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=datasets.DEFAULT_WORKDIR,
        help=f"datasets, repositories, restores (default {datasets.DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="where results go (default benchmarks/results, or WORKDIR/results with --smoke)",
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds allowed per step (default 3600, 120 with --smoke)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep repositories and restored trees (default: delete them)",
    )
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    workdir: Path = args.workdir.resolve()
    results_dir: Path = (
        args.results_dir or (workdir / "results" if args.smoke else HERE / "results")
    ).resolve()
    timeout: float = args.timeout or (120.0 if args.smoke else 3600.0)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    run_dir = workdir / "runs" / run_id
    log_dir = workdir / "logs" / run_id
    stale = [p for p in (workdir / "runs").glob("*")] if (workdir / "runs").is_dir() else []
    if not args.smoke:
        settle_after_cleanup(workdir)
    run_dir.mkdir(parents=True)

    tools = make_tools(args.tools, run_dir / "restic-template")
    versions = {t.name: t.available() for t in tools}
    present = [t for t in tools if versions[t.name]]
    for name, version in versions.items():
        print(f"{name}: {version or 'absent (not installed): skipped'}", flush=True)

    samples: list[Sample] = []
    infos: list[datasets.DatasetInfo] = []
    limits: dict[str, dict[str, Any]] = {}
    plans: dict[str, int] = {}
    check_notes: list[str] = []

    def report(sample: Sample) -> None:
        samples.append(sample)
        if sample.ok:
            extra = f", check {sample.check}" if sample.check else ""
            server = (
                f", server RSS {sample.server_rss_kib / 1024:.0f} MiB"
                if sample.server_rss_kib
                else ""
            )
            print(
                f"  {sample.tool:<14} {sample.step:<16} {sample.wall or 0:8.2f} s  "
                f"CPU {sample.cpu or 0:7.2f} s  RSS {(sample.rss_kib or 0) / 1024:6.0f} MiB"
                f"{server}{extra}",
                flush=True,
            )
        else:
            print(f"  {sample.tool:<14} {sample.step:<16} FAILED: {sample.error}", flush=True)
        if sample.check_examples:
            head = f"{sample.dataset} / {sample.tool} / rep {sample.rep} restore check"
            counts = f"{sample.check_errors} errors, {sample.check_notes} notes"
            check_notes.append(f"- {head}: {counts}; " + "; ".join(sample.check_examples))

    disk_short = False
    for name in args.datasets:
        print(f"== {name}", flush=True)
        info = datasets.ensure(workdir, name, args.smoke)
        journal = workdir / "datasets" / datasets.mode_name(args.smoke) / f"{name}.touch-journal"
        undone = undo_journal(journal)
        if undone:
            print(f"  put back {undone} files changed by an interrupted run", flush=True)
        limits[name] = measure_read(Path(info.path), info.bytes, timeout, log_dir / name)
        manifest = build_manifest(Path(info.path))
        if not dataset_unchanged(journal.with_suffix(".digest"), info, manifest):
            print("  the dataset differs from when it was first used: generating it again")
            info = datasets.ensure(workdir, name, args.smoke, force=True)
            limits[name] = measure_read(Path(info.path), info.bytes, timeout, log_dir / name)
            manifest = build_manifest(Path(info.path))
            dataset_unchanged(journal.with_suffix(".digest"), info, manifest)
        print(f"  {info.describe()}", flush=True)
        infos.append(info)
        root = Path(info.path)
        limits[name].update(measure_compute(root, manifest))
        floor_files = CREATE_FLOOR_MIN_FILES // (10 if args.smoke else 1)
        floor_dir = run_dir / "restores" / name / "floor"
        limits[name].update(measure_create(manifest, floor_dir, floor_files))
        print(
            "  limits (MiB/s): "
            + ", ".join(
                f"{k} {v:.0f}"
                for k, v in limits[name].items()
                if k != "zstd1_ratio" and not k.startswith("create_floor")
            ),
            flush=True,
        )
        if "create_floor" in limits[name]:
            print(f"  restore floor: {limits[name]['create_floor']:.2f} s", flush=True)
        plan = touch_plan(manifest)
        plans[name] = len(plan)
        ds = DatasetRun(info, manifest, plan, journal)
        # A restored tree per tool and repetition, a repository (all of them with
        # --keep) and the restore floor's tree, each at most the dataset's size.
        trees = len(present) * args.reps * (2 if args.keep else 1) + 2
        short = disk_shortfall(run_dir, allocated_bytes(Path(info.path)) * trees)
        if short:
            print(f"  skipped: {short}", flush=True)
            FINDINGS.append(f"- {name} was not measured: {short}")
            disk_short = True
            continue
        for rep in range(1, args.reps + 1):
            order = (
                present[(rep - 1) % max(1, len(present)) :]
                + present[: (rep - 1) % max(1, len(present))]
            )
            print(
                f"  -- repetition {rep}/{args.reps}: {', '.join(t.name for t in order)}", flush=True
            )
            for tool in order:
                d = RepDirs(
                    base=run_dir / name / f"{tool.name}-rep{rep}",
                    logs=log_dir / name / f"{tool.name}-rep{rep}",
                    restore=run_dir / "restores" / name / f"{tool.name}-rep{rep}",
                    timeout=timeout,
                )
                d.restore.parent.mkdir(parents=True, exist_ok=True)
                # Every tool starts from a dataset in the page cache: borg drops
                # what it read (POSIX_FADV_DONTNEED), and this machine's page
                # cache shrinks by itself over tens of seconds.
                measure_read(Path(info.path), info.bytes, timeout, d.logs)
                run_repetition(tool, ds, rep, d, report)
                if not args.keep:
                    remove_tree(d.base)  # repositories: few, large files

    figures = summarize(samples)
    tool_names = [t.name for t in present]
    meta: dict[str, Any] = {
        "machine": machine_info(workdir),
        "versions": versions,
        "reps": args.reps,
        "smoke": args.smoke,
        "command": " ".join(
            ["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "check_notes": check_notes + FINDINGS,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    title = f"cryo benchmark, {meta['machine']['date']}" + (" (smoke)" if args.smoke else "")
    chart = (
        "results.png"
        if render_chart(results_dir / "results.png", infos, figures, tool_names, title)
        else None
    )
    if chart is None:
        print("chart skipped: matplotlib is not installed (pip install -e '.[bench]')")
    markdown = render_markdown(meta, infos, limits, plans, figures, tool_names, chart)
    (results_dir / "results.md").write_text(markdown)
    raw = {
        "meta": meta,
        "datasets": [asdict(i) for i in infos],
        "limits": limits,
        "touched_files": plans,
        "figures": {"/".join(k): asdict(f) | {"valid": f.valid} for k, f in figures.items()},
        "samples": [asdict(s) for s in samples],
    }
    (results_dir / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"results: {results_dir / 'results.md'}", flush=True)
    print(markdown.split("## Medians", 1)[1].split("## Ratios", 1)[0].strip())

    if not args.keep:
        for path in [run_dir, *stale]:
            remove_tree(path)
        (workdir / CLEANED).write_text(f"{time.time()}\n")
    failed = [s for s in samples if not s.ok or s.check == "failed"]
    if failed:
        print(f"{len(failed)} step(s) failed or did not pass the restore check", file=sys.stderr)
    if disk_short:
        print("a dataset was skipped for want of disk space", file=sys.stderr)
    return 1 if failed or disk_short else 0


if __name__ == "__main__":
    sys.exit(main())
