"""The ``cryo`` command line.

Commands are thin: they check flags, build an options object, call the core
and render its events. Each lives in its own ``cmd_*`` module, found and
registered below; heavy imports (boto3, the pipelines) happen inside the command bodies
so ``cryo --help`` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from cryo.cli.common import app

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("cmd_"):
        importlib.import_module(f"cryo.cli.{_info.name}")


def main() -> None:
    """Console-script entry point."""
    app()
