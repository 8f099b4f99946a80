"""What compression reads and writes over gRPC: the registry and the data service.

Model versions, their files (downloaded once into a cache by sha256) and new
versions through the registry; dataset versions and split rows through the
data service. Failed calls become our errors, keeping the other service's
message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from google.protobuf import json_format

from aimass.common.v1 import common_pb2
from aimass.core.clients import ServiceChannels
from aimass.core.errors import AimassError, FailedPrecondition, NotFound, Unavailable
from aimass.core.splits import SPLITS, decode
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc

CHUNK = 1 << 20


def _mapped(service: str, err: grpc.aio.AioRpcError) -> AimassError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{service} service: {details}")
    return FailedPrecondition(f"{service} service refused: {details}")


@contextlib.asynccontextmanager
async def calling(service: str) -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise _mapped(service, err) from err


def version_config(version: registry_pb2.ModelVersion) -> dict[str, Any]:
    return json_format.MessageToDict(version.config.values) if version.config.values else {}


def artifact_of(version: registry_pb2.ModelVersion, kind: str) -> common_pb2.Artifact | None:
    return next((a for a in version.artifacts if a.kind == kind), None)


def require_onnx(version: registry_pb2.ModelVersion, field: str) -> common_pb2.Artifact:
    artifact = artifact_of(version, "onnx")
    if artifact is None:
        kinds = sorted(a.kind for a in version.artifacts) or ["none"]
        raise FailedPrecondition(
            f"{field}: {version.name} has no onnx artifact (it has {', '.join(kinds)}); "
            "compression works on the ONNX file that is served"
        )
    return artifact


class Sources:
    """Registry and data service clients and a local file cache."""

    def __init__(self, channels: ServiceChannels, cache_dir: Path) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(channels.get("registry"))
        self.data = data_pb2_grpc.DataServiceStub(channels.get("data"))
        self.cache_dir = cache_dir

    async def version(self, name: str) -> registry_pb2.ModelVersion:
        async with calling("registry"):
            return await self.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=name)
            )

    async def dataset_version(self, name: str) -> data_pb2.DatasetVersion:
        async with calling("data"):
            return await self.data.GetDatasetVersion(data_pb2.GetDatasetVersionRequest(name=name))

    async def artifact_file(self, version: registry_pb2.ModelVersion, kind: str) -> Path:
        """The version's artifact of ``kind`` on local disk (downloaded once, sha256 checked)."""
        artifact = artifact_of(version, kind)
        if artifact is None:
            raise FailedPrecondition(f"{version.name} has no {kind} artifact")
        target = (
            self.cache_dir
            / f"{artifact.sha256 or hashlib.sha256(version.name.encode()).hexdigest()}.{kind}"
        )
        if target.exists():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{id(self)}.part")
        digest = hashlib.sha256()
        async with calling("registry"):
            with partial.open("wb") as handle:
                request = registry_pb2.DownloadArtifactRequest(name=version.name, kind=kind)
                async for chunk in self.registry.DownloadArtifact(request):
                    handle.write(chunk.data)
                    digest.update(chunk.data)
        if artifact.sha256 and digest.hexdigest() != artifact.sha256:
            partial.unlink(missing_ok=True)
            raise FailedPrecondition(
                f"{version.name}: the {kind} download did not match its sha256"
            )
        partial.replace(target)
        return target

    async def split_table(self, dataset_version: str, split: str) -> pa.Table:
        """All rows of one split (an empty table when the split has none)."""
        request = data_pb2.ReadSplitRequest(name=dataset_version, split=SPLITS[split])
        async with calling("data"):
            responses = [response async for response in self.data.ReadSplit(request)]
        if not responses:
            return pa.table({})
        return decode(responses)

    async def upload(self, path: Path, kind: str, file_name: str) -> common_pb2.Artifact:
        """Uploads a file to the registry's artifact store; the Artifact to attach to a version."""
        content = await asyncio.to_thread(path.read_bytes)
        header = registry_pb2.UploadArtifactHeader(
            kind=kind, file_name=file_name, sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
        )  # fmt: skip

        async def messages() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            yield registry_pb2.UploadArtifactRequest(header=header)
            for offset in range(0, len(content), CHUNK):
                yield registry_pb2.UploadArtifactRequest(
                    chunk=common_pb2.ByteChunk(offset=offset, data=content[offset : offset + CHUNK])
                )

        async with calling("registry"):
            return await self.registry.UploadArtifact(messages())

    async def create_version(
        self, model: str, version: registry_pb2.ModelVersion, request_id: str
    ) -> registry_pb2.ModelVersion:
        async with calling("registry"):
            return await self.registry.CreateModelVersion(
                registry_pb2.CreateModelVersionRequest(
                    parent=model, model_version=version, request_id=request_id
                )
            )
