"""Jobs as a user sees them: pools, the base of an incremental, retention.

Every job has a unique id that is never reused, belongs to a **pool**
(``GLACIER`` by default, or ``DEEP_ARCHIVE``), and records in its
attributes the host and paths it backed up, its tags and its figures.

**Base selection.** An incremental backup uses as its base the newest
complete (COMPLETED or PARTIAL) job of the same pool whose host and paths
are the backup's own; jobs are listed newest first, so the search stops at
the first match.

**Retention** (``select_forget``) follows restic's rules. Complete jobs are
grouped by host and paths; within a group, newest first, ``keep_last``
keeps the N newest, and ``keep_daily`` / ``keep_weekly`` / ``keep_monthly``
keep the newest job of each of the N most recent days, ISO weeks and months
(local time) that have a job. A job kept by any rule stays; the others are
forgotten. Jobs in progress or failed are never selected: a backup may
still be running or resuming them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryo.storage.api import JOB_COMPLETED, JOB_PARTIAL, Job

POOLS = ("GLACIER", "DEEP_ARCHIVE")
DEFAULT_POOL = "GLACIER"
COMPLETE_STATUSES = (JOB_COMPLETED, JOB_PARTIAL)


class UnknownPool(ValueError):
    """A pool name that is not one of ``POOLS``."""


def check_pool(pool: str) -> str:
    """The pool's canonical name; raises UnknownPool."""
    canonical = pool.upper().replace("-", "_")
    if canonical not in POOLS:
        raise UnknownPool(f"unknown pool {pool!r}: choose {' or '.join(POOLS)}")
    return canonical


def iter_jobs(backend: Any, pool: str | None = None, page_size: int = 100) -> Iterator[Job]:
    """Every job, newest first, paging with the listing's marker."""
    marker = None
    while True:
        page = backend.list_jobs(marker=marker, limit=page_size, pool_id=pool)
        yield from page.jobs
        marker = page.next_marker
        if marker is None:
            return


def job_paths(job: Job) -> list[str]:
    paths = job.attributes.get("paths")
    return [str(p) for p in paths] if isinstance(paths, list) else []


def same_source(job: Job, host: str, paths: Sequence[str]) -> bool:
    return job.attributes.get("host") == host and job_paths(job) == list(paths)


def find_base(backend: Any, host: str, paths: Sequence[str], pool: str | None) -> Job | None:
    """The newest complete job of ``pool`` that backed up ``paths`` on ``host``."""
    for job in iter_jobs(backend, pool):
        stdin = job.attributes.get("stdin")
        if job.status in COMPLETE_STATUSES and same_source(job, host, paths) and not stdin:
            return job
    return None


def find_token_job(backend: Any, token: str) -> Job | None:
    """The job created with client token ``token``, if any."""
    for job in iter_jobs(backend):
        if job.client_token == token:
            return job
    return None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def empty(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


@dataclass(frozen=True, slots=True)
class Decision:
    job: Job
    keep: bool
    reasons: tuple[str, ...]


def _day(t: datetime) -> tuple[int, ...]:
    local = t.astimezone()
    return (local.year, local.month, local.day)


def _week(t: datetime) -> tuple[int, ...]:
    iso = t.astimezone().isocalendar()
    return (iso.year, iso.week)


def _month(t: datetime) -> tuple[int, ...]:
    local = t.astimezone()
    return (local.year, local.month)


def select_forget(jobs: Sequence[Job], policy: RetentionPolicy) -> list[Decision]:
    """Keep or forget each complete job of ``jobs`` under ``policy``, newest first."""
    groups: dict[tuple[str, tuple[str, ...]], list[Job]] = {}
    for job in jobs:
        if job.status not in COMPLETE_STATUSES:
            continue
        key = (str(job.attributes.get("host", "")), tuple(job_paths(job)))
        groups.setdefault(key, []).append(job)
    decisions: list[Decision] = []
    for group in groups.values():
        group.sort(key=lambda j: (j.created, j.job_id), reverse=True)
        reasons: dict[str, list[str]] = {j.job_id: [] for j in group}
        for j in group[: policy.keep_last]:
            reasons[j.job_id].append("last")
        for label, count, bucket in (
            ("daily", policy.keep_daily, _day),
            ("weekly", policy.keep_weekly, _week),
            ("monthly", policy.keep_monthly, _month),
        ):
            seen: set[tuple[int, ...]] = set()
            for j in group:
                if len(seen) >= count:
                    break
                b = bucket(j.created)
                if b not in seen:
                    seen.add(b)
                    reasons[j.job_id].append(label)
        decisions += [Decision(j, bool(reasons[j.job_id]), tuple(reasons[j.job_id])) for j in group]
    decisions.sort(key=lambda d: (d.job.created, d.job.job_id), reverse=True)
    return decisions


def int_attribute(job: Job, key: str) -> int | None:
    """A job's integer attribute (a figure ``cryo backup`` recorded), or None."""
    v = job.attributes.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def job_record(job: Job) -> dict[str, object]:
    """A job as ``cryo jobs --json`` shows it."""
    a = job.attributes

    def n(key: str) -> int | None:
        return int_attribute(job, key)

    tags = a.get("tags")
    return {
        "job_id": job.job_id,
        "status": job.status,
        "created": job.created.isoformat(),
        "completed": job.completed.isoformat() if job.completed else None,
        "host": a.get("host"),
        "paths": job_paths(job),
        "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
        "files": n("files"),
        "files_unchanged": n("files_unchanged"),
        "source_bytes": n("source_bytes"),
        "stored_bytes": n("bytes_stored"),
        "base_job_id": job.base_job_id,
        "pool": job.pool_id,
        "objects": job.object_count,
    }
