"""The registry's gRPC servicer: checks requests, converts, calls the store.

Thin on purpose. Each handler parses resource names and checks fields (errors
name the field), does the artifact-store work that needs the event loop
(uploads, downloads, bundles), and hands persistence to a
:class:`~aimass.registry.store.RegistryStore` in a worker thread. The store
writes each change and its outbox event in one transaction; the servicer then
wakes the outbox relay so the event leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.artifacts.base import iterate_file
from aimass.core.errors import InvalidArgument, NotFound, PermissionDenied
from aimass.core.interceptors import current_principal
from aimass.registry import bundles, importers
from aimass.registry.filters import (
    MODEL_FIELDS,
    VERSION_FIELDS,
    Condition,
    parse_filter,
    parse_order_by,
)
from aimass.registry.names import (
    check_id,
    parse_alias_name,
    parse_model_name,
    parse_release_name,
    parse_version_name,
)
from aimass.registry.store import MODEL_MUTABLE, VERSION_MUTABLE, RegistryStore, ReleaseBundle
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc

T = TypeVar("T")
Context = grpc.aio.ServicerContext

MAX_REQUEST_ID = 64
MAX_KIND = 40
MAX_FILE_NAME = 255
MODEL_ORDER_FIELDS = frozenset({"name", "create_time", "update_time"})
VERSION_ORDER_FIELDS = frozenset({"create_time", "version", "metrics"})


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """aimass.registry.v1.RegistryService over a store and an artifact store."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        notify_outbox: Callable[[], None] | None = None,
        temp_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self._notify_outbox = notify_outbox or (lambda: None)
        self._temp_dir = temp_dir

    async def _write(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs a store write in a worker thread, then wakes the outbox relay."""
        result = await asyncio.to_thread(call, *args, **kwargs)
        self._notify_outbox()
        return result

    # ------------------------------------------------------------------ models

    async def CreateRegisteredModel(
        self, request: pb.CreateRegisteredModelRequest, context: Context
    ) -> pb.RegisteredModel:
        model_id = check_id(request.registered_model_id, "registered_model_id", "model id")
        model = pb.RegisteredModel()
        model.CopyFrom(request.registered_model)
        _check_tags(model.tags, "registered_model.tags")
        if not model.owner:
            model.owner = current_principal().subject
        project = _caller_project()
        if project:
            if model.project and model.project != project:
                raise PermissionDenied(
                    f"registered_model.project: a caller scoped to project {project!r} cannot"
                    f" create models in project {model.project!r}"
                )
            model.project = project
        return await self._write(self.store.create_model, model_id, model)

    async def GetRegisteredModel(
        self, request: pb.GetRegisteredModelRequest, context: Context
    ) -> pb.RegisteredModel:
        return await self._model_in_scope(parse_model_name(request.name))

    async def _model_in_scope(self, model_id: str) -> pb.RegisteredModel:
        """The model, or NotFound when the caller is scoped to another project (the same
        answer as a missing model, so a scoped caller learns nothing about other projects)."""
        model = await asyncio.to_thread(self.store.get_model, model_id)
        project = _caller_project()
        if project and model.project != project:
            raise NotFound(f"{model.name} not found")
        return model

    async def _check_scope(self, model_id: str) -> None:
        """For RPCs on a model's versions: NotFound for a model of another project (a missing
        model is left to the store, which answers NotFound itself)."""
        project = _caller_project()
        if not project:
            return
        try:
            model = await asyncio.to_thread(self.store.get_model, model_id)
        except NotFound:
            return
        if model.project != project:
            raise NotFound(f"{model.name} not found")

    async def ListRegisteredModels(
        self, request: pb.ListRegisteredModelsRequest, context: Context
    ) -> pb.ListRegisteredModelsResponse:
        conditions = parse_filter(request.filter, MODEL_FIELDS)
        project = _caller_project()
        if project:
            conditions = [*conditions, Condition("project", "", "=", project)]
        order = parse_order_by(request.order_by, MODEL_ORDER_FIELDS)
        page = await asyncio.to_thread(
            self.store.list_models, conditions, order, request.page_size, request.page_token
        )
        return pb.ListRegisteredModelsResponse(
            registered_models=page.items, next_page_token=page.next_page_token
        )

    async def UpdateRegisteredModel(
        self, request: pb.UpdateRegisteredModelRequest, context: Context
    ) -> pb.RegisteredModel:
        model = request.registered_model
        model_id = parse_model_name(model.name, "registered_model.name")
        paths = _mask_paths(request.update_mask.paths, MODEL_MUTABLE)
        await self._check_scope(model_id)
        if _caller_project() and "project" in paths and model.project != _caller_project():
            raise PermissionDenied(
                "registered_model.project: a caller scoped to a project cannot move models"
            )
        _check_tags(model.tags, "registered_model.tags")
        return await self._write(self.store.update_model, model_id, model, paths)

    async def DeleteRegisteredModel(
        self, request: pb.DeleteRegisteredModelRequest, context: Context
    ) -> empty_pb2.Empty:
        model_id = parse_model_name(request.name)
        await self._check_scope(model_id)
        await self._write(self.store.delete_model, model_id, request.etag)
        return empty_pb2.Empty()

    # ---------------------------------------------------------------- versions

    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument("request_id", f"is longer than {MAX_REQUEST_ID} characters")
        version = pb.ModelVersion()
        version.CopyFrom(request.model_version)
        _check_version_content(version)
        await self._resolve_artifacts(version)
        return await self._write(
            self.store.create_version,
            model_id,
            version,
            creator=current_principal().subject,
            request_id=request.request_id,
        )

    async def _resolve_artifacts(self, version: pb.ModelVersion) -> None:
        """Fills in size and sha256 of artifacts given by reference, checking they exist."""
        for index, artifact in enumerate(version.artifacts):
            field = f"model_version.artifacts[{index}].uri"
            if not artifact.uri:
                raise InvalidArgument(
                    field, "is required: upload the file with UploadArtifact and pass its uri"
                )
            try:
                stored = await self.artifacts.stat(artifact.uri)
            except NotFound as err:
                raise NotFound(f"{field}: {artifact.uri} is not in the artifact store") from err
            except InvalidArgument as err:
                raise InvalidArgument(field, err.violations[0].description) from err
            if artifact.sha256 and artifact.sha256.lower() != stored.sha256:
                raise InvalidArgument(
                    f"model_version.artifacts[{index}].sha256",
                    f"is {artifact.sha256}, but {artifact.uri} holds sha256 {stored.sha256}",
                )
            artifact.sha256 = stored.sha256
            artifact.size_bytes = stored.size
            if not artifact.file_name:
                artifact.file_name = f"{artifact.kind}-{PurePosixPath(artifact.uri).name[:16]}"

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        model_id, number = parse_version_name(request.name)
        await self._check_scope(model_id)
        return await asyncio.to_thread(self.store.get_version, model_id, number)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        conditions = parse_filter(request.filter, VERSION_FIELDS)
        order = parse_order_by(request.order_by, VERSION_ORDER_FIELDS)
        page = await asyncio.to_thread(
            self.store.list_versions,
            model_id,
            conditions,
            order,
            request.page_size,
            request.page_token,
        )
        return pb.ListModelVersionsResponse(
            model_versions=page.items, next_page_token=page.next_page_token
        )

    async def SearchModelVersions(
        self, request: pb.SearchModelVersionsRequest, context: Context
    ) -> pb.SearchModelVersionsResponse:
        conditions = parse_filter(request.filter, VERSION_FIELDS)
        order = parse_order_by(request.order_by, VERSION_ORDER_FIELDS)
        page = await asyncio.to_thread(
            self.store.list_versions, None, conditions, order, request.page_size, request.page_token
        )
        return pb.SearchModelVersionsResponse(
            model_versions=page.items, next_page_token=page.next_page_token
        )

    async def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        version = request.model_version
        model_id, number = parse_version_name(version.name, "model_version.name")
        await self._check_scope(model_id)
        paths = _mask_paths(request.update_mask.paths, VERSION_MUTABLE)
        _check_tags(version.tags, "model_version.tags")
        _check_metrics(version.metrics, "model_version.metrics")
        return await self._write(self.store.update_version, model_id, number, version, paths)

    async def LogVersionMetrics(
        self, request: pb.LogVersionMetricsRequest, context: Context
    ) -> pb.ModelVersion:
        model_id, number = parse_version_name(request.name)
        await self._check_scope(model_id)
        if not request.metrics:
            raise InvalidArgument("metrics", "is empty: send at least one metric")
        _check_metrics(request.metrics, "metrics")
        return await self._write(self.store.log_metrics, model_id, number, list(request.metrics))

    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Context
    ) -> empty_pb2.Empty:
        model_id, number = parse_version_name(request.name)
        await self._check_scope(model_id)
        await self._write(self.store.delete_version, model_id, number, request.etag)
        return empty_pb2.Empty()

    # --------------------------------------------------------------- artifacts

    async def UploadArtifact(
        self, request_iterator: AsyncIterator[pb.UploadArtifactRequest], context: Context
    ) -> common_pb2.Artifact:
        messages = aiter(request_iterator)
        try:
            first = await anext(messages)
        except StopAsyncIteration as err:
            raise InvalidArgument("header", "the upload stream is empty") from err
        if not first.HasField("header"):
            raise InvalidArgument("header", "must come in the first message of the stream")
        header = first.header
        _check_kind(header.kind, "header.kind")
        if len(header.file_name) > MAX_FILE_NAME:
            raise InvalidArgument("header.file_name", f"is longer than {MAX_FILE_NAME} characters")
        stored = await self.artifacts.put_stream(
            _upload_chunks(messages),
            expected_sha256=header.sha256.lower() or None,
            expected_size=header.size_bytes or None,
        )
        return common_pb2.Artifact(
            kind=header.kind,
            uri=stored.uri,
            size_bytes=stored.size,
            sha256=stored.sha256,
            file_name=PurePosixPath(header.file_name).name,
        )

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: Context
    ) -> AsyncIterator[common_pb2.ByteChunk]:
        model_id, number = parse_version_name(request.name)
        await self._check_scope(model_id)
        _check_kind(request.kind, "kind")
        ref = await asyncio.to_thread(self.store.get_artifact, model_id, number, request.kind)
        async for chunk in self._stream(ref.uri, ref.sha256, request.offset):
            yield chunk

    async def _stream(
        self, uri: str, sha256: str, offset: int
    ) -> AsyncIterator[common_pb2.ByteChunk]:
        """Chunks of an object from ``offset``; read whole, it is checked against ``sha256``."""
        if offset < 0:
            raise InvalidArgument("offset", f"must be 0 or more, got {offset}")
        stream = self.artifacts.open_stream(uri, offset=offset, expected_sha256=sha256)
        async with contextlib.aclosing(stream):
            async for data in stream:
                yield common_pb2.ByteChunk(offset=offset, data=data)
                offset += len(data)

    # ----------------------------------------------------------------- aliases

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.Alias:
        model_id, alias = parse_alias_name(request.name)
        await self._check_scope(model_id)
        if request.version <= 0:
            raise InvalidArgument(
                "version", f"must be a positive version number, got {request.version}"
            )
        if request.expected_version < 0:
            raise InvalidArgument("expected_version", "must be 0 (no check) or a version number")
        return await self._write(
            self.store.set_alias,
            model_id,
            alias,
            request.version,
            request.expected_version,
            current_principal().subject,
        )

    async def GetAlias(self, request: pb.GetAliasRequest, context: Context) -> pb.Alias:
        model_id, alias = parse_alias_name(request.name)
        await self._check_scope(model_id)
        return await asyncio.to_thread(self.store.get_alias, model_id, alias)

    async def ListAliases(
        self, request: pb.ListAliasesRequest, context: Context
    ) -> pb.ListAliasesResponse:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        page = await asyncio.to_thread(
            self.store.list_aliases, model_id, request.page_size, request.page_token
        )
        return pb.ListAliasesResponse(aliases=page.items, next_page_token=page.next_page_token)

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: Context
    ) -> empty_pb2.Empty:
        model_id, alias = parse_alias_name(request.name)
        await self._check_scope(model_id)
        await self._write(self.store.delete_alias, model_id, alias, current_principal().subject)
        return empty_pb2.Empty()

    async def ListAliasHistory(
        self, request: pb.ListAliasHistoryRequest, context: Context
    ) -> pb.ListAliasHistoryResponse:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        page = await asyncio.to_thread(
            self.store.list_alias_history, model_id, request.page_size, request.page_token
        )
        return pb.ListAliasHistoryResponse(moves=page.items, next_page_token=page.next_page_token)

    # ----------------------------------------------------------------- lineage

    async def GetLineage(self, request: pb.GetLineageRequest, context: Context) -> pb.Lineage:
        model_id, number = parse_version_name(request.name)
        await self._check_scope(model_id)
        if request.depth < 0:
            raise InvalidArgument("depth", f"must be 0 (all) or more, got {request.depth}")
        return await asyncio.to_thread(self.store.get_lineage, model_id, number, request.depth)

    # ---------------------------------------------------------------- releases

    async def CreateRelease(self, request: pb.CreateReleaseRequest, context: Context) -> pb.Release:
        model_id, number = parse_version_name(request.parent, "parent")
        await self._check_scope(model_id)
        release_id = check_id(request.release_id, "release_id", "release id")
        await asyncio.to_thread(self.store.require_new_release, model_id, number, release_id)
        version = await asyncio.to_thread(self.store.get_version, model_id, number)
        with tempfile.TemporaryDirectory(prefix="aimass-release-", dir=self._temp_dir) as work:
            archive = await bundles.build_bundle(self.artifacts, version, release_id, Path(work))
            stored = await self.artifacts.put_named(
                f"releases/{model_id}/{number}/{release_id}.tar.gz", iterate_file(archive)
            )
        bundle = ReleaseBundle(uri=stored.uri, sha256=stored.sha256, size_bytes=stored.size)
        return await self._write(
            self.store.create_release,
            model_id,
            number,
            release_id,
            request.release.description,
            bundle,
            current_principal().subject,
        )

    async def GetRelease(self, request: pb.GetReleaseRequest, context: Context) -> pb.Release:
        release = parse_release_name(request.name)
        await self._check_scope(release[0])
        return await asyncio.to_thread(self.store.get_release, *release)

    async def ListReleases(
        self, request: pb.ListReleasesRequest, context: Context
    ) -> pb.ListReleasesResponse:
        model_id, number = parse_version_name(request.parent, "parent")
        await self._check_scope(model_id)
        page = await asyncio.to_thread(
            self.store.list_releases, model_id, number, request.page_size, request.page_token
        )
        return pb.ListReleasesResponse(releases=page.items, next_page_token=page.next_page_token)

    async def DownloadRelease(
        self, request: pb.DownloadReleaseRequest, context: Context
    ) -> AsyncIterator[common_pb2.ByteChunk]:
        parsed = parse_release_name(request.name)
        await self._check_scope(parsed[0])
        release = await asyncio.to_thread(self.store.get_release, *parsed)
        async for chunk in self._stream(release.bundle.uri, release.bundle.sha256, request.offset):
            yield chunk

    async def ImportRelease(
        self, request: pb.ImportReleaseRequest, context: Context
    ) -> pb.ModelVersion:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        if not request.bundle_uri:
            raise InvalidArgument(
                "bundle_uri", "is required: upload the bundle with UploadArtifact"
            )
        with tempfile.TemporaryDirectory(prefix="aimass-import-", dir=self._temp_dir) as work:
            archive = Path(work) / "bundle.tar.gz"
            try:
                await self.artifacts.get_file(request.bundle_uri, archive)
            except InvalidArgument as err:
                raise InvalidArgument("bundle_uri", err.violations[0].description) from err
            # Every sum is checked here, before anything is stored or registered.
            content = await asyncio.to_thread(bundles.read_bundle, archive, Path(work))
            version = content.version
            for bundle_file in content.files:
                stored = await self.artifacts.put_file(
                    bundle_file.path, expected_sha256=bundle_file.sha256
                )
                version.artifacts.add(
                    kind=bundle_file.kind,
                    uri=stored.uri,
                    size_bytes=stored.size,
                    sha256=stored.sha256,
                    file_name=bundle_file.file_name,
                )
        _check_version_content(version)
        return await self._write(
            self.store.create_version,
            model_id,
            version,
            creator=current_principal().subject,
            create_model=True,
        )

    async def ImportModelVersion(
        self, request: pb.ImportModelVersionRequest, context: Context
    ) -> pb.ModelVersion:
        model_id = parse_model_name(request.parent, "parent")
        await self._check_scope(model_id)
        spec = importers.spec_from_request(request)
        importers.check_template(request.model_version)
        with tempfile.TemporaryDirectory(prefix="aimass-byom-", dir=self._temp_dir) as work:
            source = Path(work) / "source"
            stored = await self._fetch_source(request.source_uri, source)
            spec = dataclasses.replace(spec, path=source)
            imported = await asyncio.to_thread(importers.import_model, spec, Path(work))
            original = common_pb2.Artifact(
                kind=imported.format, uri=stored.uri, size_bytes=stored.size,
                sha256=stored.sha256, file_name=spec.file_name,
            )  # fmt: skip
            artifacts = [original]
            if imported.format != importers.ONNX:
                graph = await self.artifacts.put_file(imported.onnx_path)
                artifacts.append(
                    common_pb2.Artifact(
                        kind="onnx",
                        uri=graph.uri,
                        size_bytes=graph.size,
                        sha256=graph.sha256,
                        file_name=importers.exported_file_name(spec.file_name),
                    )
                )
        version = importers.version_of(imported, request.model_version, artifacts)
        _check_version_content(version)
        return await self._write(
            self.store.create_version,
            model_id,
            version,
            creator=current_principal().subject,
            request_id=request.request_id,
            create_model=True,
        )

    async def _fetch_source(self, uri: str, dest: Path) -> Any:
        """The uploaded file, verified, at ``dest``; errors name ``source_uri``."""
        try:
            return await self.artifacts.get_file(uri, dest)
        except NotFound as err:
            raise NotFound(f"source_uri: {uri} is not in the artifact store") from err
        except InvalidArgument as err:
            raise InvalidArgument("source_uri", err.violations[0].description) from err


# ====================================================================== checks


def _caller_project() -> str:
    """The project the caller is scoped to ("" for unscoped keys and tokens: they see all)."""
    return current_principal().project


async def _upload_chunks(
    messages: AsyncIterator[pb.UploadArtifactRequest],
) -> AsyncIterator[bytes]:
    position = 0
    async for message in messages:
        if message.HasField("header"):
            raise InvalidArgument("header", "was sent twice: send it only in the first message")
        chunk = message.chunk
        if chunk.offset != position:
            raise InvalidArgument(
                "chunk.offset", f"is {chunk.offset}, but {position} bytes arrived so far"
            )
        position += len(chunk.data)
        yield chunk.data


def _mask_paths(paths: Sequence[str], mutable: Sequence[str]) -> list[str]:
    """The fields an update touches; an empty mask means every mutable field (AIP-134)."""
    if not paths:
        return list(mutable)
    for path in paths:
        if path not in mutable:
            raise InvalidArgument(
                "update_mask",
                f"{path!r} cannot be updated (updatable: {', '.join(mutable)})",
            )
    return list(dict.fromkeys(paths))


def _check_kind(kind: str, field: str) -> None:
    if not kind:
        raise InvalidArgument(field, 'is required ("onnx", "state_dict", "torchscript", ...)')
    if len(kind) > MAX_KIND or not kind.replace("_", "").replace("-", "").isalnum():
        raise InvalidArgument(field, f"{kind!r} is not a valid artifact kind")


def _check_tags(tags: Any, field: str) -> None:
    for key, value in tags.items():
        if not key or len(key) > 100:
            raise InvalidArgument(field, f"key {key!r} must be 1-100 characters")
        if len(value) > 500:
            raise InvalidArgument(f"{field}[{key}]", "is longer than 500 characters")


def _check_metrics(metrics: Any, field: str) -> None:
    seen: set[tuple[str, str]] = set()
    for index, metric in enumerate(metrics):
        if not metric.name or len(metric.name) > 100:
            raise InvalidArgument(f"{field}[{index}].name", "must be 1-100 characters")
        if not math.isfinite(metric.value):
            raise InvalidArgument(f"{field}[{index}].value", f"must be finite, got {metric.value}")
        key = (metric.source, metric.name)
        if key in seen:
            raise InvalidArgument(f"{field}[{index}]", f"metric {metric.name!r} appears twice")
        seen.add(key)


def _check_version_content(version: pb.ModelVersion) -> None:
    kinds: set[str] = set()
    names: set[str] = set()
    for index, artifact in enumerate(version.artifacts):
        _check_kind(artifact.kind, f"model_version.artifacts[{index}].kind")
        if artifact.kind in kinds:
            raise InvalidArgument(
                f"model_version.artifacts[{index}].kind", f"{artifact.kind!r} appears twice"
            )
        kinds.add(artifact.kind)
        if artifact.file_name:
            if artifact.file_name in names or len(artifact.file_name) > MAX_FILE_NAME:
                raise InvalidArgument(
                    f"model_version.artifacts[{index}].file_name",
                    f"{artifact.file_name!r} is repeated or too long",
                )
            names.add(artifact.file_name)
    for side in ("inputs", "outputs"):
        for index, tensor in enumerate(getattr(version.signature, side)):
            field = f"model_version.signature.{side}[{index}]"
            if not tensor.name:
                raise InvalidArgument(f"{field}.name", "is required")
            if tensor.datatype.upper() not in bundles.TRITON_TYPES:
                raise InvalidArgument(
                    f"{field}.datatype",
                    f"{tensor.datatype!r} is not a KServe v2 datatype "
                    f"({', '.join(bundles.TRITON_TYPES)})",
                )
            if any(dim < -1 or dim == 0 for dim in tensor.shape):
                raise InvalidArgument(f"{field}.shape", "dims must be positive, or -1 (variable)")
    _check_metrics(version.metrics, "model_version.metrics")
    _check_tags(version.tags, "model_version.tags")
    if version.opset < 0:
        raise InvalidArgument("model_version.opset", f"must be 0 or more, got {version.opset}")
