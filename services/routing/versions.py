"""Model versions as the router needs them: resolved aliases, a local ONNX file, a signature.

Everything comes from the registry's gRPC API; ONNX files are downloaded once
into a cache folder named by their sha256 (written to a temporary file and
renamed, so a crash never leaves half a model behind).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from aimass.core.auth import scope
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.repository import Signature, TensorInfo, signature_from_onnx

VERSION_RE = re.compile(r"models/([a-z][a-z0-9-]{0,62})/versions/(\d+)")
ALIAS_RE = re.compile(r"models/([a-z][a-z0-9-]{0,62})/aliases/([a-z][a-z0-9_-]{0,62})")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    sha256: str
    size_bytes: int
    path: Path
    signature: Signature


def check_model_reference(value: str, field: str) -> None:
    if not (VERSION_RE.fullmatch(value) or ALIAS_RE.fullmatch(value)):
        raise InvalidArgument(
            field,
            f"{value!r} is neither models/{{model}}/versions/{{n}}"
            " nor models/{model}/aliases/{alias}",
        )


def _signature(version: registry_pb2.ModelVersion) -> Signature | None:
    if not version.signature.inputs:
        return None

    def infos(specs: object) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(s.name, s.datatype, tuple(s.shape)) for s in specs)  # type: ignore[attr-defined]

    return Signature(infos(version.signature.inputs), infos(version.signature.outputs))


class VersionResolver:
    """Resolves route references and fetches ONNX files through the registry."""

    def __init__(self, channel: grpc.aio.Channel, cache_dir: Path) -> None:
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.cache_dir = cache_dir
        self._infos: dict[str, VersionInfo] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def resolve(self, reference: str, field: str) -> str:
        """An alias -> the version it points at; a version -> itself (checked to exist)."""
        check_model_reference(reference, field)
        alias = ALIAS_RE.fullmatch(reference)
        if alias is None:
            return reference
        try:
            found = await self.stub.GetAlias(registry_pb2.GetAliasRequest(name=reference))
        except grpc.aio.AioRpcError as err:
            raise _registry_error(err, field, reference) from err
        return f"models/{alias.group(1)}/versions/{found.version}"

    async def info(self, name: str, field: str) -> VersionInfo:
        """The version's ONNX file (downloaded once) and signature."""
        if name in self._infos:
            if scope.caller_project():
                # Cached for another caller: a scoped one must still be able to see it.
                try:
                    await self.stub.GetModelVersion(registry_pb2.GetModelVersionRequest(name=name))
                except grpc.aio.AioRpcError as err:
                    raise _registry_error(err, field, name) from err
            return self._infos[name]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._infos:
                self._infos[name] = await self._fetch(name, field)
        return self._infos[name]

    async def _fetch(self, name: str, field: str) -> VersionInfo:
        try:
            version = await self.stub.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=name)
            )
        except grpc.aio.AioRpcError as err:
            raise _registry_error(err, field, name) from err
        onnx = next((a for a in version.artifacts if a.kind == "onnx"), None)
        if onnx is None:
            kinds = ", ".join(a.kind for a in version.artifacts) or "none"
            raise FailedPrecondition(
                f"{field}: {name} has no ONNX artifact (it has: {kinds}); export the model to"
                " ONNX and register a version with an 'onnx' artifact"
            )
        path = self.cache_dir / f"{onnx.sha256}.onnx"
        if not path.exists():
            await self._download(name, path, onnx.sha256)
        signature = _signature(version) or await self._read_signature(name, path, field)
        return VersionInfo(
            name, onnx.sha256, onnx.size_bytes or path.stat().st_size, path, signature
        )

    async def _read_signature(self, name: str, path: Path, field: str) -> Signature:
        try:
            return await asyncio.to_thread(signature_from_onnx, path)
        except FailedPrecondition:
            raise
        except Exception as err:
            raise FailedPrecondition(
                f"{field}: {name}'s ONNX artifact cannot be read: {err}"
            ) from err

    async def _download(self, name: str, path: Path, sha256: str) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.part")
        digest = hashlib.sha256()
        try:
            with temp.open("wb") as out:
                request = registry_pb2.DownloadArtifactRequest(name=name, kind="onnx")
                async for chunk in self.stub.DownloadArtifact(request):
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if sha256 and digest.hexdigest() != sha256:
                raise Unavailable(f"{name}: downloaded ONNX file does not match its sha256")
            temp.replace(path)
        except grpc.aio.AioRpcError as err:
            raise _registry_error(err, "model", name) from err
        finally:
            temp.unlink(missing_ok=True)


def _registry_error(err: grpc.aio.AioRpcError, field: str, name: str) -> Exception:
    if err.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{field}: {name} not found in the registry")
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(field, f"{name}: {err.details()}")
    return Unavailable(f"registry: {err.code().name}: {err.details()}")
