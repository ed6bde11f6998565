"""The ``cryo`` command line.

Commands are thin: they check flags, build an options object, call the core
and render its events. Each lives in its own ``cmd_*`` module, which registers
it on import; heavy imports (boto3, the pipelines) happen inside the command
bodies so ``cryo --help`` stays fast. ``main`` imports only the module of the
command it is asked for, found after the root options (typer builds every
registered command's parameters before running one, and importing and
building them all took 40 ms here, on every run); anything else (``cryo
--help``, a misspelt command) gets them all, as does ``app`` taken from this
module.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pkgutil
import sys
import threading
from typing import Any

from cryo.cli import common

_MODULE_OF: dict[str, str] = {
    "backup": "cmd_backup",
    "config": "cmd_config",
    "jobs": "cmd_jobs",
    "ls": "cmd_jobs",
    "forget": "cmd_jobs",
    "restore": "cmd_restore",
    "verify": "cmd_restore",
    "server": "cmd_server",
}
"""Command name -> the ``cmd_*`` module that registers it (checked by a test)."""


_ROOT_VALUE_OPTIONS = frozenset({"--config", "--log-file"})
"""The root options that take a value as the next argument (checked by a test)."""


def _command_name(args: list[str]) -> str | None:
    """The first argument that is neither a root option nor its value (None after a
    root ``--help``, which lists every command)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            return None
        if arg in _ROOT_VALUE_OPTIONS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return arg
    return None


def _register(args: list[str]) -> None:
    """Import the module of the command ``args`` name, or every ``cmd_*`` module."""
    module = _MODULE_OF.get(_command_name(args) or "")
    if module is not None:
        importlib.import_module(f"cryo.cli.{module}")
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"cryo.cli.{info.name}")


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole command line, for use in-process
        _register([])
        return common.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_GC_YOUNG = 20_000
"""Allocations between two looks of the cycle collector at young objects (see ``main``)."""


def main() -> None:
    """Console-script entry point.

    Once the command is over, its output flushed and no thread but daemons
    left, the process ends without tearing the interpreter down: freeing
    every module and object of boto3 and the pipelines took 0.12-0.16 s
    here, after the work was done. Anything else (an exit with a message,
    output that cannot be flushed) ends the ordinary way.

    The cycle collector looks at the young objects once per ``_GC_YOUNG``
    allocations instead of 700: a restore of 35,000 small files spent 0.29 s
    of CPU in it, and 0.03 s so. Garbage in cycles still goes, only a few
    thousand allocations later.
    """
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])
    _register(sys.argv[1:])
    try:
        common.app()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if (code is None or isinstance(code, int)) and _only_daemons_left():
        try:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # None: started with that descriptor closed
                    stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: let the interpreter report it as it would
        else:
            os._exit(code or 0)
    sys.exit(code)


def _only_daemons_left() -> bool:
    main_thread = threading.main_thread()
    return all(t.daemon for t in threading.enumerate() if t is not main_thread)
