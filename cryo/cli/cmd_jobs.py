"""``cryo jobs``, ``cryo ls`` and ``cryo forget``: list jobs, list a job, apply retention."""

from __future__ import annotations

import contextlib
import json
import stat
from datetime import UTC, datetime
from typing import Annotated

import typer

from cryo.cli.common import (
    EndpointOption,
    ProfileOption,
    RegionOption,
    RepoOption,
    app,
    backend_from_options,
    backend_from_settings,
    handles_errors,
    settings_from_options,
)
from cryo.errors import ResourceNotFoundException
from cryo.exitcodes import UsageError
from cryo.retry import RetryingBackend

PoolFilter = Annotated[
    str | None,
    typer.Option(
        "--pool", help="Only jobs of this pool (GLACIER or DEEP_ARCHIVE).", show_default=False
    ),
]


def _pool(pool: str | None) -> str | None:
    from cryo.jobs import UnknownPool, check_pool

    try:
        return None if pool is None else check_pool(pool)
    except UnknownPool as exc:
        raise UsageError(str(exc)) from None


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


JOBS_HELP = """List jobs, newest first.

Each line: JobId, status, created, pool, files, source size, stored size
(what the job added after compression and reuse), base job, host:paths.
--json prints one object per job with every field. When more jobs remain
than --limit shows, the marker to continue from is printed on stderr.
"""


@app.command("jobs", help=JOBS_HELP)
@handles_errors
def jobs(
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many jobs.")] = 20,
    marker: Annotated[
        str | None,
        typer.Option(help="Continue a listing from this marker.", show_default=False),
    ] = None,
    pool: PoolFilter = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
) -> None:
    from cryo.jobs import job_record

    pool = _pool(pool)
    backend = RetryingBackend(backend_from_options(repo, endpoint_url, region, profile))
    try:
        shown = 0
        while shown < limit:
            page = backend.list_jobs(marker=marker, limit=min(100, limit - shown), pool_id=pool)
            for job in page.jobs:
                r = job_record(job)
                if as_json:
                    typer.echo(json.dumps(r, sort_keys=True))
                else:
                    created = job.created.astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    files = "-" if r["files"] is None else str(r["files"])
                    source = f"{r['host'] or '-'}:{','.join(r['paths']) or '-'}"  # type: ignore[arg-type]
                    typer.echo(
                        f"{job.job_id}  {job.status:<11}  {created}  {job.pool_id or '-':<12}  "
                        f"{files:>8} files  {_size(r['source_bytes']):>10}  "
                        f"{_size(r['stored_bytes']):>10} stored  "
                        f"base {job.base_job_id or '-'}  {source}"
                    )
                shown += 1
            marker = page.next_marker
            if marker is None:
                break
        if marker is not None:
            typer.echo(f"cryo: more jobs: --marker {marker}", err=True)
    finally:
        backend.close()


LS_HELP = """List the entries of job JOB, like `ls -l`.

With PATH, only that entry and what lies under it (paths are relative to /,
as stored: `cryo ls JOB home/alice`).
"""


