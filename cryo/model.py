"""The AWS Backup Storage service model (2018-04-10), shipped with cryo.

botocore dropped ``backupstorage`` in 1.34.125. cryo carries the model as
package data under ``cryo/data`` (same layout as botocore's own data
directory) and registers that directory with a session's data loader, ahead
of botocore's built-in paths, so a real ``backupstorage`` client can be built
on any current botocore without ``AWS_DATA_PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import boto3
    import botocore.session

SERVICE_NAME = "backupstorage"
API_VERSION = "2018-04-10"
SIGNING_NAME = "backup-storage"

#: Directory to put on botocore's search path (or in ``AWS_DATA_PATH``).
DATA_PATH = Path(__file__).resolve().parent / "data"


def register(session: botocore.session.Session | boto3.session.Session) -> None:
    """Make ``session`` able to build ``backupstorage`` clients.

    Accepts a botocore or a boto3 session. Idempotent.
    """
    import boto3

    core = session._session if isinstance(session, boto3.session.Session) else session
    loader = core.get_component("data_loader")
    path = str(DATA_PATH)
    if path not in loader.search_paths:
        loader.search_paths.insert(0, path)


def boto3_session(**kwargs: Any) -> boto3.session.Session:
    """A new boto3 session (profile, credentials as keyword args) with the model registered."""
    import boto3

    session = boto3.session.Session(**kwargs)
    register(session)
    return session


def service_model_json() -> dict[str, Any]:
    """The shipped ``service-2.json`` as a dictionary."""
    import json

    path = DATA_PATH / SERVICE_NAME / API_VERSION / "service-2.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
