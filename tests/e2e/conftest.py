"""e2e fixtures: real processes on 127.0.0.1 (see tests/s3fixtures.py for the S3 endpoint)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.s3fixtures import MotoServer, boto3_client, moto_server, set_dummy_aws_env


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One moto S3 server process for the session; tests isolate themselves by bucket."""
    with moto_server() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials through the standard chain (environment), nothing from ~/.aws or IMDS."""
    set_dummy_aws_env(monkeypatch)


@pytest.fixture
def bucket(moto: MotoServer, aws_env: None) -> str:
    """A fresh, empty bucket on the session's moto server."""
    name = f"lungserve-{uuid.uuid4().hex[:12]}"
    boto3_client("s3", moto.url).create_bucket(Bucket=name)
    return name
