"""``cryo config show``: the settings a command would use, and where each comes from."""

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
    handles_errors,
    settings_from_options,
)

config_app = typer.Typer(
    help="Show the resolved configuration (flags, then environment, then config file).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


@config_app.command("show")
@handles_errors
def show(
    repo: RepoOption = None,
    endpoint_url: EndpointOption = None,
    region: RegionOption = None,
    profile: ProfileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print every resolved setting with its source; secrets are masked."""
    from cryo.storage.local import default_repository_path

    s = settings_from_options(repo, endpoint_url, region, profile)
    shown = s.shown()
    if "repository" not in shown and "endpoint_url" not in shown:
        shown["repository"] = {"value": str(default_repository_path()), "source": "default"}
    if as_json:
        record = {"config_file": str(s.config_path), "profile": s.profile, "settings": shown}
        typer.echo(json.dumps(record, sort_keys=True))
        return
    typer.echo(f"config file: {s.config_path}")
    typer.echo(f"profile:     {s.profile or '-'}")
    for key, item in shown.items():
        typer.echo(f"{key:<22} {json.dumps(item['value'])}  ({item['source']})")
