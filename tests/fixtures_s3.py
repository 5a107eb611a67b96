"""Object storage for tests: a real SeaweedFS S3 gateway on free loopback ports (pytest plugin)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from kubetune.spec import StorageSpec
from kubetune.storage import Storage
from kubetune.storage.seaweed import SeaweedServer

# Without identities SeaweedFS accepts any key; these just satisfy botocore's credential chain.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-test", "AWS_SECRET_ACCESS_KEY": "kubetune-test-secret",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def s3_client(endpoint: str, **credentials: str) -> Any:
    """A plain boto3 client for test setup and inspection (not the code under test)."""
    config = Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2})
    return boto3.session.Session(**credentials).client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                                       config=config)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TEST_CREDENTIALS.items():
            patch.setenv(name, value)
        # No profile file or instance metadata may leak into the tests' credential chain.
        patch.delenv("AWS_PROFILE", raising=False)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with SeaweedServer(Path(tmp_path_factory.mktemp("seaweed"))) as server:
            yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedServer) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_server.endpoint)
    client.create_bucket(Bucket=name)
    yield name
    # Dropped afterwards: each bucket is a SeaweedFS collection holding volumes of its own, and `weed mini` allows
    # as many volumes as the free disk holds (12 with 13 GB free), so one server for the whole suite ran out of
    # them mid-suite on a fuller disk ("No writable volumes and no free volumes left").
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_storage(s3_server: SeaweedServer) -> Storage:
    return Storage(StorageSpec(endpoint=s3_server.endpoint))
