"""The ``cryo`` command line.

Commands are thin: they check flags, build an options object, call the core
and render its events. Each lives in its own ``cmd_*`` module, registered
below; heavy imports (boto3, the pipelines) happen inside the command bodies
so ``cryo --help`` stays fast.
"""

from __future__ import annotations

import importlib

from cryo.cli.common import app

COMMAND_MODULES = ("cmd_jobs",)

for _name in COMMAND_MODULES:
    importlib.import_module(f"cryo.cli.{_name}")


def main() -> None:
    """Console-script entry point."""
    app()
