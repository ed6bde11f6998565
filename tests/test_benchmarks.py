"""The benchmark harness (benchmarks/run.py) on smoke-sized datasets, and its restore check.

The smoke run uses every tool installed on this machine (cryo embedded and
through cryo server always; restic and borg when they are installed), one
repetition, results written under tmp_path so committed results stay as they
are. Timings are not asserted: only that every step ran, every restore passed
its check, and the report has a row for each.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
STEPS = ("backup-full", "backup-nochange", "backup-touched", "restore")
DATASETS = ("big-random", "big-text", "small")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/run.py imported as a module (it imports its sibling datasets.py)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_smoke_run_of_every_installed_tool(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = [
        sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--reps", "1",
        "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

    installed = [t for t in ("restic", "borg") if shutil.which(t)]
    absent = [t for t in ("restic", "borg") if t not in installed]
    tools = ["cryo-embedded", "cryo-server", *installed]
    md = (results / "results.md").read_text()
    for dataset in DATASETS:
        for step in STEPS:
            for tool in tools:
                row = rf"^\| {dataset} \| {step} \| {tool} \| \d+\.\d+ \|.*\| 1/1 \|$"
                assert re.search(row, md, re.MULTILINE), f"no row for {dataset}/{step}/{tool}"
            restore = rf"^\| {dataset} \| restore \| {tool} \|.*\| ok \| 1/1 \|$"
            assert re.search(restore, md, re.MULTILINE)
    for tool in absent:
        assert f"{tool}: absent" in md
    # The restore floor of the dataset of many files, beside cryo's restores.
    floor = re.search(
        r"^\| small \| \d+ \| (\d+\.\d+) \| (\S+) \| ≤ 0\.5 \| (\d+\.\d+) \| (\d+\.\d+) \|$",
        md,
        re.MULTILINE,
    )
    assert floor, md.split("## Restore floor")[-1][:800]
    assert float(floor.group(1)) > 0 and float(floor.group(3)) > 0
    assert "No step failed." in md

    raw = json.loads((results / "results.json").read_text())
    samples = raw["samples"]
    assert {(s["dataset"], s["step"], s["tool"]) for s in samples} == {
        (d, s, t) for d in DATASETS for s in STEPS for t in tools
    }
    assert all(s["ok"] for s in samples), [s for s in samples if not s["ok"]]
    restores = [s for s in samples if s["step"] == "restore"]
    assert all(s["check"] == "ok" for s in restores), [s["check_examples"] for s in restores]
    assert all(s["stored_bytes"] for s in samples if s["step"] == "backup-full")
    # the repositories and restored trees are gone; the datasets stay for the next run
    assert not any((tmp_path / "work" / "runs").iterdir())
    assert (tmp_path / "work" / "datasets" / "smoke" / "small.json").exists()


def _tree(root: Path) -> None:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello world\n" * 100)
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "zero").touch()
    (root / "link").symlink_to("a.txt")
    os.chmod(root / "sub" / "b.bin", 0o600)
    for p in (root / "a.txt", root / "sub" / "b.bin", root / "sub" / "zero", root / "sub"):
        os.utime(p, (1_600_000_000, 1_600_000_000))


def test_restore_check_finds_every_kind_of_difference(bench: ModuleType, tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    source.mkdir()
    _tree(source)
    manifest = bench.build_manifest(source)

    def fresh() -> Path:
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(source, copy, symlinks=True)
        shutil.copystat(source / "sub", copy / "sub")
        return copy

    assert bench.check_restore(fresh(), manifest).ok

    def errors_after(change: object) -> int:
        assert callable(change)
        change(fresh())
        return int(bench.check_restore(copy, manifest).errors)

    def flip(p: Path) -> None:  # same size, same mtime, one byte different
        data = bytearray((p / "a.txt").read_bytes())
        data[5] ^= 1
        st = (p / "a.txt").stat()
        (p / "a.txt").write_bytes(bytes(data))
        os.utime(p / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))

    def relink(p: Path) -> None:
        (p / "link").unlink()
        (p / "link").symlink_to("sub/b.bin")

    assert errors_after(flip) == 1
    assert errors_after(lambda p: os.chmod(p / "sub" / "b.bin", 0o644)) == 1
    assert errors_after(lambda p: os.utime(p / "a.txt", (1_600_000_005, 1_600_000_005))) == 1
    assert errors_after(relink) == 1
    assert errors_after(lambda p: (p / "sub" / "zero").unlink()) == 1
    assert errors_after(lambda p: (p / "sub" / "empty").rmdir()) == 1
    assert errors_after(lambda p: (p / "extra").write_text("x")) >= 1
    assert errors_after(lambda p: os.chmod(p / "sub", 0o700)) == 1
    # a directory's mtime is a note, not an error
    fresh()
    os.utime(copy / "sub", (1_600_000_009, 1_600_000_009))
    result = bench.check_restore(copy, manifest)
    assert result.ok and result.notes == 1
    assert not bench.check_restore(tmp_path / "missing", manifest).ok


def test_touched_files_are_put_back_exactly(bench: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _tree(source)
    before = bench.build_manifest(source)
    plan = [b"a.txt", b"sub/b.bin", b"sub/zero"]
    journal = tmp_path / "journal"
    with bench.touched(source, plan, journal):
        during = bench.build_manifest(source)
        for rel in plan:
            assert during[rel].digest != before[rel].digest
            assert during[rel].mtime != before[rel].mtime
        assert journal.exists()
    assert bench.build_manifest(source) == before
    assert not journal.exists()
    # the plan is 1% of the regular files, at least one
    assert len(bench.touch_plan(before)) == 1


def test_a_run_without_room_measures_nothing_and_says_why(
    bench: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = shutil.disk_usage

    def full(path: object) -> object:
        return real(path)._replace(free=10 * 2**20)  # type: ignore[arg-type]

    monkeypatch.setattr(bench.shutil, "disk_usage", full)
    results = tmp_path / "results"
    code = bench.main([
        "--smoke", "--reps", "1", "--tools", "cryo-embedded", "--datasets", "small",
        "--workdir", str(tmp_path / "work"), "--results-dir", str(results),
    ])  # fmt: skip
    assert code == 1
    assert "skipped: it needs about" in capsys.readouterr().out
    md = (results / "results.md").read_text()
    assert "- small was not measured: it needs about" in md
    assert not re.search(r"^\| small \| backup-full \| cryo-embedded \| \d", md, re.MULTILINE)


def test_a_dataset_that_would_not_fit_is_named_before_it_starts(
    bench: ModuleType, tmp_path: Path
) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert bench.disk_shortfall(tmp_path / "run" / "not-yet", 1024) is None
    why = bench.disk_shortfall(tmp_path / "run" / "not-yet", free + 100 * 2**30)
    assert why is not None and f"under {tmp_path}," in why and "--reps" in why
    # What a restored tree takes is counted in blocks, as du counts it: 200 files of
    # one byte each take far more than 200 bytes.
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(200):
        (tree / "sub" / f"f{i}").write_bytes(b"x")
    du = int(subprocess.run(["du", "-s", "-B1", str(tree)], capture_output=True).stdout.split()[0])
    assert bench.allocated_bytes(tree) == du >= 200 * 512
