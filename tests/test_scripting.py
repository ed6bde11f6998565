"""cryo under cron and in scripts: exit codes, quiet and JSON output, config, signals, logs.

Every command runs as a subprocess with no terminal, as cron runs it. The
README's example scripts are extracted and run as they are written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .server_helpers import REGION, ServerProcess

CLI = [sys.executable, "-m", "cryo"]
README = Path(__file__).resolve().parent.parent / "README.md"
ANSI = re.compile(rb"\x1b\[")


def cryo(
    *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYO_", "AWS_"))}
    full_env.update(env or {})
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [*CLI, *args], capture_output=True, stdin=subprocess.DEVNULL, timeout=300,
        env=full_env, **kw,
    )  # fmt: skip


def make_tree(root: Path, big: int = 0) -> Path:
    (root / "etc").mkdir(parents=True)
    for i in range(20):
        (root / "etc" / f"conf{i}.txt").write_text(f"setting = {i}\n")
    for i in range(big):
        (root / f"data{i}.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    return root


def no_ansi(*results: subprocess.CompletedProcess[bytes]) -> None:
    for r in results:
        assert not ANSI.search(r.stdout + r.stderr), r


def test_quiet_backup_prints_exactly_the_job_id(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    r = cryo("backup", str(src), "--repo", str(tmp_path / "repo"), "--quiet")
    assert r.returncode == 0
    assert re.fullmatch(rb"\d{8}T\d{6}Z-[0-9a-f]{8}\n", r.stdout)
    assert r.stderr == b""
    plain = cryo("backup", str(src), "--repo", str(tmp_path / "repo"))
    assert plain.returncode == 0
    assert len(plain.stdout.splitlines()) == 1  # data on stdout: the JobId
    assert len(plain.stderr.splitlines()) <= 2  # a summary line for a person, no more
    no_ansi(r, plain)


def test_json_lines_parse_and_summaries_carry_their_fields(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", big=2)
    repo = str(tmp_path / "repo")
    b = cryo("backup", str(src), "--repo", repo, "--json")
    assert b.returncode == 0
    lines = [json.loads(x) for x in b.stdout.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary"
    for key in ("job_id", "files", "bytes_read", "bytes_stored", "retries", "errors", "seconds"):
        assert key in summary
    assert summary["files"] == 22 and summary["errors"] == []
    assert all(x["type"] in ("progress", "warning", "summary") for x in lines)
    job = summary["job_id"]
    r = cryo("restore", job, "--repo", repo, "--to", str(tmp_path / "out"), "--json")
    assert r.returncode == 0
    rs = [json.loads(x) for x in r.stdout.splitlines()][-1]
    assert rs["type"] == "summary" and rs["files"] == 22 and rs["errors"] == []
    v = cryo("verify", job, "--repo", repo, "--read-data", "--json")
    vs = json.loads(v.stdout.splitlines()[-1])
    assert v.returncode == 0
    assert (vs["type"], vs["job_id"], vs["read_data"], vs["bad_files"]) == ("summary", job, True, 0)
    assert vs["entries"] > 22
    for args in (["jobs"], ["ls", job], ["forget", "--keep-last", "5"], ["config", "show"]):
        out = cryo(*args, "--repo", repo, "--json")
        assert out.returncode == 0, out.stderr
        assert [json.loads(x) for x in out.stdout.splitlines()]
    # A failure under --json is a JSON error object carrying the exit code.
    missing = cryo("restore", "20990101T000000Z-00000000", "--repo", repo, "--to",
                   str(tmp_path / "x"), "--json")  # fmt: skip
    assert missing.returncode == 11
    error = json.loads(missing.stdout.splitlines()[-1])
    assert error["type"] == "error" and error["exit_code"] == 11
    no_ansi(b, r, v, missing)


def test_exit_codes_name_their_cause(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    repo = str(tmp_path / "repo")
    assert cryo("backup", str(src), "--repo", repo, "-q").returncode == 0
    usage = cryo("backup", str(src), "--repo", repo, "--no-such-flag")
    assert usage.returncode == 2
    assert cryo("backup", str(tmp_path / "nowhere"), "--repo", repo).returncode == 2
    not_found = cryo("restore", "20990101T000000Z-00000000", "--repo", repo, "--to", "x")
    assert not_found.returncode == 11
    assert len(not_found.stderr.splitlines()) == 1
    # Fatal: a repository directory that is not a repository.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    fatal = cryo("jobs", "--repo", str(tmp_path / "junk"))
    assert fatal.returncode in (1, 10)
    assert b"Traceback" not in fatal.stderr and len(fatal.stderr.splitlines()) == 1
    no_ansi(usage, not_found, fatal)


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1/", "http://[::1", "http://h:x"])
def test_an_endpoint_that_is_not_an_http_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    (tmp_path / "f").write_text("x")
    keys = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret-of-the-test"}
    r = cryo("backup", str(tmp_path / "f"), "--endpoint-url", url, env=keys)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode() == f"cryo: endpoint URL {url!r} is not an http:// or https:// URL\n"


def test_an_aws_profile_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    env = {"AWS_PROFILE": "no-such-profile", "HOME": str(tmp_path)}
    r = cryo("jobs", "--endpoint-url", "http://127.0.0.1:9", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode().startswith("cryo: no AWS profile 'no-such-profile' in the AWS config")
    assert len(r.stderr.splitlines()) == 1


def _terminate_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> None:
    """Send SIGTERM as soon as ``ready()``, while the command is surely still running.

    The process is stopped first, so it cannot finish between the check and
    the signal; the signal is delivered the moment it continues.
    """
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert time.monotonic() < deadline, "the command never got under way"
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)


def test_sigterm_stops_a_backup_with_130_and_the_next_run_resumes(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", big=40)
    repo = str(tmp_path / "repo")
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [*CLI, "backup", str(src), "--repo", repo, "--quiet", "--connections", "1",
         "--chunk-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    pending = tmp_path / "state" / "cryo" / "pending"
    chunks = Path(repo) / "chunks"
    # Some 1 MiB chunks are stored (so some files are complete), far from all 160.
    _terminate_when(proc, lambda: sum(1 for c in chunks.glob("*/*") if c.is_file()) > 16)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, err
    assert err.strip().endswith(b"cryo: interrupted")
    assert out == b""
    assert list(pending.glob("*.json"))  # the unfinished run is recorded

    again = cryo("backup", str(src), "--repo", repo, "--json", env=env)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["resumed"] is True
    assert summary["files_unchanged"] > 0
    assert not list(pending.glob("*.json"))
    jobs = [json.loads(x) for x in cryo("jobs", "--repo", repo, "--json").stdout.splitlines()]
    assert [j["job_id"] for j in jobs] == [summary["job_id"]]
    assert jobs[0]["status"] == "COMPLETED"


def test_sigterm_stops_a_restore_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", big=30)
    repo = str(tmp_path / "repo")
    job = cryo("backup", str(src), "--repo", repo, "-q").stdout.decode().strip()
    target = tmp_path / "target"
    proc = subprocess.Popen(
        [*CLI, "restore", job, "--repo", repo, "--to", str(target), "--connections", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    restored = target / str(src).lstrip("/")
    _terminate_when(proc, lambda: restored.is_dir() and any(restored.glob(".cryo-restore-*")))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(list(restored.glob("data*.bin"))) < 30  # it was stopped part way
    leftovers = [p for p in target.rglob("*") if p.name.startswith(".cryo-restore-")]
    assert leftovers == []


def test_settings_come_from_flags_then_environment_then_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[profiles.default]\nrepository = "/srv/from-config"\nregion = "eu-west-1"\n'
        'exclude = ["*.tmp"]\n\n'
        '[profiles.offsite]\nendpoint_url = "http://127.0.0.1:9"\npool = "DEEP_ARCHIVE"\n'
        'aws_secret_access_key = "config-secret-value-123456"\n'
    )

    def show(*args: str, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
        r = cryo("--config", str(config), "config", "show", "--json", *args, env=env)
        assert r.returncode == 0, r.stderr
        assert b"config-secret-value-123456" not in r.stdout + r.stderr
        return json.loads(r.stdout)["settings"]  # type: ignore[no-any-return]

    assert show()["repository"]["value"] == "/srv/from-config"
    assert show(env={"CRYO_REPO": "/srv/from-env"})["repository"]["value"] == "/srv/from-env"
    flagged = show("--repo", "/srv/from-flag", env={"CRYO_REPO": "/srv/from-env"})
    assert flagged["repository"] == {"value": "/srv/from-flag", "source": "flag"}
    assert show(env={"CRYO_REGION": "ap-south-1"})["region"]["source"] == "env CRYO_REGION"
    offsite = show("--profile", "offsite")
    assert offsite["endpoint_url"]["value"] == "http://127.0.0.1:9"
    assert offsite["aws_secret_access_key"]["value"] != "config-secret-value-123456"
    assert show(env={"CRYO_PROFILE": "offsite"})["pool"]["value"] == "DEEP_ARCHIVE"
    bad = cryo("--config", str(config), "config", "show", "--profile", "nope")
    assert bad.returncode == 2 and b"no profile 'nope'" in bad.stderr

    # The config's excludes apply to a backup that names no repository on the command line.
    src = make_tree(tmp_path / "src")
    (src / "scratch.tmp").write_text("skip me")
    repo = tmp_path / "repo"
    config.write_text(f'[profiles.default]\nrepository = "{repo}"\nexclude = ["*.tmp"]\n')
    job = cryo("--config", str(config), "backup", str(src), "-q").stdout.decode().strip()
    listing = cryo("--config", str(config), "ls", job).stdout
    assert b"conf1.txt" in listing and b"scratch.tmp" not in listing

    # The profile's retention applies to a forget that gives no rule of its own.
    config.write_text(
        f'[profiles.default]\nrepository = "{repo}"\nretention = {{ keep_last = 1 }}\n'
    )
    newest = cryo("--config", str(config), "backup", str(src), "-q").stdout.decode().strip()
    forgot = cryo("--config", str(config), "forget", "--json")
    assert forgot.returncode == 0, forgot.stderr
    actions = {d["job_id"]: d["action"] for d in map(json.loads, forgot.stdout.splitlines())}
    assert actions == {newest: "keep", job: "forget"}


def test_a_secret_in_the_environment_appears_in_no_output_or_log(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    server = ServerProcess(tmp_path / "server")
    try:
        key_id, secret = server.new_key()
        src = make_tree(tmp_path / "src")
        log = tmp_path / "cryo.log"
        env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
               "CRYO_REGION": REGION, "CRYO_ENDPOINT_URL": server.url}  # fmt: skip
        outputs = [
            cryo("--log-file", str(log), "-vv", "backup", str(src), "--json", env=env),
            cryo("--log-file", str(log), "-vv", "jobs", env=env),
            cryo("--log-file", str(log), "-vv", "config", "show", env=env),
            cryo(
                "--log-file",
                str(log),
                "--traceback",
                "restore",
                "20990101T000000Z-0",
                "--to",
                str(tmp_path / "out"),
                env=env,
            ),
            cryo(
                "--log-file",
                str(log),
                "-v",
                "jobs",
                env={**env, "AWS_SECRET_ACCESS_KEY": secret[:-1] + "x"},
            ),
        ]
        assert outputs[0].returncode == 0 and outputs[-1].returncode == 12
        text = log.read_bytes()
        assert b"INFO" in text and b"DEBUG" in text  # it did log, with levels and times
        assert re.search(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text, re.M)
        for r in outputs:
            assert secret.encode() not in r.stdout + r.stderr
        assert secret.encode() not in text
        assert secret[:-1].encode() not in text
    finally:
        server.stop()


def _example(name: str) -> str:
    text = README.read_text()
    block = text.split(f"<!-- example: {name} -->", 1)[1].split("<!-- /example -->", 1)[0]
    return block.split("```sh\n", 1)[1].rsplit("```", 1)[0]


def test_a_command_started_with_its_output_closed_keeps_its_exit_code_and_its_log(
    tmp_path: Path,
) -> None:
    src = make_tree(tmp_path / "src")
    log = tmp_path / "cryo.log"
    repo = str(tmp_path / "repo")
    # stdout closed, as some daemons start their children
    shell = ["sh", "-c", 'exec "$@" >&-', "sh", *CLI, "--log-file", str(log)]
    r = subprocess.run([*shell, "backup", str(src), "--repo", repo, "-q"],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert b"done" in log.read_bytes()
    jobs = cryo("jobs", "--repo", repo, "--json")
    assert jobs.returncode == 0
    assert [json.loads(line)["status"] for line in jobs.stdout.splitlines()] == ["COMPLETED"]
    # A failure with nowhere to write its line still exits with its documented code.
    missing = str(tmp_path / "missing")
    quiet = ["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *CLI, "backup", missing, "--repo", repo]
    r = subprocess.run(quiet, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == cryo("backup", missing, "--repo", repo).returncode == 2


def test_readme_nightly_cron_script(tmp_path: Path) -> None:
    script = tmp_path / "cryo-nightly"
    script.write_text(_example("nightly"))
    src = make_tree(tmp_path / "src")
    env = {"CRYO_REPO": str(tmp_path / "repo"), "SRC": str(src), "LOG": str(tmp_path / "log"),
           "PATH": os.environ["PATH"], "XDG_STATE_HOME": str(tmp_path / "state")}  # fmt: skip
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cryo").write_text(f'#!/bin/sh\nexec {sys.executable} -m cryo "$@"\n')
    (bindir / "cryo").chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    for _ in range(2):
        r = subprocess.run(["sh", str(script)], env=env, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
        assert r.returncode == 0
        assert r.stdout == b"" and r.stderr == b""  # cron mails nothing on success
    assert b"INFO" in (tmp_path / "log").read_bytes()
    # A failure is one line and a non-zero status.
    env["CRYO_REPO"] = str(tmp_path / "log")  # a file, not a repository
    bad = subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=300)
    assert bad.returncode != 0
    assert b"backup failed with exit status" in bad.stdout
    assert len(bad.stdout.splitlines()) == 1


def test_readme_recovery_script_restores_the_latest_job(tmp_path: Path) -> None:
    script = tmp_path / "cryo-recover"
    script.write_text(_example("recover"))
    src = make_tree(tmp_path / "src", big=1)
    repo = str(tmp_path / "repo")
    assert cryo("backup", str(src), "--repo", repo, "-q").returncode == 0
    (src / "etc" / "conf3.txt").write_text("changed after the first backup\n")
    latest = cryo("backup", str(src), "--repo", repo, "-q").stdout.decode().strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cryo").write_text(f'#!/bin/sh\nexec {sys.executable} -m cryo "$@"\n')
    (bindir / "cryo").chmod(0o755)
    env = {"CRYO_REPO": repo, "PATH": f"{bindir}:{os.environ['PATH']}"}
    target = tmp_path / "restore"
    r = subprocess.run(["sh", str(script), socket.gethostname(), str(target)], env=env,
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == f"restored {latest} of {socket.gethostname()} into {target}"
    restored = target / str(src).lstrip("/")
    for p in src.rglob("*"):
        if p.is_file():
            assert (restored / p.relative_to(src)).read_bytes() == p.read_bytes()
    none = subprocess.run(["sh", str(script), "no-such-host", str(tmp_path / "t2")], env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert none.returncode == 11


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_scripts(shell: str) -> None:
    r = cryo("--show-completion", shell, env={"SHELL": f"/bin/{shell}"})
    assert r.returncode == 0
    assert b"cryo" in r.stdout and len(r.stdout) > 100
    version = cryo("--version")
    assert re.fullmatch(rb"cryo \d+\.\d+\.\d+\n", version.stdout)


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run cryo with stderr on a pseudo-terminal; exit status, stdout, terminal output."""
    import pty
    import select

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYO_", "AWS_"))}
    env.update(TERM="xterm", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryo", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            seen += data
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    return proc.wait(), out, text


def test_progress_on_a_terminal_shows_totals_and_time_remaining(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(150):
        (src / f"f{i:03d}").write_bytes(os.urandom(100_000))
    repo = str(tmp_path / "repo")
    code, out, term = _on_a_terminal("backup", "--repo", repo, str(src))
    assert code == 0, term
    job = out.split()[-1]
    # The totals were counted beside the run, so the bar knows where it ends.
    assert "150/150 files" in term
    assert "15.0/15.0 MB" in term
    assert "ETA" in term
    code, out, term = _on_a_terminal("restore", job, "--repo", repo, "--to", str(tmp_path / "out"))
    assert code == 0, term
    assert "150/150 files" in term
    assert "15.0/15.0 MB" in term


def test_json_progress_of_a_restore_carries_its_totals(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    repo = str(tmp_path / "repo")
    job = cryo("backup", "-q", "--repo", repo, str(src)).stdout.decode().strip()
    done = cryo("restore", job, "--repo", repo, "--to", str(tmp_path / "out"), "--json")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    last = [r for r in records if r.get("type") == "progress"][-1]
    files = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert last["files_total"] == last["files"] == files
    assert last["bytes_total"] == last["bytes_done"] == size


def _whole_command_line() -> Any:
    """The click group of every command (``cryo.cli.app`` loads them all)."""
    import typer.main

    from cryo import cli

    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.main.TyperGroup)
    return group


def test_every_command_runs_when_its_module_alone_is_loaded() -> None:
    # `cryo NAME` imports only NAME's module: a command missing from that
    # table, or registered by another module, would be "No such command".
    from cryo import cli

    group = _whole_command_line()
    assert set(group.commands) == set(cli._MODULE_OF)
    for name in sorted(group.commands):
        r = cryo(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        assert f"{name} [OPTIONS]".encode() in r.stdout, name
    for args in (["--help"], ["--help", "restore"], ["-v", "-h", "ls"]):
        top = cryo(*args)
        assert top.returncode == 0, args
        for name in group.commands:
            assert f"│ {name} ".encode() in top.stdout, (args, name)


def test_root_options_before_a_command_leave_it_found(tmp_path: Path) -> None:
    # The command is found after the root options; a root option's value that
    # happens to be a command's name is not taken for the command.
    from cryo import cli

    group = _whole_command_line()
    takes_value = {
        opt
        for param in group.params
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for opt in param.opts
    }
    assert takes_value == cli._ROOT_VALUE_OPTIONS
    log = tmp_path / "restore"
    r = cryo("-v", "--log-file", str(log), "--traceback", "backup", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert b"backup [OPTIONS]" in r.stdout
    r = cryo("--log-file", "restore", "backup", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert b"backup [OPTIONS]" in r.stdout
