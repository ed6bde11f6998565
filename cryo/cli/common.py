"""What every command shares: the Typer app, common options, error rendering."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TextIO, TypeVar

import typer

from cryo import __version__
from cryo.exitcodes import FATAL, USAGE, exit_code_for

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


@dataclass(slots=True)
class CliState:
    """What the root options set for the command that runs (one per process)."""

    config: Path | None = None
    log_file: Path | None = None
    verbose: int = 0
    traceback: bool = False
    secrets: list[str] = field(default_factory=list)
    settings: Any = None


STATE = CliState()
log = logging.getLogger("cryo")


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
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Config file (TOML, named profiles). (env CRYO_CONFIG; "
            "default ~/.config/cryo/config.toml)",
            show_default=False,
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file", help="Append a timestamped log to this file.", show_default=False
        ),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More messages on stderr (-vv).")
    ] = 0,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="On an error, print the traceback (debugging).")
    ] = False,
) -> None:
    """Chunked, verified backups over the AWS Backup Storage API."""
    STATE.config = config
    STATE.log_file = log_file
    STATE.verbose = verbose
    STATE.traceback = traceback
    _setup_logging()


def redact(text: str) -> str:
    """``text`` with every secret this process knows of masked."""
    for secret in STATE.secrets:
        if secret and secret in text:
            text = text.replace(secret, "****")
    return text


class _Redact(logging.Filter):
    """Mask every known secret in a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _setup_logging() -> None:
    env_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if env_secret:
        STATE.secrets.append(env_secret)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    redact = _Redact()
    if STATE.log_file is not None:
        try:
            handler: logging.Handler = logging.FileHandler(STATE.log_file, encoding="utf-8")
        except OSError as exc:
            raise fail(f"cannot open log file {STATE.log_file}: {exc.strerror}", USAGE) from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG if STATE.verbose >= 2 else logging.INFO)
        handler.addFilter(redact)
        root.addHandler(handler)
    if STATE.verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("cryo: %(levelname)s: %(message)s"))
        console.setLevel(logging.DEBUG if STATE.verbose >= 2 else logging.INFO)
        console.addFilter(redact)
        root.addHandler(console)
    if not root.handlers:
        root.addHandler(logging.NullHandler())  # errors are reported by fail(), not logging
    root.setLevel(logging.DEBUG if STATE.verbose >= 2 else logging.INFO)
    # Library chatter (botocore, urllib3) only at -vv, and only cryo's own below that.
    logging.getLogger("botocore").setLevel(logging.DEBUG if STATE.verbose >= 2 else logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.DEBUG if STATE.verbose >= 2 else logging.WARNING)


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
    typer.Option(
        "--profile",
        help="Profile of the config file to use. (env CRYO_PROFILE; default: 'default')",
    ),
]


def settings_from_options(
    repo: Path | None, endpoint_url: str | None, region: str | None, profile: str | None
) -> Any:
    """Flags, then environment, then the config profile (see cryo.config)."""
    from cryo.config import resolve

    s = resolve(
        {"repository": str(repo) if repo else None, "endpoint_url": endpoint_url or None,
         "region": region or None},
        profile,
        STATE.config,
    )  # fmt: skip
    STATE.secrets.extend(s.secrets())
    STATE.settings = s
    return s


def backend_from_options(
    repo: Path | None,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    *,
    create: bool = True,
) -> Any:
    """The backend the flags (then the environment, then the config file) name."""
    return backend_from_settings(
        settings_from_options(repo, endpoint_url, region, profile), create=create
    )


def backend_from_settings(s: Any, *, create: bool = True) -> Any:
    endpoint = s.get("endpoint_url")
    if endpoint:
        from cryo.storage.remote import RemoteBackend

        log.info("endpoint %s (%s)", endpoint, s.sources["endpoint_url"])
        return RemoteBackend(
            endpoint,
            region=s.get("region"),
            profile=s.get("aws_profile"),
            aws_access_key_id=s.get("aws_access_key_id"),
            aws_secret_access_key=s.get("aws_secret_access_key"),
        )
    from cryo.storage.local import LocalBackend, default_repository_path

    path = Path(s.get("repository")).expanduser() if s.get("repository") else None
    path = path or default_repository_path()
    log.info("repository %s", path)
    # cryo's pipeline hashes every chunk it sends; the embedded store need not hash it again.
    return LocalBackend(path, create=create, trust_checksums=True)


def fail(message: str, code: int, as_json: bool = False) -> typer.Exit:
    """Report an error (one line on stderr, or a JSON object on stdout); returns the Exit."""
    message = redact(message)
    log.error("%s (exit %d)", message, code)
    if as_json:
        record = {"type": "error", "message": message, "exit_code": code}
        _say(sys.stdout, json.dumps(record, sort_keys=True) + "\n")
    _say(sys.stderr, f"cryo: {message}\n")
    return typer.Exit(code)


def _say(stream: TextIO | None, text: str) -> None:
    """Write ``text`` if ``stream`` can take it: a closed one must not change the exit code."""
    if stream is None:  # the process started with that descriptor closed
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn every failure into one line on stderr and the documented exit code.

    SIGTERM is handled like Ctrl-C: the command stops cleanly and exits 130.
    With ``--json`` the error is also a JSON object on stdout; with
    ``--traceback`` the traceback follows.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from cryo.errors import CryoError

        as_json = bool(kwargs.get("as_json"))
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        log.info("cryo %s %s", func.__name__, __version__)
        try:
            result = func(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code:
                log.info("exit %d", exc.exit_code)
            raise
        except CryoError as exc:
            _maybe_traceback()
            raise fail(str(exc) or type(exc).__name__, exit_code_for(exc), as_json) from None
        except KeyboardInterrupt:
            raise fail("interrupted", exit_code_for(KeyboardInterrupt()), as_json) from None
        except (typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes exit 1
            _maybe_traceback()
            hint = "" if STATE.traceback else " (--traceback shows where)"
            raise fail(
                f"internal error: {type(exc).__name__}: {exc}{hint}", FATAL, as_json
            ) from None
        log.info("done")
        return result

    return wrapper


def _maybe_traceback() -> None:
    if STATE.traceback:
        import traceback

        sys.stderr.write(redact(traceback.format_exc()))
