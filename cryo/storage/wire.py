"""The JSON form of job records, shared by ``cryo server`` and ``RemoteBackend``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cryo.storage.api import Job


def drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def job_to_json(job: Job) -> dict[str, Any]:
    return drop_none(
        {
            "JobId": job.job_id,
            "Status": job.status,
            "Created": _ts(job.created),
            "Completed": _ts(job.completed),
            "BaseJobId": job.base_job_id,
            "PoolId": job.pool_id,
            "ClientToken": job.client_token,
            "Attributes": dict(job.attributes),
            "ObjectCount": job.object_count,
        }
    )


def job_from_json(data: dict[str, Any]) -> Job:
    created = _dt(data["Created"])
    assert created is not None
    return Job(
        job_id=data["JobId"],
        status=data["Status"],
        created=created,
        completed=_dt(data.get("Completed")),
        base_job_id=data.get("BaseJobId"),
        pool_id=data.get("PoolId"),
        client_token=data.get("ClientToken"),
        attributes=data.get("Attributes", {}),
        object_count=int(data.get("ObjectCount", 0)),
    )
