"""The schedule RPCs of aimass.pipeline.v1.PipelineService (a mixin of its servicer).

Everything is checked before anything is written: a bad cron expression, time zone or spec
is refused naming the field, and no schedule is registered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from aimass.core.auth import scope
from aimass.core.errors import InvalidArgument
from aimass.core.interceptors import current_principal
from aimass.pipeline import schedules as sch
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb

T = TypeVar("T")
Context = grpc.aio.ServicerContext


def _principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


class ScheduleRpcs:
    """CreateSchedule, GetSchedule, ListSchedules, UpdateSchedule, Pause/Resume, Delete."""

    schedules: sch.ScheduleStore

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Context
    ) -> pb.Schedule:
        if not request.HasField("schedule"):
            raise InvalidArgument("schedule", "is required")
        if not specs.RESOURCE_ID.match(request.schedule_id):
            raise InvalidArgument(
                "schedule_id",
                f"must be 1-63 lower-case letters, digits and '-', starting with a letter;"
                f" got {request.schedule_id!r}",
            )
        sch.validate(request.schedule)
        request.schedule.project = scope.stamp_project(request.schedule.project, "schedule.project")
        if request.validate_only:
            preview = pb.Schedule()
            preview.CopyFrom(request.schedule)
            preview.name = f"schedules/{request.schedule_id}"
            return preview
        creator = _principal()
        return await self._in_thread(
            lambda: self.schedules.create(
                request.schedule_id, request.schedule, creator=creator, paused=request.paused
            )
        )

    async def GetSchedule(self, request: pb.GetScheduleRequest, context: Context) -> pb.Schedule:
        return await self._in_thread(self.schedules.get, sch.schedule_id_of(request.name))

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        found, token = await self._in_thread(
            self.schedules.list, request.page_size, request.page_token
        )
        return pb.ListSchedulesResponse(schedules=found, next_page_token=token)

    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Context
    ) -> pb.Schedule:
        schedule = request.schedule
        schedule_id = sch.schedule_id_of(schedule.name, "schedule.name")
        paths = list(request.update_mask.paths)
        if not paths or paths == ["*"]:
            paths = list(sch.UPDATABLE)
        unknown = sorted(set(paths) - set(sch.UPDATABLE))
        if unknown:
            raise InvalidArgument(
                "update_mask",
                f"cannot change {', '.join(unknown)}; only {', '.join(sch.UPDATABLE)}"
                " (state: PauseSchedule / ResumeSchedule)",
            )
        if "spec" in paths:
            specs.validate(schedule.spec, "schedule.spec")
        if "cron" in paths:
            sch.check_cron(schedule.cron, "schedule.cron")
        if "time_zone" in paths:
            sch.time_zone(schedule.time_zone, "schedule.time_zone")
        return await self._in_thread(self.schedules.update, schedule_id, schedule, paths)

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Context
    ) -> pb.Schedule:
        return await self._in_thread(self.schedules.pause, sch.schedule_id_of(request.name))

    async def ResumeSchedule(
        self, request: pb.ResumeScheduleRequest, context: Context
    ) -> pb.Schedule:
        return await self._in_thread(self.schedules.resume, sch.schedule_id_of(request.name))

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._in_thread(self.schedules.delete, sch.schedule_id_of(request.name))
        return empty_pb2.Empty()
