"""A real registry per test: the service's own build() on a migrated database (SQLite and
PostgreSQL through ``migrated_db_url``), a file:// artifact store under tmp_path and a
fresh JetStream server, served by grpc.aio on a free port."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.core.server import RunningServer
from aimass.core.service import start_service
from aimass.core.settings import Settings, load_settings
from aimass.registry.main import SERVICE_NAME, build
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.fixtures.stack import EventLog, record_events

CHUNK = 64 * 1024


@dataclass
class Registry:
    """A running registry and a client stub for it."""

    stub: registry_pb2_grpc.RegistryServiceStub
    settings: Settings
    running: RunningServer
    channel: grpc.aio.Channel

    @property
    def artifact_dir(self) -> Path:
        return Path(self.settings.artifact_root.removeprefix("file://"))

    async def upload(
        self, data: bytes, kind: str = "onnx", file_name: str = ""
    ) -> common_pb2.Artifact:
        """Uploads ``data`` in several chunks with its sha256 and size declared."""
        header = pb.UploadArtifactHeader(
            kind=kind,
            file_name=file_name or f"model.{kind}",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )

        async def messages() -> AsyncIterator[pb.UploadArtifactRequest]:
            yield pb.UploadArtifactRequest(header=header)
            for start in range(0, len(data), CHUNK):
                chunk = common_pb2.ByteChunk(offset=start, data=data[start : start + CHUNK])
                yield pb.UploadArtifactRequest(chunk=chunk)

        return await self.stub.UploadArtifact(messages())

    async def create_model(self, model_id: str, **fields: Any) -> pb.RegisteredModel:
        return await self.stub.CreateRegisteredModel(
            pb.CreateRegisteredModelRequest(
                registered_model=pb.RegisteredModel(**fields), registered_model_id=model_id
            )
        )

    async def create_version(
        self, model_id: str, request_id: str = "", **fields: Any
    ) -> pb.ModelVersion:
        return await self.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=pb.ModelVersion(**fields),
                request_id=request_id,
            )
        )


async def collect(stream: Any) -> bytes:
    return b"".join([chunk.data async for chunk in stream])


def settings_for(home: Path, db_url: str, nats_url: str) -> Settings:
    return load_settings(
        home=home,
        database_url=db_url,
        artifact_root=(home / "artifacts").as_uri(),
        nats_url=nats_url,
        log_format="console",
    )


@asynccontextmanager
async def serve_registry(settings: Settings) -> AsyncIterator[Registry]:
    running, _ctx = await start_service(SERVICE_NAME, build, settings, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Registry(registry_pb2_grpc.RegistryServiceStub(channel), settings, running, channel)
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture
async def registry(migrated_db_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Registry]:
    async with serve_registry(settings_for(tmp_path / "home", migrated_db_url, nats_url)) as reg:
        yield reg


@pytest.fixture
async def registry_events(registry: Registry) -> AsyncIterator[EventLog]:
    async with record_events(
        registry.settings.nats_url, "registry-test", ["aimass.registry.>"]
    ) as log:
        yield log
