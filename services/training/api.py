"""The TrainingService servicer: validates, stores and enqueues jobs; streams their events.

Create checks the request (dataset version READY through the data service,
config ranges, the spec built against the dataset), then stores the job and
its work-queue message in one transaction (outbox), so a job is never stored
without being queued nor queued without being stored. Watch and the logs read
the job's events from the database.

The internal methods (Claim, ReportProgress, Complete, RegisterWorker) are how
workers write: the service is the single writer of its tables, and a worker
needs no database. Checkpoints that fall out of ``keep_checkpoints`` are
deleted from the artifact store here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.auth import scope
from aimass.core.errors import AimassError, FailedPrecondition, InvalidArgument, NotFound
from aimass.training import search, validation
from aimass.training.scheduling import Scheduler
from aimass.training.store import TERMINAL, TrainingStore, job_id, struct_to_dict
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc

log = logging.getLogger(__name__)

WATCH_POLL_S = 0.2
MAX_REQUEST_ID = 64
_STREAMS = {
    "system": tpb.LOG_STREAM_SYSTEM,
    "stdout": tpb.LOG_STREAM_STDOUT,
    "stderr": tpb.LOG_STREAM_STDERR,
}


def event_to_proto(name: str, event: object) -> common_pb2.JobEvent:
    """A job_events row as the JobEvent of the Watch stream."""
    payload = event.payload or {}  # type: ignore[attr-defined]
    out = common_pb2.JobEvent(job=name, sequence=event.sequence)  # type: ignore[attr-defined]
    out.time.FromDatetime(event.event_time)  # type: ignore[attr-defined]
    kind = event.kind  # type: ignore[attr-defined]
    if kind == "state":
        out.status.state = common_pb2.JobState.Value(f"JOB_STATE_{payload['state']}")
        out.status.reason = payload.get("reason", "")
        out.status.attempt = int(payload.get("attempt", 0))
    elif kind == "metrics":
        out.step = int(payload.get("step", 0))
        out.epoch = int(payload.get("epoch", 0))
        for key, value in payload.get("metrics", {}).items():
            out.metrics[key] = float(value)
        out.status.progress.completed = int(payload.get("completed", out.step))
        out.status.progress.total = int(payload.get("total", 0))
        out.status.progress.unit = "steps"
    elif kind == "checkpoint":
        out.step = int(payload.get("step", 0))
        out.epoch = int(payload.get("epoch", 0))
        out.log_line = f"checkpoint at step {out.step}"
    elif kind == "log":
        out.log_line = payload.get("message", "")
    return out


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(
        self,
        store: TrainingStore,
        data_channel: Callable[[], grpc.aio.Channel],
        notify_outbox: Callable[[], None],
        artifacts: Callable[[], Awaitable[ArtifactStore]] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.data_channel = data_channel
        self.notify_outbox = notify_outbox
        self.artifacts = artifacts

    async def CreateTrainingJob(
        self, request: tpb.CreateTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainingJob:
        if not request.HasField("training_job"):
            raise InvalidArgument("training_job", "is required")
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument("request_id", f"is longer than {MAX_REQUEST_ID} characters")
        job = request.training_job
        job.project = scope.stamp_project(job.project, "training_job.project")
        validation.check_job_fields(job)
        await self._check_target_model(job)
        version = await validation.fetch_dataset_version(self.data_channel(), job.dataset_version)
        trials = None
        if job.HasField("hyperparameter_search"):
            trials = search.expand(job)
            for trial, _ in trials[:1]:
                await validation.check_spec(trial, version)
            for trial, _ in trials:
                validation.check_config(trial.training)
        else:
            await validation.check_spec(job, version)
        if self.scheduler is not None:  # a request no registered worker can ever meet
            await self.scheduler.check_fits(job.resources)
        if request.validate_only:
            return job
        created = await asyncio.to_thread(
            self.store.create,
            job,
            request_id=request.request_id,
            creator=_principal(context),
            trials=[(t, params) for t, params in trials] if trials else None,
        )
        self.notify_outbox()
        return created

    async def _check_target_model(self, job: tpb.TrainingJob) -> None:
        """The worker registers the version with the internal token acting for the job's
        project, so a target model that exists must be in that project: NotFound for a
        scoped caller (as for any model of another project), FailedPrecondition for an
        unscoped one that named the job's project. A missing model is created by the
        worker in the job's project."""
        if not job.target_model:
            return
        project = await asyncio.to_thread(self.store.model_project, job.target_model)
        if project is None or project == job.project or not job.project:
            return
        scope.check_visible(project, f"training_job.target_model: {job.target_model}")
        raise FailedPrecondition(
            f"training_job.target_model: {job.target_model} belongs to project {project!r},"
            f" not to the job's project {job.project!r}"
        )

    async def GetTrainingJob(
        self, request: tpb.GetTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainingJob:
        job_id(request.name)
        return await asyncio.to_thread(self.store.get, request.name)

    async def ListTrainingJobs(
        self, request: tpb.ListTrainingJobsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListTrainingJobsResponse:
        jobs, token = await asyncio.to_thread(
            self.store.list,
            request.filter,
            request.page_size,
            request.page_token,
            request.order_by,
        )
        return tpb.ListTrainingJobsResponse(training_jobs=jobs, next_page_token=token)

    async def CancelTrainingJob(
        self, request: tpb.CancelTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainingJob:
        job_id(request.name)
        job = await asyncio.to_thread(self.store.cancel, request.name)
        self.notify_outbox()
        return job

    async def WatchTrainingJob(
        self, request: tpb.WatchTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job_id(request.name)
        job = await asyncio.to_thread(self.store.get, request.name)
        yield common_pb2.JobEvent(job=request.name, status=job.status, sequence=0)
        after = request.after_sequence
        while True:
            events = await asyncio.to_thread(self.store.events, request.name, after)
            for event in events:
                after = event.sequence
                if event.kind == "log" and not request.include_logs:
                    continue
                yield event_to_proto(request.name, event)
            if not events:
                state = await asyncio.to_thread(self.store.state, request.name)
                if state in TERMINAL:
                    # One last read: events written just before the end are not lost.
                    if not await asyncio.to_thread(self.store.events, request.name, after):
                        return
                    continue
                await asyncio.sleep(WATCH_POLL_S)

    async def ListTrainingJobLogs(
        self, request: tpb.ListTrainingJobLogsRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListTrainingJobLogsResponse:
        job_id(request.parent, "parent")
        size = request.page_size or 1000
        if size < 0 or size > 10000:
            raise InvalidArgument("page_size", "must be in [0, 10000]")
        try:
            after = int(request.page_token or 0)
        except ValueError as err:
            raise InvalidArgument("page_token", "is not a token this service issued") from err
        job = await asyncio.to_thread(self.store.get, request.parent)
        entries, last = [], after
        while len(entries) < size:
            events = await asyncio.to_thread(self.store.events, request.parent, last, size)
            if not events:
                break
            for event in events:
                last = event.sequence
                if event.kind != "log":
                    continue
                payload = event.payload or {}
                entry = tpb.LogEntry(
                    sequence=event.sequence,
                    attempt=int(payload.get("attempt", 0)),
                    rank=int(payload.get("rank", 0)),
                    worker=payload.get("worker", ""),
                    stream=_STREAMS.get(payload.get("stream", "system"), tpb.LOG_STREAM_SYSTEM),
                    message=payload.get("message", ""),
                )
                entry.time.FromDatetime(event.event_time)
                entries.append(entry)
        ended = common_pb2.JobState.Name(job.status.state).removeprefix("JOB_STATE_") in TERMINAL
        token = "" if ended and len(entries) < size else str(last)
        return tpb.ListTrainingJobLogsResponse(log_entries=entries, next_page_token=token)

    async def ListWorkers(
        self, request: tpb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ListWorkersResponse:
        workers, token = await asyncio.to_thread(
            self.store.list_workers, request.page_size, request.page_token
        )
        return tpb.ListWorkersResponse(workers=workers, next_page_token=token)

    # -- internal: the workers' side ---------------------------------------------------------

    async def ClaimTrainingJob(
        self, request: tpb.ClaimTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainingJob:
        job_id(request.name)
        worker = _worker_id(request.worker)
        if request.host_rank < 0:
            raise InvalidArgument("host_rank", "must be >= 0")
        job = await asyncio.to_thread(
            self.store.claim,
            request.name,
            worker,
            request.host_rank,
            request.rendezvous_address,
            request.attempt,
        )
        self.notify_outbox()
        return job

    async def ReportTrainingJobProgress(
        self, request: tpb.ReportTrainingJobProgressRequest, context: grpc.aio.ServicerContext
    ) -> tpb.ReportTrainingJobProgressResponse:
        job_id(request.name)
        records = [_record(index, r) for index, r in enumerate(request.records)]
        cancel, dropped = await asyncio.to_thread(
            self.store.report, request.name, request.attempt, records
        )
        if dropped:
            await self._delete_checkpoints(dropped)
        return tpb.ReportTrainingJobProgressResponse(cancel_requested=cancel)

    async def _delete_checkpoints(self, uris: list[str]) -> None:
        """Superseded checkpoints leave the artifact store (those no job lists any more)."""
        if self.artifacts is None:
            return
        in_use = await asyncio.to_thread(self.store.checkpoints_in_use, uris)
        store = await self.artifacts()
        for uri in uris:
            if uri in in_use:
                continue
            try:
                await store.delete(uri)
            except NotFound:
                pass  # already gone: a retried report
            except AimassError as err:
                log.warning("superseded checkpoint %s not deleted: %s", uri, err)

    async def CompleteTrainingJob(
        self, request: tpb.CompleteTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.CompleteTrainingJobResponse:
        job_id(request.name)
        state = _enum_name(common_pb2.JobState, request.state, "state", "JOB_STATE_")
        if state not in TERMINAL:
            raise InvalidArgument("state", f"must be SUCCEEDED, FAILED or CANCELLED, got {state}")
        outputs = struct_to_dict(request.outputs) if request.HasField("outputs") else None
        job = await asyncio.to_thread(
            self.store.finish,
            request.name,
            state,
            reason=request.reason,
            metrics=dict(request.metrics) if request.metrics or state == "SUCCEEDED" else None,
            model_version=request.model_version,
            outputs=outputs,
            attempt=request.attempt,
            best_trial=request.best_trial,
            trials_completed=request.trials_completed,
        )
        self.notify_outbox()
        response = tpb.CompleteTrainingJobResponse(training_job=job)
        outcome = await asyncio.to_thread(self.store.search_outcome, request.name)
        if outcome is not None:
            response.search_parent.CopyFrom(outcome["parent"])
            for trial in outcome["trials"]:
                out = response.trials.add(
                    name=trial["name"],
                    state=common_pb2.JobState.Value(f"JOB_STATE_{trial['state']}"),
                    metrics=trial["metrics"],
                )
                if trial["outputs"]:
                    out.outputs.update(trial["outputs"])
                out.parameters.update(trial["parameters"])
        return response

    async def RegisterWorker(
        self, request: tpb.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> tpb.Worker:
        worker = _worker_id(request.name, "name")
        state = _enum_name(tpb.WorkerState, request.state, "state", "WORKER_STATE_")
        if state == "UNSPECIFIED":
            state = "IDLE"
        if request.current_job:
            job_id(request.current_job, "current_job")
        registered = await asyncio.to_thread(
            self.store.register_worker,
            worker,
            request.host,
            request.pid,
            struct_to_dict(request.capabilities),
            "GONE" if state == "LOST" else state,
            request.current_job,
        )
        if self.scheduler is not None:
            self.scheduler.wake()  # an idle worker may take a queued job now
        return registered


def _worker_id(name: str, field: str = "worker") -> str:
    if not name.startswith("workers/") or not name[len("workers/") :]:
        raise InvalidArgument(field, f"must look like 'workers/{{worker}}', got {name!r}")
    return name[len("workers/") :]


def _enum_name(enum: Any, number: int, field: str, prefix: str) -> str:
    """The short name of ``number`` in ``enum``; an unknown number (proto3 enums are open,
    any int32 arrives) is the caller's error, not the service's."""
    if number not in enum.values():
        raise InvalidArgument(field, f"unknown value {number}")
    return str(enum.Name(number)).removeprefix(prefix)


def _record(index: int, record: tpb.ProgressRecord) -> tuple[str, dict[str, Any]]:
    """A progress record as the (kind, payload) of a job event."""
    kind = record.WhichOneof("record")
    if kind == "metrics":
        m = record.metrics
        payload: dict[str, Any] = {
            "step": m.step,
            "epoch": m.epoch,
            "metrics": dict(m.metrics),
            "completed": m.step,
            "total": m.total_steps,
        }
        return "metrics", payload
    if kind == "log_entry":
        e = record.log_entry
        field = f"records[{index}].log_entry.stream"
        stream = _enum_name(tpb.LogStream, e.stream, field, "LOG_STREAM_").lower()
        return "log", {
            "attempt": e.attempt,
            "rank": e.rank,
            "worker": e.worker,
            "stream": "system" if stream == "unspecified" else stream,
            "message": e.message,
        }
    if kind == "checkpoint":
        c = record.checkpoint
        if not c.artifact.uri:
            raise InvalidArgument(f"records[{index}].checkpoint.artifact.uri", "is required")
        artifact = {
            "uri": c.artifact.uri,
            "sha256": c.artifact.sha256,
            "size_bytes": c.artifact.size_bytes,
            "file_name": c.artifact.file_name,
        }
        return "checkpoint", {
            "step": c.step,
            "epoch": c.epoch,
            "artifact": artifact,
            "metrics": dict(c.metrics),
        }
    raise InvalidArgument(f"records[{index}]", "is empty")


def _principal(context: grpc.aio.ServicerContext) -> str:
    metadata = dict(context.invocation_metadata() or ())
    return str(metadata.get("x-aimass-principal", ""))


__all__ = ["TrainingServicer", "event_to_proto", "json_format"]
