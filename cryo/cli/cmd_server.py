"""``cryo server``: the Backup Storage API over HTTP, on a repository directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cryo.cli.common import RepoOption, app, handles_errors


@app.command("server")
@handles_errors
def server(
    repo: RepoOption = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="HOST:PORT to listen on; port 0 picks a free one. The URL is printed first.",
        ),
    ] = "127.0.0.1:7480",
    allow_public: Annotated[
        bool,
        typer.Option("--allow-public", help="Allow listening on an address other than loopback."),
    ] = False,
    credentials: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            help="File of access keys, one 'ACCESS_KEY_ID SECRET' per line; re-read when it "
            "changes (env: CRYO_SERVER_CREDENTIALS). CRYO_SERVER_ACCESS_KEY_ID and "
            "CRYO_SERVER_SECRET_ACCESS_KEY add one key.",
            show_default=False,
        ),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            "--region",
            help="Region requests must be signed for (env: CRYO_REGION).",
            show_default="us-east-1",
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option("--log-format", help="Access log on stderr: text or json."),
    ] = "text",
    max_connections: Annotated[
        int,
        typer.Option(min=1, max=4096, help="Connections served at once (one thread each)."),
    ] = 64,
    max_requests_per_key: Annotated[
        int,
        typer.Option(
            min=0,
            help="Requests in progress per access key before ThrottlingException (0: no limit).",
        ),
    ] = 32,
    shutdown_grace: Annotated[
        float,
        typer.Option(min=0, help="Seconds SIGTERM waits for requests in progress."),
    ] = 60.0,
) -> None:
    """Serve the Backup Storage API (2018-04-10) and cryo's job API over HTTP.

    Every request must be signed with SigV4 (signing name backup-storage) by a
    key from --credentials. Stops on SIGTERM or Ctrl-C once the requests in
    progress are done (exit 0).
    """
    from cryo.exitcodes import UsageError
    from cryo.server.app import ServerConfig, check_listen, parse_listen, run
    from cryo.server.log import FORMATS
    from cryo.storage.local import default_repository_path

    if log_format not in FORMATS:
        raise UsageError(f"--log-format must be one of {', '.join(FORMATS)}")
    host, port = parse_listen(listen)
    check_listen(host, allow_public)
    config = ServerConfig(
        repo=repo if repo is not None else default_repository_path(),
        host=host,
        port=port,
        region=region or os.environ.get("CRYO_REGION") or "us-east-1",
        credentials=credentials,
        log_format=log_format,
        max_connections=max_connections,
        max_requests_per_key=max_requests_per_key,
        shutdown_grace=shutdown_grace,
    )
    raise typer.Exit(run(config))
