"""The access keys ``cryo server`` accepts.

Keys come from a credentials file, from the environment, or both:

* **File** (``--credentials FILE`` or ``$CRYO_SERVER_CREDENTIALS``): one key
  per line, ``ACCESS_KEY_ID SECRET_ACCESS_KEY`` separated by blanks. Blank
  lines and lines starting with ``#`` are ignored. An access key id is 1 to
  128 characters of ``A-Z a-z 0-9 . _ - + = @``; a secret is 1 to 256
  printable ASCII characters without blanks. Each id appears once.
* **Environment**: ``$CRYO_SERVER_ACCESS_KEY_ID`` and
  ``$CRYO_SERVER_SECRET_ACCESS_KEY`` add one key.

The file is read again when it changes (checked at most once a second, and
at once when a request names a key the server does not know), so keys can be
added or revoked without a restart. A file that becomes unreadable or invalid
leaves the previous keys in force, and the problem is logged. Messages never
quote a secret, nor a line of the file that may hold one.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cryo.exitcodes import UsageError

ENV_FILE = "CRYO_SERVER_CREDENTIALS"
ENV_KEY_ID = "CRYO_SERVER_ACCESS_KEY_ID"
ENV_SECRET = "CRYO_SERVER_SECRET_ACCESS_KEY"  # noqa: S105 - a variable name, not a secret

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._\-+=@]{1,128}$")
_SECRET_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
_RECHECK_SECONDS = 1.0


class CredentialsError(UsageError):
    """The credentials file or environment is not usable (a usage error: exit status 2)."""


def parse_credentials(text: str, source: str) -> dict[str, str]:
    """The keys in ``text`` (the file format above); ``source`` names it in errors."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) != 2:
            raise CredentialsError(
                f"{source}, line {number}: expected ACCESS_KEY_ID and SECRET_ACCESS_KEY "
                f"separated by blanks, found {len(fields)} fields"
            )
        key_id, secret = fields
        if not _KEY_ID_RE.match(key_id):
            raise CredentialsError(
                f"{source}, line {number}: the access key id must be 1 to 128 characters "
                "of A-Z a-z 0-9 . _ - + = @"
            )
        if not _SECRET_RE.match(secret):
            raise CredentialsError(
                f"{source}, line {number}: the secret must be 1 to 256 printable ASCII characters"
            )
        if key_id in keys:
            raise CredentialsError(f"{source}, line {number}: access key {key_id} appears twice")
        keys[key_id] = secret
    return keys


def keys_from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    key_id = environ.get(ENV_KEY_ID, "")
    secret = environ.get(ENV_SECRET, "")
    if not key_id and not secret:
        return {}
    if not key_id or not secret:
        raise CredentialsError(f"set both {ENV_KEY_ID} and {ENV_SECRET}, or neither")
    return parse_credentials(f"{key_id} {secret}", "the environment")


class KeyStore:
    """Access key id -> secret, from a file (re-read when it changes) and fixed keys."""

    def __init__(
        self,
        path: Path | None = None,
        fixed: Mapping[str, str] | None = None,
        *,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._fixed = dict(fixed or {})
        self._warn = warn or (lambda message: None)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._file_keys: dict[str, str] = {}
        if path is not None:
            self._file_keys = self._read(path)
        self._keys = {**self._file_keys, **self._fixed}
        if not self._keys:
            raise CredentialsError(
                "no access keys: give --credentials FILE (or $"
                f"{ENV_FILE}), or set {ENV_KEY_ID} and {ENV_SECRET}"
            )

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, path: Path) -> dict[str, str]:
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self._warn(
                f"credentials file {path} is accessible to other users; restrict it with chmod 600"
            )
        keys = parse_credentials(text, str(path))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return keys

    def _refresh(self, force: bool) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < _RECHECK_SECONDS:
                return
            self._checked = now
            try:
                st = self.path.stat()
            except OSError as exc:
                self._warn(f"cannot read credentials file {self.path}: {exc}; keeping the keys")
                return
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return
            try:
                self._file_keys = self._read(self.path)
            except CredentialsError as exc:
                self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                self._warn(f"{exc}; keeping the previous keys")
                return
            self._keys = {**self._file_keys, **self._fixed}

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of ``access_key_id``, or None if no such key is configured."""
        self._refresh(force=False)
        secret = self._keys.get(access_key_id)
        if secret is None and self.path is not None:
            self._refresh(force=True)
            secret = self._keys.get(access_key_id)
        return secret


def load_keys(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> KeyStore:
    """The key store for a server: ``path`` (else ``$CRYO_SERVER_CREDENTIALS``) plus the env key."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_FILE):
        path = Path(env[ENV_FILE]).expanduser()
    return KeyStore(path, keys_from_environment(env), warn=warn)
