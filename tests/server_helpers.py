"""Start a real ``cryo server`` process on 127.0.0.1 (port 0) and talk to it."""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import threading
from pathlib import Path

from cryo.storage.remote import RemoteBackend

REGION = "us-east-1"


class ServerProcess:
    """A ``cryo server`` child process, its credentials file and its log."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.repo = workdir / "repo"
        self.credentials = workdir / "credentials"
        self.log_path = workdir / "server.log"
        self._lock = threading.Lock()
        if not self.credentials.exists():
            self.credentials.write_text("# access keys of the test server\n")
            self.credentials.chmod(0o600)
        self.first_key = self.new_key()
        cmd = [
            sys.executable, "-m", "cryo", "server",
            "--repo", str(self.repo),
            "--listen", "127.0.0.1:0",
            "--credentials", str(self.credentials),
            "--region", REGION,
            *args,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRYO_")}
        full_env.update(env or {})
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, env=full_env, cwd=workdir
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"cryo server did not start ({line!r}):\n{self.log()}")
        self.url = line

    def new_key(self) -> tuple[str, str]:
        """A fresh access key, added to the credentials file the server re-reads."""
        key_id = "AKCRYO" + secrets.token_hex(7).upper()
        secret = secrets.token_urlsafe(30)
        with self._lock, self.credentials.open("a") as f:
            f.write(f"{key_id} {secret}\n")
        return key_id, secret

    def client(self, key: tuple[str, str] | None = None, **kwargs: object) -> RemoteBackend:
        key_id, secret = key or self.new_key()
        return RemoteBackend(
            self.url,
            region=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            **kwargs,  # type: ignore[arg-type]
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()
            if self.process.stdout is not None:
                self.process.stdout.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
