"""Storage: one interface (``api.Backend``), two implementations.

* ``local.LocalBackend``: the embedded repository (SQLite catalog plus a
  content-addressed chunk store), used in-process and by ``cryo server``.
* ``remote.RemoteBackend``: a boto3 ``backupstorage`` client for any
  endpoint speaking the Backup Storage API.

``open_backend`` picks one from the user's settings: an endpoint URL means
remote, otherwise the repository directory (``--repo``, ``$CRYO_REPO``, or
the XDG data directory).
"""

from __future__ import annotations

from pathlib import Path

from cryo.storage.api import Backend


def open_backend(
    repo: Path | str | None = None,
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    profile: str | None = None,
    create: bool = True,
    max_connections: int = 16,
) -> Backend:
    """The backend the settings name; a repository is created on first use if ``create``."""
    if endpoint_url:
        from cryo.storage.remote import RemoteBackend

        return RemoteBackend(
            endpoint_url, region=region, profile=profile, max_connections=max_connections
        )
    from cryo.storage.local import LocalBackend, default_repository_path

    return LocalBackend(Path(repo) if repo else default_repository_path(), create=create)
