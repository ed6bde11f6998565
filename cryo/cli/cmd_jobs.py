"""``cryo jobs``: list jobs, newest first."""

from __future__ import annotations

import json
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


@app.command("jobs")
@handles_errors
def jobs(
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many jobs.")] = 20,
    pool: Annotated[str | None, typer.Option(help="Only jobs of this pool.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
) -> None:
    """List jobs, newest first: id, status, created, pool, objects."""
    from cryo.storage.wire import job_to_json

    backend = backend_from_options(repo, endpoint_url, region, profile)
    try:
        shown = 0
        marker = None
        while shown < limit:
            page = backend.list_jobs(marker=marker, limit=min(100, limit - shown), pool_id=pool)
            for job in page.jobs:
                if as_json:
                    typer.echo(json.dumps(job_to_json(job), sort_keys=True))
                else:
                    created = job.created.strftime("%Y-%m-%d %H:%M:%S")
                    typer.echo(
                        f"{job.job_id}  {job.status:<11}  {created}  "
                        f"{job.pool_id or '-':<12}  {job.object_count} objects"
                    )
                shown += 1
            marker = page.next_marker
            if marker is None:
                break
    finally:
        backend.close()
