"""Backup, verify and restore through a real ``cryo server`` on loopback, with the CLI
as a user runs it: credentials from the environment, --endpoint-url, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .server_helpers import REGION, ServerProcess
from .test_backup import run_cli, tree
from .test_restore import snapshot

__all__ = ["tree"]  # the fixture, re-used from the backup tests


def test_backup_verify_restore_through_the_server(
    cryo_server: ServerProcess, tmp_path: Path, tree: Path
) -> None:
    key_id, secret = cryo_server.new_key()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CRYO_"))},
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "CRYO_ENDPOINT_URL": cryo_server.url,
        "CRYO_REGION": REGION,
        "HOME": str(tmp_path),
    }
    b = run_cli("backup", str(tree), "--json", "--chunk-size", "1", env=env)
    assert b.returncode == 0, b.stderr
    summary = json.loads(b.stdout.decode().splitlines()[-1])
    assert summary["status"] == "COMPLETED" and summary["errors"] == []
    job = summary["job_id"]

    v = run_cli("verify", job, "--read-data", env=env)
    assert v.returncode == 0, v.stderr

    out = tmp_path / "out"
    r = run_cli("restore", job, "--to", str(out), "-q", env=env)
    assert r.returncode == 0, r.stderr
    restored = out / os.fsdecode(os.fsencode(tree).lstrip(b"/"))
    assert snapshot(restored) == snapshot(tree)

    jobs = run_cli("jobs", "--json", env=env)
    assert [json.loads(line)["job_id"] for line in jobs.stdout.decode().splitlines()] == [job]

    # Another key sees nothing of this job: authentication refused is exit 12.
    other_id, other_secret = cryo_server.new_key()
    other = {**env, "AWS_ACCESS_KEY_ID": other_id, "AWS_SECRET_ACCESS_KEY": other_secret}
    denied = run_cli("restore", job, "--to", str(tmp_path / "other"), env=other)
    assert denied.returncode == 12
    assert secret.encode() not in denied.stderr + b.stderr + r.stderr
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    assert run_cli("jobs", env=wrong).returncode == 12
