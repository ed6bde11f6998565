"""``cryo backup``: back up paths (or standard input) into a new job."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cryo.cli.common import (
    EndpointOption,
    ProfileOption,
    RegionOption,
    RepoOption,
    app,
    backend_from_settings,
    handles_errors,
    log,
    settings_from_options,
)
from cryo.exitcodes import PARTIAL, UsageError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryo.backup import BackupOptions
    from cryo.runstate import PendingRecord

HELP = """Back up PATHS into a new job and print its JobId.

Files are split into chunks, compressed where it pays, hashed and uploaded in
parallel; small files are packed together. Symlinks are stored as links,
hard links as links, and every file's metadata is kept.

Examples:

  cryo backup ~/docs /etc

  cryo backup --exclude '*.tmp' --exclude-caches /home

  pg_dump db | cryo backup - --stdin-name db.sql

Incremental by default: the newest complete job of the same host, paths
and pool is the base, and files whose size, mtime, ctime and inode are
unchanged are neither read nor uploaded (--full reads everything). Each job
is still a complete snapshot: restoring it never needs another job.

A run that fails (network outage, kill, crash) is continued by the next run
of the same backup: the job it left unfinished is completed, and what it
had already stored is not sent again. Two runs of the same backup never
overlap: the second waits --lock-wait seconds, then exits 13.

