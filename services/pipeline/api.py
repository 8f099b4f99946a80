"""The pipeline service's gRPC servicer: checks specs, starts, watches, reruns, cancels runs.

Create writes the run and the start event of its first stage in one
transaction (the outbox relay publishes it; the engine's consumer launches the
stage). Watch polls the run's etag, so it sees changes made by any process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from aimass.core.auth import scope
from aimass.core.errors import InvalidArgument
from aimass.core.interceptors import current_principal
from aimass.pipeline import spec as specs
from aimass.pipeline.schedules import ScheduleStore
from aimass.pipeline.schedules_api import ScheduleRpcs
from aimass.pipeline.store import TERMINAL, RunStore, new_run_id, run_id_of
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc

T = TypeVar("T")
Context = grpc.aio.ServicerContext
WATCH_POLL_S = 0.25
STATE_FILTERS = {f"state={name}": name for name in ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}


def principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


class PipelineServicer(ScheduleRpcs, pipeline_pb2_grpc.PipelineServiceServicer):
    """aimass.pipeline.v1.PipelineService: runs here, schedules in :class:`ScheduleRpcs`."""

    def __init__(
        self, store: RunStore, notify_outbox: Callable[[], None], schedules: ScheduleStore
    ) -> None:
        self.store = store
        self.schedules = schedules
        self.notify_outbox = notify_outbox

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    async def CreatePipelineRun(
        self, request: pb.CreatePipelineRunRequest, context: Context
    ) -> pb.PipelineRun:
        run = request.pipeline_run
        if not request.HasField("pipeline_run"):
            raise InvalidArgument("pipeline_run", "is required")
        specs.validate(run.spec, "pipeline_run.spec")
        run_id = request.pipeline_run_id or new_run_id(run.spec.model.model)
        if not specs.RESOURCE_ID.match(run_id):
            raise InvalidArgument(
                "pipeline_run_id",
                f"must be 1-63 lower-case letters, digits and '-', starting with a letter;"
                f" got {run_id!r}",
            )
        if len(request.request_id) > 64:
            raise InvalidArgument("request_id", "must be 64 characters at most")
        # The run's stages act for this project (see aimass.pipeline.engine).
        run.project = scope.stamp_project(run.project, "pipeline_run.project")
        if request.validate_only:
            preview = pb.PipelineRun()
            preview.CopyFrom(run)
            preview.name = f"pipelineRuns/{run_id}"
            return preview
        created = await self._db(
            lambda: self.store.create(
                run_id, run, creator=principal(), request_id=request.request_id
            )
        )
        self.notify_outbox()
        return created

    async def GetPipelineRun(
        self, request: pb.GetPipelineRunRequest, context: Context
    ) -> pb.PipelineRun:
        return await self._db(self.store.get, run_id_of(request.name))

    async def ListPipelineRuns(
        self, request: pb.ListPipelineRunsRequest, context: Context
    ) -> pb.ListPipelineRunsResponse:
        wanted = request.filter.replace(" ", "")
        if wanted and wanted not in STATE_FILTERS:
            raise InvalidArgument(
                "filter", f"only state=<RUNNING|SUCCEEDED|FAILED|CANCELLED> is supported,"
                f" got {request.filter!r}"
            )  # fmt: skip
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        runs, token = await self._db(
            self.store.list, request.page_size, request.page_token, STATE_FILTERS.get(wanted, "")
        )  # the caller's project's runs only (RunStore.list)
        return pb.ListPipelineRunsResponse(pipeline_runs=runs, next_page_token=token)

    async def WatchPipelineRun(
        self, request: pb.WatchPipelineRunRequest, context: Context
    ) -> AsyncIterator[pb.PipelineRun]:
        run_id = run_id_of(request.name)
        sent = ""
        while True:
            etag, state = await self._db(self.store.etag, run_id)
            if etag != sent:
                run = await self._db(self.store.get, run_id)
                sent = run.etag
                yield run
                if pb.RunState.Name(run.state).removeprefix("RUN_STATE_") in TERMINAL:
                    return
            elif state in TERMINAL:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def RerunPipelineRun(
        self, request: pb.RerunPipelineRunRequest, context: Context
    ) -> pb.PipelineRun:
        run = await self._db(self.store.rerun, run_id_of(request.name))
        self.notify_outbox()
        return run

    async def CancelPipelineRun(
        self, request: pb.CancelPipelineRunRequest, context: Context
    ) -> pb.PipelineRun:
        run = await self._db(self.store.cancel, run_id_of(request.name))
        self.notify_outbox()
        return run
