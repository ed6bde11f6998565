"""The shipped Backup Storage model: identical to AWS's last published one, and
usable by boto3 on today's botocore with no environment variable set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from cryo import model

OFFICIAL = "botocore-a-la-carte-backupstorage==1.34.124"
MEMBER_PATH = "botocore/data/backupstorage/2018-04-10/service-2.json"


def _strip_docs(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_docs(v)
            for k, v in value.items()
            if k not in ("documentation", "documentationUrl")
        }
    if isinstance(value, list):
        return [_strip_docs(v) for v in value]
    return value


@pytest.fixture(scope="session")
def official_model(request: pytest.FixtureRequest) -> dict[str, Any]:
    """AWS's model from the PyPI wheel, read from the wheel file, never installed
    (installing it would put the model into botocore's own data directory)."""
    cache = Path(request.config.cache.mkdir("official-backupstorage-model"))
    wheels = sorted(cache.glob("*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--quiet", "-d", str(cache), OFFICIAL],
            check=True,
        )  # fmt: skip
        wheels = sorted(cache.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        data: dict[str, Any] = json.loads(wheel.read(MEMBER_PATH))
    return data


def test_shipped_model_matches_the_official_one(official_model: dict[str, Any]) -> None:
    ours = model.service_model_json()
    official = _strip_docs(official_model)
    assert ours["metadata"] == official["metadata"]
    assert sorted(ours["operations"]) == sorted(official["operations"])
    for name, op in official["operations"].items():
        assert ours["operations"][name] == op, name
    assert sorted(ours["shapes"]) == sorted(official["shapes"])
    for name, shape in official["shapes"].items():
        assert ours["shapes"][name] == shape, name
    assert ours == official


def test_model_facts_cryo_relies_on() -> None:
    m = model.service_model_json()
    assert m["metadata"]["signingName"] == "backup-storage"
    assert m["metadata"]["protocol"] == "rest-json"
    unsigned = {n for n, op in m["operations"].items() if op.get("authtype") == "v4-unsigned-body"}
    assert unsigned == {"PutChunk", "PutObject", "NotifyObjectComplete"}


def test_botocore_alone_no_longer_knows_the_service() -> None:
    import botocore.session
    from botocore.exceptions import UnknownServiceError

    with pytest.raises(UnknownServiceError):
        botocore.session.Session().create_client("backupstorage", region_name="us-east-1")


def test_registered_session_builds_a_real_client() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AWS_DATA_PATH"}
    code = """
import cryo.model
session = cryo.model.boto3_session(aws_access_key_id="AK", aws_secret_access_key="SK")
client = session.client("backupstorage", region_name="eu-west-1",
                        endpoint_url="http://127.0.0.1:9")
loader = session._session.get_component("data_loader")
_, path = loader.load_data_with_path("backupstorage/2018-04-10/service-2")
print(client.meta.service_model.signing_name)
print(sorted(client.meta.service_model.operation_names))
print(path)
print(client.exceptions.ThrottlingException.__name__)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "backup-storage"
    assert out[1] == str(
        sorted(
            [
                "DeleteObject", "GetChunk", "GetObjectMetadata", "ListChunks", "ListObjects",
                "NotifyObjectComplete", "PutChunk", "PutObject", "StartObject",
            ]
        )
    )  # fmt: skip
    assert out[2].startswith(str(model.DATA_PATH))
    assert out[3] == "ThrottlingException"