Exit status: 0 done; 3 job committed but some files were unreadable or
changed while read (each one is named on stderr); 13 another run of this
backup holds the lock; other codes: see README.
"""


@app.command("backup", help=HELP)
@handles_errors
def backup(
    paths: Annotated[
        list[str], typer.Argument(help="Files and directories to back up; '-' reads stdin.")
    ],
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", "-e", help="Skip names matching GLOB (repeatable).", metavar="GLOB"
        ),
    ] = None,
    exclude_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--exclude-file", help="Read exclude globs from FILE, one per line.", metavar="FILE"
        ),
    ] = None,
    exclude_caches: Annotated[
        bool, typer.Option("--exclude-caches", help="Skip directories tagged with CACHEDIR.TAG.")
    ] = False,
    one_file_system: Annotated[
        bool, typer.Option("--one-file-system", "-x", help="Stay on the file system of each path.")
    ] = False,
    stdin_name: Annotated[
        str | None, typer.Option("--stdin-name", help="Name of the file stored for '-'.")
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Pool the job belongs to: GLACIER or DEEP_ARCHIVE. (default: the profile's "
            "pool, else GLACIER)",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="Base the incremental on this job.", metavar="JOB", show_default=False
        ),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Read every file; no base job.")] = False,
    client_token: Annotated[
        str | None,
        typer.Option(
            "--client-token",
            help="Idempotency token: a rerun with the same token continues the same job, "
            "or prints it if it is complete. (default: one per unfinished backup)",
            metavar="TOKEN",
            show_default=False,
        ),
    ] = None,
    lock_wait: Annotated[
        float,
        typer.Option("--lock-wait", help="Seconds to wait for another run of this backup.", min=0),
    ] = 0.0,
    tag: Annotated[list[str] | None, typer.Option(help="Tag the job (repeatable).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Chunk size in MiB.", min=1, max=32)] = 4,
    compression: Annotated[
        int, typer.Option(help="zstd level, 0 to store uncompressed.", min=0, max=19)
    ] = 1,
    read_workers: Annotated[
        int,
        typer.Option(
            help="Large files read in parallel (small ones are read by the scanner,"
            " with the kernel reading ahead).",
            min=1,
        ),
    ] = 2,
    cpu_workers: Annotated[
        int,
        typer.Option(
            help="Chunks compressed and hashed in parallel (packs of small files:"
            " one fewer, since the scanner that fills them needs a CPU).",
            min=1,
        ),
    ] = 2,
    connections: Annotated[int, typer.Option(help="Uploads in parallel.", min=1)] = 8,
    retry_max_time: Annotated[
        float, typer.Option(help="Seconds one storage call may spend retrying.", min=0)
    ] = 300.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the JobId.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines: progress, warnings, summary.")
    ] = False,
) -> None:
    from cryo.backup import BackupOptions, run_backup
    from cryo.cli.render import Renderer, choose_mode
    from cryo.jobs import DEFAULT_POOL, UnknownPool, check_pool
    from cryo.retry import RetryPolicy
    from cryo.scan import ScanOptions

    if full and base:
        raise UsageError("--full and --base exclude each other")
    settings = settings_from_options(repo, endpoint_url, region, profile)
    try:
        pool = check_pool(pool or settings.get("pool") or DEFAULT_POOL)
    except UnknownPool as exc:
        raise UsageError(str(exc)) from None

    globs = [*(settings.get("exclude") or ()), *(exclude or ())]
    for f in exclude_file or ():
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read exclude file {f}: {exc.strerror}") from None
        globs += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    use_stdin = paths == ["-"]
    if "-" in paths and not use_stdin:
        raise UsageError("'-' (standard input) cannot be combined with other paths")
    if use_stdin and not stdin_name:
        raise UsageError("backing up standard input needs --stdin-name NAME")
    if stdin_name and not use_stdin:
        raise UsageError("--stdin-name applies only to '-' (standard input)")
    roots: list[bytes] = []
    if not use_stdin:
        for p in paths:
            abspath = os.path.abspath(os.fsencode(p))
            if not os.path.lexists(abspath):
                raise UsageError(f"{p}: no such file or directory")
            roots.append(abspath)
    mode = choose_mode(quiet, as_json)
    options = BackupOptions(
        paths=tuple(roots),
        stdin_name=stdin_name if use_stdin else None,
        scan=ScanOptions(
            excludes=tuple(os.fsencode(g) for g in globs),
            exclude_caches=exclude_caches,
            one_file_system=one_file_system,
        ),
        chunk_size=chunk_size * 1024 * 1024,
        compression_level=compression or None,
        read_workers=read_workers,
        cpu_workers=cpu_workers,
        connections=connections,
        pool_id=pool,
        tags=tuple(tag or ()),
        client_token=client_token,
        base_job_id=base,
        full=full,
        retry=RetryPolicy(max_elapsed=retry_max_time),
        estimate_totals=mode == "tty",
    )
    backend = backend_from_settings(settings)
    renderer = Renderer(mode)
    try:
        with backup_lock(backend, options, lock_wait) as pending:
            summary = run_backup(backend, options, on_event=renderer, pending=pending)
    finally:
        renderer.close()
        backend.close()
    log.info(
        "job %s %s: %d files (%d unchanged), %d bytes read, %d bytes stored, %d retries, %.1f s",
        summary.job_id, summary.status, summary.files, summary.files_unchanged,
        summary.bytes_read, summary.bytes_stored, summary.retries, summary.seconds,
    )  # fmt: skip
    if as_json:
        renderer.emit(
            {
                "type": "summary",
                "job_id": summary.job_id,
                "status": summary.status,
                "files": summary.files,
                "files_unchanged": summary.files_unchanged,
                "source_bytes": summary.source_bytes,
                "bytes_read": summary.bytes_read,
                "bytes_stored": summary.bytes_stored,
                "base_job_id": summary.base_job_id,
                "resumed": summary.resumed,
                "objects_deleted": summary.objects_deleted,
                "retries": summary.retries,
                "errors": [{"path": w.path, "message": w.message} for w in summary.warnings],
                "seconds": round(summary.seconds, 3),
            }
        )
    else:
        typer.echo(summary.job_id)
        if not quiet:
            if summary.already_complete:
                detail = "already complete (same --client-token); nothing to do"
            else:
                detail = (
                    f"{summary.files} files ({summary.files_unchanged} unchanged), "
                    f"{summary.bytes_read / 1e6:.1f} MB read, "
                    f"{summary.bytes_stored / 1e6:.1f} MB stored, {summary.seconds:.1f} s"
                )
                if summary.resumed:
                    detail += ", resumed an unfinished run"
            typer.echo(f"{summary.status.lower()}: {detail}", err=True)
    if summary.warnings:
        if not as_json:
            typer.echo(
                f"cryo: {len(summary.warnings)} file(s) could not be backed up as they were",
                err=True,
            )
        raise typer.Exit(PARTIAL)


@contextmanager
def backup_lock(
    backend: Any, options: BackupOptions, wait: float
) -> Iterator[PendingRecord | None]:
    """Hold this backup's run lock; yields its pending-run record (None for stdin)."""
    import socket

    from cryo.backup import display_path
    from cryo.runstate import PendingRecord, default_state_dir, run_key, run_lock
    from cryo.scan import canonical_roots

    if options.stdin_name is not None:
        yield None
        return
    target = getattr(backend, "endpoint_url", None) or str(Path(backend.root).resolve())
    paths = [display_path(p) for p in canonical_roots(list(options.paths))]
    key = run_key(target, socket.gethostname(), paths)
    state = default_state_dir()
    with run_lock(state, key, wait, " ".join(paths)):
        yield PendingRecord(state, key)
