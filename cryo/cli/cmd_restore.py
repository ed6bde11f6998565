"""``cryo restore`` and ``cryo verify``: bring a job back, or prove it can be."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cryo.cli.common import (
    EndpointOption,
    ProfileOption,
    RegionOption,
    RepoOption,
    app,
    backend_from_options,
    handles_errors,
)
from cryo.exitcodes import FATAL, UsageError

RESTORE_HELP = """Restore job JOB into the directory given by --to.

Every chunk's SHA-256 is checked before it is used and every file's xxh3-128
before it takes its final name: a corrupt or partial file never appears
under a real name. Paths in the job that could escape DIR are refused.

Examples:

  cryo restore 20261121T091126Z-90ccac84 --to /srv/restore

  cryo restore JOB --to /srv/restore --include 'home/alice/docs'

  cryo restore JOB --path etc/fstab --to -

A non-empty DIR is refused unless --overwrite says what to do with existing
files: never (skip them), if-changed (replace those whose size, mtime or
content differ; reruns resume an interrupted restore), always.
"""


@app.command("restore", help=RESTORE_HELP)
@handles_errors
def restore(
    job: Annotated[str, typer.Argument(help="JobId to restore.")],
    to: Annotated[str, typer.Option("--to", help="Target directory, or '-' with --path.")],
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", "-i", help="Restore only paths matching GLOB (repeatable).", metavar="GLOB"
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", "-e", help="Skip paths matching GLOB (repeatable).", metavar="GLOB"
        ),
    ] = None,
    path: Annotated[
        str | None, typer.Option("--path", help="One file to write to stdout (with --to -).")
    ] = None,
    overwrite: Annotated[
        str | None,
        typer.Option(help="Existing files: never, if-changed or always.", show_default=False),
    ] = None,
    connections: Annotated[
        int | None,
        typer.Option(
            help="Chunks fetched and written in parallel, shared among the processes. More "
            "hides a slow network but holds more chunks in memory. Default: 4 for one "
            "process, 1 per process for several.",
            min=1,
            show_default=False,
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Processes restoring files side by side, for jobs of many files (their "
            "per-file work is then not limited to one CPU). Default: one per CPU, at most 4; "
            "--connections is shared among them.",
            min=1,
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: progress, summary.")] = False,
) -> None:
    from cryo.cli.render import Renderer, choose_mode
    from cryo.restore import OVERWRITE_POLICIES, RestoreOptions, restore_one_to_stream, run_restore

    if overwrite is not None and overwrite not in OVERWRITE_POLICIES:
        raise UsageError(f"--overwrite must be one of {', '.join(OVERWRITE_POLICIES)}")
    if (to == "-") != (path is not None):
        raise UsageError("--path FILE goes with --to - (write one file to stdout)")
    backend = backend_from_options(repo, endpoint_url, region, profile, create=False)
    try:
        if path is not None:
            try:
                restore_one_to_stream(backend, job, os.fsencode(path), sys.stdout.buffer)
            except FileNotFoundError:
                raise UsageError(f"{path}: no such file in job {job}") from None
            return
        renderer = Renderer(choose_mode(quiet, as_json))
        try:
            summary = run_restore(
                backend,
                job,
                RestoreOptions(
                    target=os.fsencode(os.path.abspath(to)),
                    includes=tuple(os.fsencode(g) for g in include or ()),
                    excludes=tuple(os.fsencode(g) for g in exclude or ()),
                    overwrite=overwrite,
                    connections=connections,
                    processes=processes or min(4, len(os.sched_getaffinity(0))),
                ),
                on_event=renderer,
            )
        finally:
            renderer.close()
    finally:
        backend.close()
    if as_json:
        renderer.emit(
            {
                "type": "summary",
                "job_id": summary.job_id,
                "files": summary.files,
                "bytes_written": summary.bytes_written,
                "skipped": summary.skipped,
                "retries": summary.retries,
                "errors": [{"path": w.path, "message": w.message} for w in summary.failures],
                "seconds": round(summary.seconds, 3),
            }
        )
    elif not quiet:
        typer.echo(
            f"restored {summary.files} files ({summary.bytes_written / 1e6:.1f} MB), "
            f"{summary.entries} entries, {summary.skipped} skipped, {summary.seconds:.1f} s",
            err=True,
        )
    if summary.failures:
        typer.echo(f"cryo: {len(summary.failures)} entries were not restored", err=True)
        raise typer.Exit(FATAL)


@app.command("verify")
@handles_errors
def verify(
    job: Annotated[str, typer.Argument(help="JobId to verify.")],
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    read_data: Annotated[
        bool, typer.Option("--read-data", help="Download and verify every chunk.")
    ] = False,
    connections: Annotated[int, typer.Option(help="Chunks fetched in parallel.", min=1)] = 8,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Print only errors (the exit status tells); --json still prints."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: each bad file, then a summary.")
    ] = False,
) -> None:
    """Check that a job is complete, its manifest sound and every chunk listed.

    With --read-data, every chunk is downloaded and its checksum verified, and
    files with bad data are named; exit status 1 if anything is wrong.
    """
    from cryo.jobreader import CorruptData, JobReader
    from cryo.manifest import ManifestError
    from cryo.restore import iter_bad_files
    from cryo.retry import RetryingBackend

    backend = backend_from_options(repo, endpoint_url, region, profile, create=False)
    problems = 0
    try:
        retrying = RetryingBackend(backend)
        info = retrying.describe_job(job)
        if info.status not in ("COMPLETED", "PARTIAL"):
            raise CorruptData(f"job {job} is {info.status}, not complete")
        reader = JobReader(retrying, job)
        entries = 0
        try:
            _, it = reader.manifest()
            for entry in it:
                entries += 1
                for e in entry.extents:
                    if e.chunk_index >= len(reader.chunks_of(e.object_name)):
                        raise CorruptData(
                            f"{entry.path.decode('utf-8', 'backslashreplace')}: "
                            f"chunk {e.chunk_index} of {e.object_name} is not listed"
                        )
        except ManifestError as exc:
            raise CorruptData(f"manifest of job {job}: {exc}") from None
        if read_data:
            for bad in iter_bad_files(backend, job, connections):
                problems += 1
                if as_json:
                    record = {"type": "bad_file", "path": bad.path, "message": bad.message}
                    typer.echo(json.dumps(record, sort_keys=True))
                typer.echo(f"cryo: bad data: {bad.path}: {bad.message}", err=True)
    finally:
        backend.close()
    if as_json:
        summary = {"type": "summary", "job_id": job, "entries": entries,
                   "read_data": read_data, "bad_files": problems}  # fmt: skip
        typer.echo(json.dumps(summary, sort_keys=True))
    if problems:
        raise typer.Exit(FATAL)
    if not as_json and not quiet:
        checked = "all data read and verified" if read_data else "structure verified"
        typer.echo(f"job {job}: {entries} entries, {checked}")
