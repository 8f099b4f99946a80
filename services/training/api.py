"""The TrainingService servicer: validates, stores and enqueues jobs; streams their events.

Create checks the request (dataset version READY through the data service,
config ranges, the spec built against the dataset), then stores the job and
its work-queue message in one transaction (outbox), so a job is never stored
without being queued nor queued without being stored. Watch and the logs read
the job's events from the database, where the workers write them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import json_format

from aimass.common.v1 import common_pb2
from aimass.core.errors import InvalidArgument
from aimass.training import search, validation
from aimass.training.store import TERMINAL, TrainingStore, job_id
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc

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
    ) -> None:
        self.store = store
        self.data_channel = data_channel
        self.notify_outbox = notify_outbox

    async def CreateTrainingJob(
        self, request: tpb.CreateTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> tpb.TrainingJob:
        if not request.HasField("training_job"):
            raise InvalidArgument("training_job", "is required")
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument("request_id", f"is longer than {MAX_REQUEST_ID} characters")
        job = request.training_job
        validation.check_job_fields(job)
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


def _principal(context: grpc.aio.ServicerContext) -> str:
    metadata = dict(context.invocation_metadata() or ())
    return str(metadata.get("x-aimass-principal", ""))


__all__ = ["TrainingServicer", "event_to_proto", "json_format"]
