"""Exit codes: the one place where an outcome becomes a process exit status.

=====  ==========================================================
code   meaning
=====  ==========================================================
0      success
1      fatal error
2      usage error (bad flag, bad argument)
3      partial backup: job committed, some files unreadable or changed
10     repository or endpoint unreachable
11     job not found
12     authentication refused
13     lock held by another run
130    interrupted (Ctrl-C, SIGTERM)
=====  ==========================================================
"""

from __future__ import annotations

from cryo.errors import (
    AccessDeniedException,
    CryoError,
    EndpointUnreachable,
    RepositoryError,
    ResourceNotFoundException,
)

OK = 0
FATAL = 1
USAGE = 2
PARTIAL = 3
UNREACHABLE = 10
NOT_FOUND = 11
AUTH = 12
LOCKED = 13
INTERRUPTED = 130


class UsageError(CryoError):
    """A flag or argument the user must change."""


class PartialSuccess(CryoError):
    """The command did its job but some inputs could not be used (exit 3)."""


class LockHeld(CryoError):
    """Another run holds the lock this one needs."""


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, PartialSuccess):
        return PARTIAL
    if isinstance(exc, LockHeld):
        return LOCKED
    if isinstance(exc, EndpointUnreachable | RepositoryError):
        return UNREACHABLE
    if isinstance(exc, ResourceNotFoundException):
        return NOT_FOUND
    if isinstance(exc, AccessDeniedException):
        return AUTH
    return FATAL
