"""Pipeline schedules: a pipeline spec run every time a cron expression fires.

A schedule is one ``pipeline_schedules`` row; it survives restarts because nothing about it
lives only in memory. Every pipeline process runs a :class:`Scheduler` loop that looks for
ACTIVE rows whose ``next_run_time`` has come. Firing is one transaction that moves
``next_run_time`` on by compare-and-set (``UPDATE ... WHERE next_run_time = <the due
time>``) and writes the pipeline run with the start event of its first stage: with several
pipeline replicas exactly one wins a given firing, and a crash leaves either both or neither.

Policies (docs/pipelines.md):

- Missed firings (no pipeline process ran at the time, or the database was away) are run
  once, when a process sees the schedule due, then the schedule goes on from the next time
  after now: a week down means one catch-up run, not a week of them.
- Resuming a PAUSED schedule starts from the next time after now; the times missed while
  paused are not run.
- "The latest dataset version": a spec with a dataset source ingests at every run, and the
  data service answers an unchanged source with the READY version of the same fingerprint
  (a changed one becomes a new version). A spec that names a ``dataset_version`` instead is
  given the dataset's newest READY version at every firing.
- Runs may overlap: a firing does not wait for the previous run to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from croniter import CroniterBadDateError, croniter
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update

from aimass.core.auth import scope
from aimass.core.auth.hook import acting_for_project
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.db.columns import new_etag
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import InvalidArgument, NotFound
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.pipeline import spec as specs
from aimass.pipeline.store import insert_run
from aimass.pipeline.v1 import pipeline_pb2 as pb

log = logging.getLogger(__name__)

SCHEDULE_PREFIX = "schedules/"
# How many next run times a Schedule shows.
NEXT_RUN_TIMES = 5
# How often the scheduler looks for due schedules: the finest cron field is one second.
TICK_S = 1.0
CRON_MAX_LEN = 200
TIME_ZONE_MAX_LEN = 64
UPDATABLE = ("cron", "time_zone", "spec", "description", "labels")
LABEL = "schedule"


def schedule_id_of(name: str, field: str = "name") -> str:
    """The {schedule} of "schedules/{schedule}"; InvalidArgument naming ``field`` otherwise."""
    schedule_id = name.removeprefix(SCHEDULE_PREFIX)
    if not name.startswith(SCHEDULE_PREFIX) or not specs.RESOURCE_ID.match(schedule_id):
        raise InvalidArgument(field, f"must be schedules/{{schedule}}, got {name!r}")
    return schedule_id


def time_zone(name: str, field: str) -> ZoneInfo:
    """The IANA zone ``name`` ("" is UTC); InvalidArgument naming ``field`` otherwise."""
    if len(name) > TIME_ZONE_MAX_LEN:
        raise InvalidArgument(field, f"must be {TIME_ZONE_MAX_LEN} characters at most")
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError) as err:
        raise InvalidArgument(
            field, f"is not an IANA time zone (for example Europe/Paris): {name!r}"
        ) from err


def check_cron(expression: str, field: str) -> None:
    """InvalidArgument naming ``field`` unless ``expression`` is a cron expression we run."""
    if not expression.strip():
        raise InvalidArgument(field, "is required, for example '0 3 * * *' (every day at 03:00)")
    if len(expression) > CRON_MAX_LEN:
        raise InvalidArgument(field, f"must be {CRON_MAX_LEN} characters at most")
    fields = expression.split()
    if not expression.startswith("@") and len(fields) not in (5, 6):
        raise InvalidArgument(
            field,
            f"must have 5 fields (minute hour day-of-month month day-of-week) or 6 (with"
            f" seconds last), got {len(fields)} in {expression!r}",
        )
    if not croniter.is_valid(expression):
        raise InvalidArgument(field, f"is not a valid cron expression: {expression!r}")
    try:
        croniter(expression, utcnow()).get_next(datetime)
    except CroniterBadDateError as err:  # valid fields that never meet, "0 0 30 2 *"
        raise InvalidArgument(field, f"never fires: {expression!r}") from err


def next_times(expression: str, zone: str, after: datetime, count: int) -> list[datetime]:
    """The ``count`` times after ``after`` when ``expression`` fires in ``zone``, in UTC."""
    local = after.astimezone(ZoneInfo(zone or "UTC"))
    times = croniter(expression, local)
    return [times.get_next(datetime).astimezone(UTC) for _ in range(count)]


def validate(schedule: pb.Schedule, field: str = "schedule") -> None:
    """Checks everything a schedule needs before anything is written."""
    if not schedule.HasField("spec"):
        raise InvalidArgument(f"{field}.spec", "is required")
    specs.validate(schedule.spec, f"{field}.spec")
    check_cron(schedule.cron, f"{field}.cron")
    time_zone(schedule.time_zone, f"{field}.time_zone")


@dataclass(frozen=True)
class Due:
    """A schedule whose next run time has come."""

    schedule: str
    due: datetime
    spec: pb.PipelineSpec
    # The schedule's project: the runs it fires belong to it, and resolving the newest
    # dataset version acts for it.
    project: str = ""


class ScheduleStore:
    """Every read and write of pipeline schedules, each in its own transaction."""

    def __init__(self, database: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self.database = database
        self.clock = clock

    def create(
        self, schedule_id: str, schedule: pb.Schedule, *, creator: str, paused: bool
    ) -> pb.Schedule:
        """Registers the schedule in ``schedule.project`` (already stamped by the caller)."""
        first = None if paused else self._following(schedule.cron, schedule.time_zone)
        with self.database.session(resource=f"schedules/{schedule_id}") as session:
            row = m.PipelineSchedule(
                name=schedule_id,
                description=schedule.description,
                project=schedule.project,
                creator=creator,
                labels=dict(schedule.labels),
                spec=_spec_dict(schedule.spec),
                cron=schedule.cron,
                time_zone=schedule.time_zone,
                state="PAUSED" if paused else "ACTIVE",
                next_run_time=first,
                last_run="",
                run_count=0,
            )
            session.add(row)
            session.flush()
            return schedule_to_proto(row)

    def get(self, schedule_id: str) -> pb.Schedule:
        with self.database.session(read_only=True) as session:
            return schedule_to_proto(_row(session, schedule_id))

    def list(self, page_size: int, page_token: str) -> tuple[list[pb.Schedule], str]:
        with self.database.session(read_only=True) as session:
            rows, token = paginate(
                session,
                select(m.PipelineSchedule).where(*scope.project_filter(m.PipelineSchedule.project)),
                [m.PipelineSchedule.create_time, m.PipelineSchedule.id],
                page_size,
                page_token,
            )
            return [schedule_to_proto(row) for row in rows], token

    def update(self, schedule_id: str, schedule: pb.Schedule, paths: list[str]) -> pb.Schedule:
        """Sets the fields of ``paths``; a new cron or zone recomputes the next run time."""
        with self.database.session(resource=f"schedules/{schedule_id}") as session:
            row = _row(session, schedule_id, for_update=True)
            for path in paths:
                if path == "spec":
                    row.spec = _spec_dict(schedule.spec)
                elif path == "labels":
                    row.labels = dict(schedule.labels)
                else:
                    setattr(row, path, getattr(schedule, path))
            if row.state == "ACTIVE" and {"cron", "time_zone"} & set(paths):
                row.next_run_time = self._following(row.cron, row.time_zone)
            session.flush()
            return schedule_to_proto(row)

    def pause(self, schedule_id: str) -> pb.Schedule:
        with self.database.session(resource=f"schedules/{schedule_id}") as session:
            row = _row(session, schedule_id, for_update=True)
            if row.state != "PAUSED":
                row.state = "PAUSED"
                row.next_run_time = None
                session.flush()
            return schedule_to_proto(row)

    def resume(self, schedule_id: str) -> pb.Schedule:
        """ACTIVE again from the next time after now: times missed while paused are not run."""
        with self.database.session(resource=f"schedules/{schedule_id}") as session:
            row = _row(session, schedule_id, for_update=True)
            if row.state != "ACTIVE":
                row.state = "ACTIVE"
                row.next_run_time = self._following(row.cron, row.time_zone)
                session.flush()
            return schedule_to_proto(row)

    def delete(self, schedule_id: str) -> None:
        with self.database.session(resource=f"schedules/{schedule_id}") as session:
            session.delete(_row(session, schedule_id, for_update=True))

    # ------------------------------------------------------------ firing

    def due(self) -> list[Due]:
        """ACTIVE schedules whose next run time has come, the longest waiting first."""
        with self.database.session(read_only=True) as session:
            rows = session.scalars(
                select(m.PipelineSchedule)
                .where(
                    m.PipelineSchedule.state == "ACTIVE",
                    m.PipelineSchedule.next_run_time <= self.clock(),
                )
                .order_by(m.PipelineSchedule.next_run_time)
            )
            return [
                Due(row.name, row.next_run_time, _spec(row), row.project)  # type: ignore[arg-type]
                for row in rows
            ]

    def fire(self, due: Due, spec: pb.PipelineSpec) -> str | None:
        """Starts the run of ``due`` with ``spec``: its name, or None when another process
        fired this time first (or the schedule was paused, changed or deleted meanwhile)."""
        with self.database.session(resource=f"schedules/{due.schedule}") as session:
            row = _row(session, due.schedule)
            following = self._following(row.cron, row.time_zone, max(due.due, self.clock()))
            run_id = _run_id(due.schedule, due.due)
            won = session.execute(
                update(m.PipelineSchedule)
                .where(
                    m.PipelineSchedule.name == due.schedule,
                    m.PipelineSchedule.state == "ACTIVE",
                    m.PipelineSchedule.next_run_time == due.due,
                )
                .values(
                    next_run_time=following,
                    last_run=f"pipelineRuns/{run_id}",
                    last_run_time=due.due,
                    run_count=m.PipelineSchedule.run_count + 1,
                    update_time=utcnow(),
                    etag=new_etag(),
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if won != 1:
                return None
            run = pb.PipelineRun(
                description=f"schedules/{due.schedule} at {due.due.isoformat()}",
                labels={**row.labels, LABEL: due.schedule},
                spec=spec,
                project=row.project,
            )
            insert_run(session, run_id, run, row.creator, "")
            return f"pipelineRuns/{run_id}"

    def _following(self, cron: str, zone: str, after: datetime | None = None) -> datetime:
        return next_times(cron, zone, after or self.clock(), 1)[0]


class NewestDataset:
    """Turns a spec's pinned dataset version into its dataset's newest READY version."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.data = data_pb2_grpc.DataServiceStub(channel)

    async def resolve(self, spec: pb.PipelineSpec) -> pb.PipelineSpec:
        """``spec`` with the newest READY version; unchanged when it ingests or the dataset
        has none. Raises grpc errors other than NOT_FOUND: the firing is tried again."""
        if not spec.dataset.dataset_version:
            return spec
        newest = await self._newest_ready(f"datasets/{spec.dataset.dataset}")
        resolved = pb.PipelineSpec()
        resolved.CopyFrom(spec)
        if newest:
            resolved.dataset.dataset_version = newest
        return resolved

    async def _newest_ready(self, dataset: str) -> str:
        token = ""
        while True:
            try:
                page = await self.data.ListDatasetVersions(
                    data_pb2.ListDatasetVersionsRequest(parent=dataset, page_token=token),
                    timeout=30.0,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return ""
                raise
            for version in page.dataset_versions:  # newest first
                if version.state == data_pb2.DATASET_VERSION_STATE_READY:
                    return version.name
            if not page.next_page_token:
                return ""
            token = page.next_page_token


class Scheduler:
    """The loop of one pipeline process that fires due schedules."""

    def __init__(
        self,
        store: ScheduleStore,
        newest: NewestDataset,
        notify_outbox: Callable[[], None],
        *,
        tick_s: float = TICK_S,
    ) -> None:
        self.store = store
        self.newest = newest
        self.notify_outbox = notify_outbox
        self.tick_s = tick_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pipeline-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def tick(self) -> list[str]:
        """Fires every due schedule once; the runs this process started."""
        started = []
        for due in await asyncio.to_thread(self.store.due):
            try:
                # The newest version the schedule's project can see, never another's.
                with acting_for_project(due.project):
                    spec = await self.newest.resolve(due.spec)
                run = await asyncio.to_thread(self.store.fire, due, spec)
            except Exception:  # the data service or the database is away: next tick
                log.exception("schedules/%s: cannot fire (will retry)", due.schedule)
                continue
            if run is not None:
                log.info("schedules/%s: started %s", due.schedule, run)
                started.append(run)
        if started:
            self.notify_outbox()
        return started

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the database is away: try again next round
                log.exception("pipeline scheduler: cannot list due schedules")
            await asyncio.sleep(self.tick_s)


# ---------------------------------------------------------------- row <-> proto


def _run_id(schedule_id: str, due: datetime) -> str:
    """A readable, unique run id: the schedule, the cron time and 6 hex digits."""
    return f"{schedule_id[:36].rstrip('-')}-{due:%Y%m%d%H%M%S}-{uuid.uuid4().hex[:6]}"


def _row(session: Any, schedule_id: str, *, for_update: bool = False) -> m.PipelineSchedule:
    stmt = select(m.PipelineSchedule).where(m.PipelineSchedule.name == schedule_id)
    row = session.scalar(stmt.with_for_update() if for_update else stmt)
    if row is None:
        raise NotFound(f"schedules/{schedule_id} does not exist")
    # Another project's schedule answers as a missing one (the scheduler is unscoped).
    scope.check_visible(row.project, f"schedules/{schedule_id}")
    return row  # type: ignore[no-any-return]


def _spec_dict(spec: pb.PipelineSpec) -> dict[str, Any]:
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def _spec(row: m.PipelineSchedule) -> pb.PipelineSpec:
    return json_format.ParseDict(row.spec, pb.PipelineSpec(), ignore_unknown_fields=True)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def schedule_to_proto(row: m.PipelineSchedule) -> pb.Schedule:
    schedule = pb.Schedule(
        name=f"schedules/{row.name}",
        description=row.description,
        labels=row.labels,
        spec=_spec(row),
        cron=row.cron,
        time_zone=row.time_zone,
        state=pb.ScheduleState.Value(f"SCHEDULE_STATE_{row.state}"),
        last_run=row.last_run,
        run_count=row.run_count,
        creator=row.creator,
        etag=row.etag,
        project=row.project,
    )
    if row.next_run_time is not None:
        upcoming = [row.next_run_time]
        upcoming += next_times(row.cron, row.time_zone, row.next_run_time, NEXT_RUN_TIMES - 1)
        schedule.next_run_times.extend(_timestamp(t) for t in upcoming)
    for field in ("last_run_time", "create_time", "update_time"):
        value = getattr(row, field)
        if value is not None:
            getattr(schedule, field).CopyFrom(_timestamp(value))
    return schedule
