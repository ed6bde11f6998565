"""Settings: flags, then environment, then the config file, then defaults.

The config file is TOML (``$XDG_CONFIG_HOME/cryo/config.toml``, i.e.
``~/.config/cryo/config.toml``, or ``--config`` / ``$CRYO_CONFIG``) and holds
named profiles; ``--profile`` / ``$CRYO_PROFILE`` picks one, else the one
named ``default`` applies (if any)::

    [profiles.default]
    repository = "/srv/cryo"            # or endpoint_url = "http://..."
    pool = "GLACIER"
    exclude = ["*.tmp", "/home/*/.cache"]
    retention = { keep_daily = 7, keep_weekly = 4, keep_monthly = 12 }

    [profiles.offsite]
    endpoint_url = "http://backup.example.net:7480"
    region = "eu-west-1"
    aws_profile = "backup"              # credentials from ~/.aws, or:
    aws_access_key_id = "AK..."
    aws_secret_access_key = "..."

Each resolved setting remembers where it came from, so ``cryo config show``
can say so; secrets are masked whenever settings are shown or logged.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryo.exitcodes import UsageError

KEYS = {
    "repository": str,
    "endpoint_url": str,
    "region": str,
    "aws_profile": str,
    "aws_access_key_id": str,
    "aws_secret_access_key": str,
    "pool": str,
    "exclude": list,
    "retention": dict,
}
SECRET_KEYS = ("aws_secret_access_key",)
RETENTION_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")
ENV = {
    "repository": "CRYO_REPO",
    "endpoint_url": "CRYO_ENDPOINT_URL",
    "region": "CRYO_REGION",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
}


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "cryo" / "config.toml"


@dataclass(slots=True)
class Settings:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    config_path: Path | None = None

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def secrets(self) -> list[str]:
        return [str(self.values[k]) for k in SECRET_KEYS if self.values.get(k)]

    def shown(self) -> dict[str, Any]:
        """Every setting with its source; secrets masked."""
        out: dict[str, Any] = {}
        for key in KEYS:
            if key in self.values:
                value = self.values[key]
                if key in SECRET_KEYS:
                    value = mask(str(value))
                out[key] = {"value": value, "source": self.sources[key]}
        return out


def mask(secret: str) -> str:
    return "****" if len(secret) < 12 else f"{secret[:2]}****{secret[-2:]}"


def load_config(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"config file {path}: [profiles] must be a table of profiles")
    for name, profile in profiles.items():
        if not isinstance(profile, dict):
            raise UsageError(f"config file {path}: profile {name!r} must be a table")
        for key, value in profile.items():
            if key not in KEYS:
                raise UsageError(f"config file {path}: profile {name!r}: unknown key {key!r}")
            if not isinstance(value, KEYS[key]):
                raise UsageError(
                    f"config file {path}: profile {name!r}: {key} must be a {KEYS[key].__name__}"
                )
        for key in profile.get("retention", {}):
            if key not in RETENTION_KEYS:
                raise UsageError(
                    f"config file {path}: profile {name!r}: unknown retention rule {key!r}"
                )
    return profiles


def resolve(
    flags: dict[str, Any],
    profile: str | None,
    config: Path | None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Flags (non-None), then environment, then the config profile."""
    env = os.environ if environ is None else environ
    profile = profile or env.get("CRYO_PROFILE") or None
    config_env = env.get("CRYO_CONFIG")
    explicit = config is not None or bool(config_env)
    path = config or (Path(config_env) if config_env else default_config_path())
    profiles = load_config(path, explicit)
    if profile is not None and profile not in profiles:
        raise UsageError(f"no profile {profile!r} in {path}")
    chosen = profiles.get(profile or "default", {})
    s = Settings(profile=profile or ("default" if chosen else None), config_path=path)
    for key in KEYS:
        if flags.get(key) is not None:
            s.values[key], s.sources[key] = flags[key], "flag"
        elif key in ENV and env.get(ENV[key]):
            s.values[key], s.sources[key] = env[ENV[key]], f"env {ENV[key]}"
        elif key in chosen:
            s.values[key], s.sources[key] = chosen[key], f"config {path} [{s.profile}]"
    if s.get("repository") and s.get("endpoint_url"):
        if s.sources["repository"] == s.sources["endpoint_url"] == "flag":
            raise UsageError("give either --repo or --endpoint-url, not both")
        # The more specific source wins: a flag over env over config.
        rank = {"flag": 0}
        r = rank.get(s.sources["repository"], 1 if s.sources["repository"].startswith("env") else 2)
        e = rank.get(
            s.sources["endpoint_url"], 1 if s.sources["endpoint_url"].startswith("env") else 2
        )
        drop = "endpoint_url" if r < e else "repository"
        s.values.pop(drop)
        s.sources.pop(drop)
    return s
