"""Both artifact store backends behind one fixture, and a backdoor to what they wrote.

``store`` is parametrized: a LocalArtifactStore under tmp_path and an S3ArtifactStore on
a fresh bucket of the moto server (5 MiB parts, so multipart paths run on small data).
``backdoor`` reaches the storage directly, without the store: to count objects and
leftovers and to corrupt stored bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from artifact_support import Backdoor

from aimass.core.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore
from aimass.core.settings import S3Settings


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if backend == "local":
        return LocalArtifactStore((tmp_path / "artifacts").as_uri())
    bucket = request.getfixturevalue("s3_bucket")
    settings: S3Settings = request.getfixturevalue("s3_settings")
    return S3ArtifactStore(f"s3://{bucket}/team/artifacts", settings)


@pytest.fixture
def backdoor(store: ArtifactStore, backend: str, request: pytest.FixtureRequest) -> Backdoor:
    client = request.getfixturevalue("s3_client") if backend == "s3" else None
    return Backdoor(store, client)
