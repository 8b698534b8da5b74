"""Pytest plugin: a real SeaweedFS S3 endpoint for the test session (`pytest_plugins = ["tests.s3_fixtures"]`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from infra.local.s3 import S3Service, start_seaweedfs


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """SeaweedFS on free 127.0.0.1 ports with a random key/secret and one bucket; stopped at the end."""
    s3 = start_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key="test-" + secrets.token_hex(8),
        secret_key=secrets.token_urlsafe(24),
        bucket="rapidin-test",
    )  # start_seaweedfs turns telemetry off (-master.telemetry=false, DO_NOT_TRACK=1)
    try:
        yield s3
    finally:
        s3.stop()
