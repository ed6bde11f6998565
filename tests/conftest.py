"""Fixtures shared by the whole suite.

``backend`` is parametrised over every storage implementation the
conformance suite runs against; each instance gets a fresh repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryo.storage.api import Backend
from cryo.storage.local import LocalBackend

BACKEND_KINDS = ["local"]


def _make_local(path: Path) -> Backend:
    return LocalBackend(path)


MAKERS: dict[str, Callable[[Path], Backend]] = {"local": _make_local}


@pytest.fixture(params=BACKEND_KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = MAKERS[request.param](tmp_path / "repo")
    try:
        yield b
    finally:
        b.close()
