"""Helper processes that share one run, for work one interpreter would serialise.

A restore of many small files spends its time in per-file system calls and
the Python around each of them; threads take turns on the interpreter lock,
processes do not. ``Team.start`` forks helper processes ``1 .. count - 1``
(the caller is member 0 and does its own share), each running
``work(index, send)``. ``send`` carries any picklable message back through a
pipe, where a reader thread in the parent hands it to ``on_message``.

Guarantees:

- Fork happens before the caller starts its own threads, so a helper
  inherits no lock another thread holds. A helper opens its own storage
  connections and descriptors; it never closes or uses what it inherited,
  and leaves with ``os._exit``, running none of the parent's exit handlers
  and flushing none of its streams.
- A helper's exception reaches ``on_error`` in the parent (re-created from
  its pickle; as :class:`HelperFailed` when it does not pickle). A helper
  that dies without a word (killed, out of memory) is reported the same way.
- ``stop`` sends SIGTERM, which raises :class:`Stopped` in a helper's main
  thread, so it cleans up as after any other error; it is killed after
  ``grace`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from cryo.errors import CryoError

Send = Callable[[Any], None]

_MESSAGE, _ERROR, _DONE = 0, 1, 2


class Stopped(CryoError):
    """Raised in a helper whose team is stopping (SIGTERM), or whose parent is gone."""


class HelperFailed(CryoError):
    """A helper process failed in a way its own exception could not tell."""


class Team:
    def __init__(self) -> None:
        self._pids: dict[int, int] = {}
        self._readers: list[threading.Thread] = []

    @classmethod
    def start(
        cls,
        count: int,
        work: Callable[[int, Send], None],
        on_message: Callable[[int, Any], None],
        on_error: Callable[[BaseException], None],
    ) -> Team:
        """Fork members ``1 .. count - 1``; call before starting any thread."""
        team = cls()
        conns: list[tuple[int, Connection]] = []
        parent = os.getpid()
        try:
            for index in range(1, count):
                r, w = os.pipe2(os.O_CLOEXEC)
                try:
                    pid = os.fork()
                except BaseException:
                    os.close(r)
                    os.close(w)
                    raise
                if pid == 0:  # pragma: no cover - the helper; its effects are what tests see
                    try:
                        os.close(r)
                        for _, c in conns:
                            with contextlib.suppress(OSError):
                                c.close()
                        _helper(work, index, Connection(w, readable=False), parent)
                    finally:
                        os._exit(1)  # never back into the parent's code
                os.close(w)
                team._pids[index] = pid
                conns.append((index, Connection(r, writable=False)))
        except BaseException:
            for _, c in conns:
                c.close()
            team.stop()
            raise
        for index, conn in conns:
            t = threading.Thread(
                target=team._read, args=(index, conn, on_message, on_error),
                name=f"helper-{index}", daemon=True,
            )  # fmt: skip
            t.start()
            team._readers.append(t)
        return team

    def _read(
        self,
        index: int,
        conn: Connection,
        on_message: Callable[[int, Any], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        done = False
        try:
            while True:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    break
                if kind == _MESSAGE:
                    on_message(index, payload)
                elif kind == _ERROR:
                    on_error(payload)
                else:
                    done = True
        except BaseException as exc:  # noqa: BLE001 - any failure to read a helper is its failure
            on_error(HelperFailed(f"helper process {index}: unreadable message: {exc}"))
            done = True
        finally:
            conn.close()
        status = self._reap(index)
        if not done:
            on_error(HelperFailed(f"helper process {index} stopped unexpectedly ({status})"))

    def _reap(self, index: int) -> str:
        pid = self._pids.pop(index, None)  # whoever takes it waits for it
        if pid is None:
            return "reaped"
        try:
            _, raw = os.waitpid(pid, 0)
        except ChildProcessError:
            return "reaped"
        if os.WIFSIGNALED(raw):
            return f"signal {os.WTERMSIG(raw)}"
        return f"exit status {os.waitstatus_to_exitcode(raw)}"

    def wait(self, check: Callable[[], None]) -> None:
        """Wait for every helper to finish, calling ``check`` (which may raise) meanwhile."""
        for t in self._readers:
            while t.is_alive():
                t.join(0.1)
                check()
        check()

    def stop(self, grace: float = 30.0) -> None:
        """Ask every helper still running to stop; wait for them (all killed after ``grace``)."""
        deadline = time.monotonic() + grace
        for pid in list(self._pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for t in self._readers:
            t.join(max(0.0, deadline - time.monotonic()))
        if not self._readers:  # stopped while starting: nobody reaps them but this
            while self._pids and time.monotonic() < deadline:
                for index, pid in list(self._pids.items()):
                    with contextlib.suppress(ChildProcessError):
                        if os.waitpid(pid, os.WNOHANG)[0] == 0:
                            continue
                    del self._pids[index]
                time.sleep(0.05)
        for pid in list(self._pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for t in self._readers:
            t.join()
        for index in list(self._pids):
            self._reap(index)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one Stopped; cleaning up is not interrupted
    raise Stopped("a restore helper process was stopped (SIGTERM)")


def _die_with(parent: int) -> None:
    """SIGTERM when the parent process dies (Linux), so no helper outlives its run."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before that took effect
        raise Stopped("the restore's first process is gone")


def _helper(work: Callable[[int, Send], None], index: int, conn: Connection, parent: int) -> None:
    """A helper's life: run ``work``, report how it ended, leave without the parent's exits."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        _die_with(parent)
        lock = threading.Lock()

        def send(message: Any) -> None:
            with lock:
                conn.send((_MESSAGE, message))

        try:
            work(index, send)
            with lock:
                conn.send((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - the parent decides what a helper's error means
            code = 1
            with lock:
                try:
                    conn.send((_ERROR, exc))
                except Exception:  # noqa: BLE001 - it does not pickle: say what it was
                    conn.send((_ERROR, HelperFailed(f"{type(exc).__name__}: {exc}")))
    except BaseException:  # noqa: BLE001 - the pipe is gone; the exit status tells
        code = 1
    finally:
        os._exit(code)
