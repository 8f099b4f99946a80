"""The data service's gRPC servicer: checks requests, converts, runs ingest jobs.

Database work runs in worker threads; each write and its outbox event commit together,
then the outbox relay is woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import empty_pb2
from sqlalchemy import func, select

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.auth import scope
from aimass.core.clients import ServiceChannels
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from aimass.core.events import EventBus
from aimass.core.interceptors import current_principal
from aimass.core.settings import Settings
from aimass.data import config as cfg
from aimass.data import sources
from aimass.data import store as st
from aimass.data.ingest import Ingestor, record_failure
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc
from aimass.data.worker import enqueue_ingest
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc

T = TypeVar("T")
Context = grpc.aio.ServicerContext
WATCH_POLL_S = 0.1
UPLOAD_TTL = timedelta(days=1)
DEFAULT_BATCH = 8192
MAX_BATCH = 1_000_000
SPLITS = {0: "train", 1: "train", 2: "valid", 3: "test"}
# How long Cancel waits for a running job to reach CANCELLED before answering.
CANCEL_WAIT_S = 10.0
REGISTRY_TIMEOUT_S = 10.0


def _principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


class DataServicer(data_pb2_grpc.DataServiceServicer):
    """aimass.data.v1.DataService."""

    def __init__(
        self,
        database: Database,
        artifacts: ArtifactStore,
        settings: Settings,
        notify_outbox: Callable[[], None],
        bus: EventBus,
        channels: ServiceChannels,
    ) -> None:
        self.database = database
        self.artifacts = artifacts
        self.settings = settings
        self.notify_outbox = notify_outbox
        self.bus = bus
        self.channels = channels
        self.ingestor = Ingestor(database, artifacts, settings, notify_outbox)

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # ---------------------------------------------------------------- datasets

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Context) -> pb.Dataset:
        dataset_id = st.check_id(request.dataset_id, "dataset_id")
        project = scope.stamp_project(request.dataset.project, "dataset.project")
        cfg.validate(request.dataset.config, "dataset.config")
        self._check_source(request.dataset.config, "dataset.config")

        def create() -> pb.Dataset:
            with self.database.session(resource=f"datasets/{dataset_id}") as session:
                exists = session.scalar(select(m.Dataset.id).where(m.Dataset.name == dataset_id))
                if exists is not None:
                    raise AlreadyExists(f"datasets/{dataset_id} already exists")
                row = m.Dataset(
                    name=dataset_id,
                    description=request.dataset.description,
                    tags=dict(request.dataset.labels),
                    config=cfg.to_dict(request.dataset.config),
                    project=project,
                    owner=_principal(),
                )
                session.add(row)
                session.flush()
                return st.dataset_to_proto(row)

        return await self._db(create)

    def _check_source(self, config: pb.DatasetConfig, field: str) -> None:
        """Refuses local paths outside the data roots before anything is stored."""
        if config.WhichOneof("source") == "data_path":
            try:
                sources.resolve_local(
                    config.data_path, self.settings.data_roots, self.settings.home
                )
            except InvalidArgument as err:
                raise InvalidArgument(f"{field}.data_path", err.message) from err

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        dataset_id = st.parse_dataset_name(request.name)

        def get() -> pb.Dataset:
            with self.database.session(read_only=True) as session:
                return st.dataset_to_proto(st.get_dataset(session, dataset_id))

        return await self._db(get)

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        if request.filter:
            raise InvalidArgument("filter", "filters are not supported yet")

        def list_() -> pb.ListDatasetsResponse:
            with self.database.session(read_only=True) as session:
                stmt = select(m.Dataset).where(*scope.project_filter(m.Dataset.project))
                rows, token = paginate(
                    session, stmt, [m.Dataset.name, m.Dataset.id],
                    request.page_size, request.page_token,
                )  # fmt: skip
                return pb.ListDatasetsResponse(
                    datasets=[st.dataset_to_proto(r) for r in rows], next_page_token=token
                )

        return await self._db(list_)

    async def UpdateDataset(self, request: pb.UpdateDatasetRequest, context: Context) -> pb.Dataset:
        dataset_id = st.parse_dataset_name(request.dataset.name, "dataset.name")
        paths = list(request.update_mask.paths) or ["description", "labels", "config"]
        if "config" in paths:
            cfg.validate(request.dataset.config, "dataset.config")
            self._check_source(request.dataset.config, "dataset.config")

        def update() -> pb.Dataset:
            with self.database.session() as session:
                row = st.get_dataset(session, dataset_id)
                if request.dataset.etag and request.dataset.etag != row.etag:
                    raise Aborted(f"datasets/{dataset_id} changed: etag is stale")
                for path in paths:
                    if path == "description":
                        row.description = request.dataset.description
                    elif path == "labels":
                        row.tags = dict(request.dataset.labels)
                    elif path == "config":
                        row.config = cfg.to_dict(request.dataset.config)
                    else:
                        raise InvalidArgument("update_mask", f"{path!r} cannot be updated")
                session.flush()
                return st.dataset_to_proto(row)

        return await self._db(update)

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> empty_pb2.Empty:
        dataset_id = st.parse_dataset_name(request.name)

        def version_names() -> list[str]:
            with self.database.session(read_only=True) as session:
                row = st.get_dataset(session, dataset_id)
                return [f"datasets/{dataset_id}/versions/{v.version}" for v in row.versions]

        names = await self._db(version_names)
        if names and not request.force:
            raise FailedPrecondition(f"datasets/{dataset_id} has {len(names)} versions: set force")
        await self._refuse_if_referenced(names)

        def delete() -> list[str]:
            with self.database.session() as session:
                row = st.get_dataset(session, dataset_id)
                if request.etag and request.etag != row.etag:
                    raise Aborted(f"datasets/{dataset_id} changed: etag is stale")
                running = session.scalar(
                    select(func.count(m.IngestJob.id)).where(
                        m.IngestJob.dataset_id == row.id, m.IngestJob.state.in_(st.ACTIVE)
                    )
                )
                if running:
                    raise FailedPrecondition(f"datasets/{dataset_id} has a running ingest job")
                current = [f"datasets/{dataset_id}/versions/{v.version}" for v in row.versions]
                if set(current) - set(names):
                    raise Aborted(f"datasets/{dataset_id} got a new version meanwhile: retry")
                uris = [uri for version in row.versions for uri in version.split_uris.values()]
                session.delete(row)
                session.flush()
                return _unused(session, uris)

        for uri in await self._db(delete):
            await self._delete_artifact(uri)
        return empty_pb2.Empty()

    async def _refuse_if_referenced(self, version_names: list[str]) -> None:
        """A dataset version a model version was trained on cannot go (lineage would break).

        Asks the registry, which owns the lineage; when it cannot answer, nothing is deleted.
        """
        if not version_names:
            return
        stub = registry_pb2_grpc.RegistryServiceStub(self.channels.get("registry"))
        for name in version_names:
            request = registry_pb2.SearchModelVersionsRequest(
                filter=f'dataset_version = "{name}"', page_size=1
            )
            try:
                found = await stub.SearchModelVersions(request, timeout=REGISTRY_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                raise Unavailable(
                    f"cannot check whether a model version uses {name}: the registry "
                    f"answered {err.code().name}: {err.details()}; nothing was deleted"
                ) from err
            if found.model_versions:
                raise FailedPrecondition(
                    f"{name} is referenced by model version {found.model_versions[0].name}"
                )

    async def _delete_artifact(self, uri: str) -> None:
        with contextlib.suppress(NotFound):
            await self.artifacts.delete(uri)

    # ----------------------------------------------------------------- ingest

    async def IngestDataset(
        self, request: pb.IngestDatasetRequest, context: Context
    ) -> pb.IngestJob:
        dataset_id = st.parse_dataset_name(request.name)
        override = request.HasField("config")
        if override:
            cfg.validate(request.config, "config")
            self._check_source(request.config, "config")

        def create() -> tuple[pb.IngestJob, bool]:
            with self.database.session() as session:
                if request.request_id:
                    existing = session.scalar(
                        select(m.IngestJob).where(m.IngestJob.request_id == request.request_id)
                    )
                    if existing is not None:
                        # Request ids are unique across projects: another project's job
                        # answers NotFound, never the job itself.
                        owner = session.get(m.Dataset, existing.dataset_id)
                        scope.check_visible(
                            owner.project if owner else "", f"request_id {request.request_id!r}"
                        )
                        return st.job_to_proto(existing, session), False
                dataset = st.get_dataset(session, dataset_id)
                config = request.config if override else st.dataset_config(dataset)
                if not override:
                    self._check_source(config, "dataset.config")
                job = m.IngestJob(
                    name=uuid.uuid4().hex,
                    dataset_id=dataset.id,
                    source_uri=getattr(config, config.WhichOneof("source") or "data_path"),
                    config={"config": cfg.to_dict(config)},
                    state="QUEUED",
                    creator=_principal(),
                    request_id=request.request_id or None,
                )
                session.add(job)
                session.flush()
                st.add_job_event(session, job)
                return st.job_to_proto(job, session), True

        job, created = await self._db(create)
        if created:
            await self._enqueue(job.name, pb.IngestDatasetRequest(name=request.name,
                                                                  force=request.force))  # fmt: skip
        return job

    async def _enqueue(self, job_name: str, request: pb.IngestDatasetRequest) -> None:
        """Hands the job to the work queue; if NATS is down the job fails rather than hang."""
        try:
            await enqueue_ingest(self.bus, job_name, request)
        except Exception as err:
            reason = f"the job queue is unavailable: {err}"
            await self._db(self._end_job, st.parse_simple_name(job_name, "ingestJobs"), reason)
            self.notify_outbox()
            raise Unavailable(reason) from err

    def _end_job(self, job_id: str, reason: str, state: str = "FAILED") -> None:
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            if job.state not in st.TERMINAL:
                record_failure(session, job, reason, state)

    async def GetIngestJob(self, request: pb.GetIngestJobRequest, context: Context) -> pb.IngestJob:
        job_id = st.parse_simple_name(request.name, "ingestJobs")

        def get() -> pb.IngestJob:
            with self.database.session(read_only=True) as session:
                return st.job_to_proto(st.get_job(session, job_id), session)

        return await self._db(get)

    async def ListIngestJobs(
        self, request: pb.ListIngestJobsRequest, context: Context
    ) -> pb.ListIngestJobsResponse:
        if request.filter:
            raise InvalidArgument("filter", "filters are not supported yet")

        def list_() -> pb.ListIngestJobsResponse:
            with self.database.session(read_only=True) as session:
                stmt = select(m.IngestJob)
                if scope.caller_project():
                    stmt = stmt.join(m.Dataset, m.Dataset.id == m.IngestJob.dataset_id).where(
                        *scope.project_filter(m.Dataset.project)
                    )
                rows, token = paginate(
                    session, stmt,
                    [m.IngestJob.create_time.desc(), m.IngestJob.id.desc()],
                    request.page_size, request.page_token,
                )  # fmt: skip
                return pb.ListIngestJobsResponse(
                    ingest_jobs=[st.job_to_proto(r, session) for r in rows], next_page_token=token
                )

        return await self._db(list_)

    async def WatchIngestJob(
        self, request: pb.WatchIngestJobRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job_id = st.parse_simple_name(request.name, "ingestJobs")
        after = request.after_sequence
        while True:
            events, state = await self._db(self._events_after, job_id, after)
            for event in events:
                after = event.sequence
                yield event
            if state in st.TERMINAL and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_S)

    def _events_after(self, job_id: str, after: int) -> tuple[list[common_pb2.JobEvent], str]:
        with self.database.session(read_only=True) as session:
            job = st.get_job(session, job_id)
            rows = session.scalars(
                select(m.JobEvent)
                .where(m.JobEvent.job == f"ingestJobs/{job_id}", m.JobEvent.sequence > after)
                .order_by(m.JobEvent.sequence)
            ).all()
            return [st.event_to_proto(r) for r in rows], job.state

    async def CancelIngestJob(
        self, request: pb.CancelIngestJobRequest, context: Context
    ) -> pb.IngestJob:
        job_id = st.parse_simple_name(request.name, "ingestJobs")
        state = await self._db(self._request_cancel, job_id)
        self.notify_outbox()
        # Whichever replica runs the job sees CANCELLING within a poll; this one at once.
        self.ingestor.request_stop(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while state not in st.TERMINAL and loop.time() < deadline:
            await asyncio.sleep(WATCH_POLL_S)
            state = await self._db(self.ingestor._state, job_id)
        return await self.GetIngestJob(pb.GetIngestJobRequest(name=request.name), context)

    def _request_cancel(self, job_id: str) -> str:
        """A queued job ends CANCELLED now; a running one is marked CANCELLING for its worker."""
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            if job.state == "QUEUED":
                record_failure(session, job, "cancelled on request", "CANCELLED")
            elif job.state == "RUNNING":
                job.state = "CANCELLING"
                st.add_job_event(session, job)
            return job.state

    # ---------------------------------------------------------------- uploads

    async def UploadData(
        self, request_iterator: AsyncIterator[pb.UploadDataRequest], context: Context
    ) -> pb.Upload:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must carry the header")
        upload_id, offset, total, sha = await self._db(self._open_upload, first.header)
        part = self._upload_part(upload_id)
        part.parent.mkdir(parents=True, exist_ok=True)
        with part.open("r+b" if part.exists() else "wb") as handle:
            handle.truncate(offset)  # bytes past the committed offset were never acknowledged
            handle.seek(offset)
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header", "only the first message may carry a header")
                chunk = message.chunk
                if chunk.offset != offset:
                    await context.abort(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"chunk.offset: expected {offset}, got {chunk.offset}",
                    )
                if offset + len(chunk.data) > total:
                    raise InvalidArgument("chunk.data", f"goes past size_bytes {total}")
                handle.write(chunk.data)
                handle.flush()
                offset += len(chunk.data)
                await self._db(self._commit_offset, upload_id, offset)
        if offset == total:
            await self._complete_upload(upload_id, part, sha, total)
        return await self.GetUpload(pb.GetUploadRequest(name=f"uploads/{upload_id}"), context)

    def _upload_part(self, upload_id: str) -> Path:
        return self.settings.home / "cache" / "uploads-partial" / f"{upload_id}.part"

    def _open_upload(self, header: pb.UploadHeader) -> tuple[str, int, int, str]:
        with self.database.session() as session:
            if header.upload:
                upload_id = st.parse_simple_name(header.upload, "uploads", "header.upload")
                row = session.scalar(select(m.Upload).where(m.Upload.name == upload_id))
                if row is None:
                    raise NotFound(f"{header.upload} not found")
                if row.state != "OPEN":
                    raise FailedPrecondition(f"{header.upload} is {row.state.lower()}, not active")
                return row.name, row.offset, row.total_bytes or 0, row.sha256
            if header.size_bytes <= 0:
                raise InvalidArgument("header.size_bytes", "must be positive for a new upload")
            sha = header.sha256.lower()
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise InvalidArgument("header.sha256", "must be 64 lower-case hex digits")
            row = m.Upload(
                name=uuid.uuid4().hex,
                file_name=Path(header.file_name).name,
                total_bytes=header.size_bytes,
                sha256=sha,
                state="OPEN",
                creator=_principal(),
                expire_time=utcnow() + UPLOAD_TTL,
            )
            session.add(row)
            session.flush()
            return row.name, 0, header.size_bytes, sha

    def _commit_offset(self, upload_id: str, offset: int) -> None:
        with self.database.session() as session:
            row = session.scalar(select(m.Upload).where(m.Upload.name == upload_id))
            assert row is not None
            row.offset = offset

    async def _complete_upload(self, upload_id: str, part: Path, sha: str, total: int) -> None:
        actual = await asyncio.to_thread(_sha256_file, part)
        if actual != sha:
            await asyncio.to_thread(part.unlink, True)
            reason = f"header.sha256: content has sha256 {actual}, the header said {sha}"
            await self._db(self._set_upload, upload_id, "ABORTED", "", reason)
            raise InvalidArgument(
                "header.sha256", f"content has sha256 {actual}, the header said {sha}"
            )
        obj = await self.artifacts.put_file(part, expected_sha256=sha)
        await asyncio.to_thread(part.unlink, True)
        await self._db(self._set_upload, upload_id, "COMPLETE", obj.uri, "")

    def _set_upload(self, upload_id: str, state: str, uri: str, reason: str) -> None:
        with self.database.session() as session:
            row = session.scalar(select(m.Upload).where(m.Upload.name == upload_id))
            assert row is not None
            row.state = state
            row.temp_uri = uri
            row.reason = reason

    async def GetUpload(self, request: pb.GetUploadRequest, context: Context) -> pb.Upload:
        upload_id = st.parse_simple_name(request.name, "uploads")

        def get() -> pb.Upload:
            with self.database.session(read_only=True) as session:
                row = session.scalar(select(m.Upload).where(m.Upload.name == upload_id))
                if row is None:
                    raise NotFound(f"{request.name} not found")
                return st.upload_to_proto(row)

        return await self._db(get)

    # --------------------------------------------------------------- versions

    async def GetDatasetVersion(
        self, request: pb.GetDatasetVersionRequest, context: Context
    ) -> pb.DatasetVersion:
        dataset_id, number = st.parse_version_name(request.name)

        def get() -> pb.DatasetVersion:
            with self.database.session(read_only=True) as session:
                return st.version_to_proto(st.get_version(session, dataset_id, number), dataset_id)

        return await self._db(get)

    async def ListDatasetVersions(
        self, request: pb.ListDatasetVersionsRequest, context: Context
    ) -> pb.ListDatasetVersionsResponse:
        dataset_id = st.parse_dataset_name(request.parent, "parent")
        if request.filter:
            raise InvalidArgument("filter", "filters are not supported yet")

        def list_() -> pb.ListDatasetVersionsResponse:
            with self.database.session(read_only=True) as session:
                dataset = st.get_dataset(session, dataset_id)
                stmt = select(m.DatasetVersion).where(m.DatasetVersion.dataset_id == dataset.id)
                rows, token = paginate(
                    session, stmt, [m.DatasetVersion.version.desc(), m.DatasetVersion.id.desc()],
                    request.page_size, request.page_token,
                )  # fmt: skip
                return pb.ListDatasetVersionsResponse(
                    dataset_versions=[st.version_to_proto(r, dataset_id) for r in rows],
                    next_page_token=token,
                )

        return await self._db(list_)

    async def DeleteDatasetVersion(
        self, request: pb.DeleteDatasetVersionRequest, context: Context
    ) -> empty_pb2.Empty:
        dataset_id, number = st.parse_version_name(request.name)

        def check() -> None:
            with self.database.session(read_only=True) as session:
                st.get_version(session, dataset_id, number)

        await self._db(check)
        await self._refuse_if_referenced([request.name])

        def delete() -> list[str]:
            with self.database.session() as session:
                row = st.get_version(session, dataset_id, number)
                if row.state == "INGESTING":
                    raise FailedPrecondition(f"{request.name} is being ingested")
                uris = list(row.split_uris.values())
                session.delete(row)
                session.flush()
                return _unused(session, uris)

        for uri in await self._db(delete):
            await self._delete_artifact(uri)
        return empty_pb2.Empty()

    # ---------------------------------------------------------------- reading

    async def ReadSplit(
        self, request: pb.ReadSplitRequest, context: Context
    ) -> AsyncIterator[pb.ReadSplitResponse]:
        dataset_id, number = st.parse_version_name(request.name)
        split = SPLITS.get(request.split)
        if split is None:
            raise InvalidArgument("split", f"unknown split {request.split}")
        batch_size = request.batch_size or DEFAULT_BATCH
        if batch_size < 0 or batch_size > MAX_BATCH:
            raise InvalidArgument("batch_size", f"must be 0-{MAX_BATCH}, got {batch_size}")
        if request.start_row < 0 or request.row_limit < 0:
            field = "start_row" if request.start_row < 0 else "row_limit"
            raise InvalidArgument(field, "must not be negative")
        path = await self._split_file(dataset_id, number, split, request.name)
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        for column in request.columns:
            if column not in names:
                raise InvalidArgument("columns", f"{column!r} is not a column of {request.name}")
        columns = list(request.columns) or None
        end = file.metadata.num_rows
        if request.row_limit:
            end = min(end, request.start_row + request.row_limit)
        position = 0
        for batch in file.iter_batches(batch_size=batch_size, columns=columns):
            lo, hi = position, position + batch.num_rows
            position = hi
            if hi <= request.start_row:
                continue
            if lo >= end:
                break
            part = batch.slice(
                max(0, request.start_row - lo), min(hi, end) - max(lo, request.start_row)
            )
            yield pb.ReadSplitResponse(
                start_row=max(lo, request.start_row), row_count=part.num_rows, arrow_ipc=_ipc(part)
            )

    async def _split_file(self, dataset_id: str, number: int, split: str, name: str) -> Path:
        """The split's Parquet file, cached locally by its sha256 (verified on download)."""

        def find() -> tuple[str, str]:
            with self.database.session(read_only=True) as session:
                row = st.get_version(session, dataset_id, number)
                if row.state != "READY":
                    raise FailedPrecondition(f"{name} is {row.state.lower()}, not ready")
                if split not in row.split_uris:
                    raise InvalidArgument("split", f"{name} has no {split} split")
                info = row.config.get("artifacts", {}).get(split, {})
                return row.split_uris[split], info.get("sha256", "")

        uri, sha = await self._db(find)
        target = self.settings.home / "cache" / "splits" / f"{sha or uuid.uuid4().hex}.parquet"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            await self.artifacts.get_file(uri, target, expected_sha256=sha or None)
        return target


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _unused(session: Any, uris: list[str]) -> list[str]:
    """The URIs of ``uris`` no remaining version uses (content-addressed files are shared)."""
    used = {u for s in session.scalars(select(m.DatasetVersion.split_uris)) for u in s.values()}
    return [u for u in dict.fromkeys(uris) if u not in used]
