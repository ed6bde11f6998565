"""What every command shares: the Typer app, common options, error rendering."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from cryo import __version__
from cryo.exitcodes import exit_code_for

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="cryo",
    help=(
        "Chunked, verified backups over the AWS Backup Storage API.\n\n"
        "With no --repo and no --endpoint-url, cryo uses its embedded repository "
        "($CRYO_REPO, else ~/.local/share/cryo/repository): no server to start."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Chunked, verified backups over the AWS Backup Storage API."""


RepoOption = Annotated[
    Path | None,
    typer.Option(
        "--repo",
        help="Repository directory of the embedded backend. (env CRYO_REPO)",
        show_default=False,
    ),
]
EndpointOption = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url",
        help="Backup Storage endpoint (e.g. a `cryo server`). (env CRYO_ENDPOINT_URL)",
        show_default=False,
    ),
]
RegionOption = Annotated[
    str | None,
    typer.Option("--region", help="Region used to sign requests. (env CRYO_REGION)"),
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="AWS profile with the credentials. (env CRYO_PROFILE)"),
]


def backend_from_options(
    repo: Path | None,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    *,
    create: bool = True,
) -> Any:
    """The backend the flags (then the environment) name."""
    from cryo.exitcodes import UsageError
    from cryo.storage import open_backend

    endpoint_url = endpoint_url or os.environ.get("CRYO_ENDPOINT_URL") or None
    if repo is not None and endpoint_url:
        raise UsageError("give either --repo or --endpoint-url, not both")
    return open_backend(
        repo,
        endpoint_url,
        region=region or os.environ.get("CRYO_REGION") or None,
        profile=profile or os.environ.get("CRYO_PROFILE") or None,
        create=create,
    )


def fail(message: str, code: int) -> typer.Exit:
    """Print ``cryo: message`` on stderr; the caller raises the returned Exit."""
    sys.stderr.write(f"cryo: {message}\n")
    return typer.Exit(code)


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn cryo's exceptions into one line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from cryo.errors import CryoError

        try:
            return func(*args, **kwargs)
        except CryoError as exc:
            raise fail(str(exc) or type(exc).__name__, exit_code_for(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", exit_code_for(KeyboardInterrupt())) from None

    return wrapper