@app.command("ls", help=LS_HELP)
@handles_errors
def ls(
    job: Annotated[str, typer.Argument(help="JobId to list.")],
    path: Annotated[str | None, typer.Argument(help="Only this path and below.")] = None,
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per entry.")] = False,
) -> None:
    import os
    import sys

    from cryo.jobreader import JobReader
    from cryo.scan import KIND_DIR, KIND_HARDLINK, KIND_SYMLINK

    kinds = {KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK, "p": stat.S_IFIFO,
             "s": stat.S_IFSOCK, "c": stat.S_IFCHR, "b": stat.S_IFBLK}  # fmt: skip
    prefix = os.fsencode(path.strip("/")) if path else b""
    backend = RetryingBackend(
        backend_from_options(repo, endpoint_url, region, profile, create=False)
    )
    out = sys.stdout.buffer
    try:
        _, entries = JobReader(backend, job).manifest()
        for e in entries:
            if prefix and e.path != prefix and not e.path.startswith(prefix + b"/"):
                continue
            if as_json:
                record = {
                    "path": os.fsdecode(e.path), "type": e.kind, "mode": e.mode,
                    "size": e.size, "mtime_ns": e.mtime_ns, "uid": e.uid, "gid": e.gid,
                    "user": e.user, "group": e.group,
                    "target": os.fsdecode(e.target) if e.target is not None else None,
                }  # fmt: skip
                out.write(json.dumps(record, sort_keys=True).encode("utf-8", "surrogateescape"))
                out.write(b"\n")
                continue
            mode = stat.filemode(kinds.get(e.kind, stat.S_IFREG) | e.mode)
            when = datetime.fromtimestamp(e.mtime_ns / 1e9, tz=UTC).astimezone()
            line = (
                f"{mode} {e.user or e.uid:<8} {e.group or e.gid:<8} {e.size:>12} "
                f"{when:%Y-%m-%d %H:%M} "
            ).encode()
            name = b"/" + e.path
            if e.kind == KIND_SYMLINK and e.target is not None:
                name += b" -> " + e.target
            elif e.kind == KIND_HARDLINK and e.target is not None:
                name += b" => /" + e.target
            out.write(line + name + b"\n")
        out.flush()
    finally:
        backend.close()


FORGET_HELP = """Delete the jobs a retention policy does not keep, and reclaim their space.

Jobs are grouped by host and paths; in each group the newest --keep-last
jobs are kept, and the newest job of each of the last --keep-daily days,
--keep-weekly weeks and --keep-monthly months. A job kept by any rule
stays. Jobs in progress are never touched. Data is reclaimed only when no
remaining job uses it, so incrementals built on a forgotten job stay whole.

Examples:

  cryo forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12

  cryo forget --keep-last 3 --pool DEEP_ARCHIVE --dry-run
"""


@app.command("forget", help=FORGET_HELP)
@handles_errors
def forget(
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    keep_last: Annotated[int, typer.Option(min=0, help="Keep the N newest jobs.")] = 0,
    keep_daily: Annotated[int, typer.Option(min=0, help="Keep one job a day, N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option(min=0, help="Keep one job a week, N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option(min=0, help="Keep one job a month, N months.")] = 0,
    pool: PoolFilter = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Only print what would be forgotten.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
) -> None:
    from cryo.jobs import RetentionPolicy, iter_jobs, select_forget

    policy = RetentionPolicy(keep_last, keep_daily, keep_weekly, keep_monthly)
    settings = settings_from_options(repo, endpoint_url, region, profile)
    if policy.empty() and settings.get("retention"):
        policy = RetentionPolicy(**{k: int(v) for k, v in settings.get("retention").items()})
    if policy.empty():
        raise UsageError(
            "give at least one --keep-last/--keep-daily/--keep-weekly/--keep-monthly rule "
            "(or a retention table in the config profile)"
        )
    pool = _pool(pool)
    backend = RetryingBackend(backend_from_settings(settings, create=False))
    try:
        decisions = select_forget(list(iter_jobs(backend, pool)), policy)
        for d in decisions:
            action = "keep" if d.keep else ("would forget" if dry_run else "forget")
            if not d.keep and not dry_run:
                # Not found: gone already (a retry whose first attempt's reply was lost).
                with contextlib.suppress(ResourceNotFoundException):
                    backend.delete_job(d.job.job_id)
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "job_id": d.job.job_id,
                            "action": action.replace(" ", "_"),
                            "reasons": list(d.reasons),
                        },
                        sort_keys=True,
                    )
                )
            else:
                why = f" ({', '.join(d.reasons)})" if d.reasons else ""
                typer.echo(f"{action:<12} {d.job.job_id}{why}")
    finally:
        backend.close()
