"""Fixtures shared by the whole suite.

``backend`` is parametrised over every storage implementation the
conformance suite runs against: ``local`` gets a fresh repository,
``remote`` a ``RemoteBackend`` with a fresh access key on one ``cryo server``
process started for the whole session (so tests cannot see each other's jobs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryo.storage.api import Backend
from cryo.storage.local import LocalBackend

from .server_helpers import ServerProcess

BACKEND_KINDS = ["local", "remote"]


def _make_local(request: pytest.FixtureRequest, path: Path) -> Backend:
    return LocalBackend(path)


def _make_remote(request: pytest.FixtureRequest, path: Path) -> Backend:
    server: ServerProcess = request.getfixturevalue("cryo_server")
    return server.client()


MAKERS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "local": _make_local,
    "remote": _make_remote,
}


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test (and every CLI it starts) keeps run locks and pending runs to itself."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def cryo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One ``cryo server`` on 127.0.0.1 (port 0) for the session; stopped with SIGTERM."""
    server = ServerProcess(tmp_path_factory.mktemp("cryo-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def json_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A ``cryo server`` of the test's own with a JSON access log (one line per request)."""
    (tmp_path / "server").mkdir()
    server = ServerProcess(tmp_path / "server", "--log-format", "json")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.fixture(params=BACKEND_KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = MAKERS[request.param](request, tmp_path / "repo")
    try:
        yield b
    finally:
        b.close()
