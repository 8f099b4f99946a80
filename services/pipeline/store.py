"""Pipeline runs in the database: the run row, its stages, and every state change.

A run's whole state is one ``pipeline_runs`` row (stages and summary as JSON),
so every transition is one locked read-modify-write and a crash leaves
either the old state or the new one. Each transition that starts a stage or
ends the run writes its event to the outbox in the same transaction:

- ``aimass.pipeline.stage.started`` (PipelineStageStarted): the service's own
  durable consumer creates the stage's job (see :mod:`aimass.pipeline.engine`).
- ``aimass.pipeline.run.succeeded`` / ``aimass.pipeline.run.failed``.

Transitions are compare-and-set on (stage, attempt, state): a duplicate event
or a second process finds the stage moved on and changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.events.v1 import events_pb2
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb

T = TypeVar("T")
SOURCE = "pipeline"
STAGE_STARTED_TOPIC = "aimass.pipeline.stage.started"
RUN_ENDED_TOPICS = {
    "SUCCEEDED": "aimass.pipeline.run.succeeded",
    "FAILED": "aimass.pipeline.run.failed",
    "CANCELLED": "aimass.pipeline.run.failed",
}
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
RUN_NAME_PREFIX = "pipelineRuns/"


def stage_key(stage: int) -> str:
    """ "STAGE_TRAIN" for pb.STAGE_TRAIN: how stages are named in the row and in events."""
    return pb.Stage.Name(stage)


def run_id_of(name: str, field: str = "name") -> str:
    """The {run} of "pipelineRuns/{run}"; InvalidArgument naming ``field`` otherwise."""
    if not name.startswith(RUN_NAME_PREFIX) or not specs.RESOURCE_ID.match(
        name[len(RUN_NAME_PREFIX) :]
    ):
        raise InvalidArgument(field, f"must be pipelineRuns/{{run}}, got {name!r}")
    return name[len(RUN_NAME_PREFIX) :]


@dataclass(frozen=True)
class ActiveStage:
    """The stage a RUNNING run is at: what to launch or what to wait for."""

    run: str
    stage: int
    state: str
    attempt: int
    resource: str
    spec: pb.PipelineSpec
    summary: pb.PipelineSummary
    # When the stage attempt started (ISO 8601, UTC).
    start_time: str = ""
    # The run's project: the stage's calls act for it (what they create lands there).
    project: str = ""


class RunStore:
    """Every read and write of pipeline runs, each in its own transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # ------------------------------------------------------------ create / read

    def create(
        self,
        run_id: str,
        run: pb.PipelineRun,
        *,
        creator: str,
        request_id: str,
    ) -> pb.PipelineRun:
        """Writes the run, starts its first stage (or ends it when every stage is skipped)."""
        with self.database.session(resource=f"pipelineRuns/{run_id}") as session:
            return run_to_proto(insert_run(session, run_id, run, creator, request_id))

    def get(self, run_id: str) -> pb.PipelineRun:
        with self.database.session(read_only=True) as session:
            return run_to_proto(_row(session, run_id))

    def etag(self, run_id: str) -> tuple[str, str]:
        """(etag, state) of a run: cheap enough to poll."""
        with self.database.session(read_only=True) as session:
            found = session.execute(
                select(m.PipelineRun.etag, m.PipelineRun.state).where(m.PipelineRun.name == run_id)
            ).first()
            if found is None:
                raise NotFound(f"pipelineRuns/{run_id} does not exist")
            return str(found[0]), str(found[1])

    def list(self, page_size: int, page_token: str, state: str) -> tuple[list[pb.PipelineRun], str]:
        with self.database.session(read_only=True) as session:
            stmt = select(m.PipelineRun).where(*scope.project_filter(m.PipelineRun.project))
            if state:
                stmt = stmt.where(m.PipelineRun.state == state)
            rows, token = paginate(
                session,
                stmt,
                [m.PipelineRun.create_time.desc(), m.PipelineRun.id.desc()],
                page_size,
                page_token,
            )
            return [run_to_proto(row) for row in rows], token

    def active_stage(self, run_id: str) -> ActiveStage | None:
        """The STARTING or RUNNING stage of a RUNNING run; None when there is none."""
        with self.database.session(read_only=True) as session:
            row = session.scalar(select(m.PipelineRun).where(m.PipelineRun.name == run_id))
            return None if row is None else _active(row)

    def runs_waiting_on(self, resources: list[str], prefix: str = "") -> list[str]:
        """Ids of RUNNING runs whose running stage waits for one of ``resources`` (or for a
        name starting with ``prefix``, when given)."""
        waits = m.PipelineRun.waiting_on.in_(resources)
        if prefix:
            waits = or_(waits, m.PipelineRun.waiting_on.startswith(prefix))
        with self.database.session(read_only=True) as session:
            return list(
                session.scalars(
                    select(m.PipelineRun.name).where(m.PipelineRun.state == "RUNNING", waits)
                )
            )

    def running_runs(self) -> list[str]:
        """Ids of every RUNNING run (the watchdog's list)."""
        with self.database.session(read_only=True) as session:
            return list(
                session.scalars(select(m.PipelineRun.name).where(m.PipelineRun.state == "RUNNING"))
            )

    # ------------------------------------------------------------ stage transitions

    def mark_running(
        self, run_id: str, stage: int, attempt: int, resource: str, waiting_on: str
    ) -> bool:
        """STARTING -> RUNNING with the job it created; False when the stage moved on."""

        def work(session: Session, row: m.PipelineRun) -> bool:
            entry = _current(row, stage, attempt, {"STARTING"})
            if entry is None:
                return False
            _set_stage(row, stage, state="RUNNING", resource=resource)
            row.waiting_on = waiting_on
            return True

        return self._mutate(run_id, work)

    def mark_succeeded(
        self,
        run_id: str,
        stage: int,
        attempt: int,
        summary: dict[str, Any],
        resource: str = "",
    ) -> bool:
        """STARTING/RUNNING -> SUCCEEDED with what the stage produced; starts the next stage."""

        def work(session: Session, row: m.PipelineRun) -> bool:
            entry = _current(row, stage, attempt, {"STARTING", "RUNNING"})
            if entry is None:
                return False
            updates: dict[str, Any] = {"state": "SUCCEEDED", "end_time": _now_text()}
            if resource:
                updates["resource"] = resource
            _set_stage(row, stage, **updates)
            row.summary = {**row.summary, **summary}
            row.waiting_on = ""
            _start_next(session, row)
            return True

        return self._mutate(run_id, work)

    def mark_failed(
        self, run_id: str, stage: int, attempt: int, reason: str, from_state: str
    ) -> bool:
        """``from_state`` (STARTING or RUNNING) -> FAILED: the run stops, naming stage and reason.

        A launch fails only a STARTING stage: a duplicate launch that was refused must not
        fail the stage another delivery already started.
        """

        def work(session: Session, row: m.PipelineRun) -> bool:
            entry = _current(row, stage, attempt, {from_state})
            if entry is None:
                return False
            _set_stage(row, stage, state="FAILED", reason=reason, end_time=_now_text())
            row.waiting_on = ""
            row.failed_stage = stage_key(stage)
            _end(session, row, "FAILED", f"{_stage_label(stage)} failed: {reason}")
            return True

        return self._mutate(run_id, work)

    # ------------------------------------------------------------ rerun / cancel

    def rerun(self, run_id: str) -> pb.PipelineRun:
        """A FAILED or CANCELLED run starts again at the stage that stopped it."""

        def work(session: Session, row: m.PipelineRun) -> pb.PipelineRun:
            if row.state not in {"FAILED", "CANCELLED"}:
                raise FailedPrecondition(
                    f"pipelineRuns/{run_id} is {row.state}: only a FAILED or CANCELLED run"
                    " can be rerun"
                )
            for key, entry in row.stages.items():
                if entry["state"] in {"FAILED", "CANCELLED", "STARTING", "RUNNING"}:
                    _set_stage(row, pb.Stage.Value(key), state="PENDING", reason="")
            row.state = "RUNNING"
            row.reason = ""
            row.failed_stage = ""
            row.end_time = None
            row.attempt += 1
            _start_next(session, row)
            return run_to_proto(row)

        return self._mutate(run_id, work)

    def cancel(self, run_id: str) -> pb.PipelineRun:
        """Stops a RUNNING run; a finished one is returned as it is."""

        def work(session: Session, row: m.PipelineRun) -> pb.PipelineRun:
            if row.state in TERMINAL:
                return run_to_proto(row)
            for key, entry in row.stages.items():
                if entry["state"] in {"STARTING", "RUNNING"}:
                    _set_stage(row, pb.Stage.Value(key), state="CANCELLED", end_time=_now_text())
            row.waiting_on = ""
            _end(session, row, "CANCELLED", "cancelled on request")
            return run_to_proto(row)

        return self._mutate(run_id, work)

    # ------------------------------------------------------------ helpers

    def _mutate(self, run_id: str, work: Callable[[Session, m.PipelineRun], T]) -> T:
        with self.database.session(resource=f"pipelineRuns/{run_id}") as session:
            row = session.scalar(
                select(m.PipelineRun).where(m.PipelineRun.name == run_id).with_for_update()
            )
            if row is None:
                raise NotFound(f"pipelineRuns/{run_id} does not exist")
            scope.check_visible(row.project, f"pipelineRuns/{run_id}")
            return work(session, row)


def insert_run(
    session: Session, run_id: str, run: pb.PipelineRun, creator: str, request_id: str
) -> m.PipelineRun:
    """Adds the run (in ``run.project``) in ``session`` and starts its first stage; the run
    an earlier call with the same ``request_id`` made, when there is one (NotFound when that
    run is another project's: request ids are unique across projects, and a replay must not
    return another project's run). Schedules call it in their own transaction, so the
    firing and the run it starts commit together."""
    if request_id:
        existing = session.scalar(
            select(m.PipelineRun).where(m.PipelineRun.request_id == request_id)
        )
        if existing is not None:
            scope.check_visible(existing.project, f"request_id {request_id!r}")
            return existing
    row = m.PipelineRun(
        name=run_id,
        description=run.description,
        project=run.project,
        labels=dict(run.labels),
        creator=creator,
        spec=json_format.MessageToDict(run.spec, preserving_proto_field_name=True),
        state="RUNNING",
        stages={
            stage_key(stage): _stage_entry("PENDING" if runs else "SKIPPED")
            for stage, runs in specs.planned_stages(run.spec)
        },
        summary=_initial_summary(run.spec),
        attempt=1,
        request_id=request_id or None,
    )
    session.add(row)
    session.flush()
    _start_next(session, row)
    return row


def new_run_id(model: str) -> str:
    """A readable, unique id: the model id and 8 hex digits."""
    return f"{model[:54].rstrip('-')}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- transitions


def _start_next(session: Session, row: m.PipelineRun) -> None:
    """Starts the first PENDING stage (its event goes to the outbox), or ends the run."""
    for stage, _ in specs.planned_stages(_spec(row)):
        entry = row.stages[stage_key(stage)]
        if entry["state"] == "PENDING":
            attempt = int(entry.get("attempt", 0)) + 1
            _set_stage(
                row, stage, state="STARTING", attempt=attempt, resource="", reason="",
                start_time=_now_text(), end_time="",
            )  # fmt: skip
            add_event(
                session,
                STAGE_STARTED_TOPIC,
                events_pb2.PipelineStageStarted(
                    run=f"pipelineRuns/{row.name}", stage=stage_key(stage), attempt=attempt
                ),
                subject=f"pipelineRuns/{row.name}",
                source=SOURCE,
            )
            return
    _end(session, row, "SUCCEEDED", "")


def _end(session: Session, row: m.PipelineRun, state: str, reason: str) -> None:
    row.state = state
    row.reason = reason
    row.end_time = utcnow()
    add_event(
        session,
        RUN_ENDED_TOPICS[state],
        events_pb2.PipelineRunEnded(
            run=f"pipelineRuns/{row.name}",
            state=state,
            failed_stage=row.failed_stage,
            reason=reason,
        ),
        subject=f"pipelineRuns/{row.name}",
        source=SOURCE,
    )


def _current(
    row: m.PipelineRun, stage: int, attempt: int, states: set[str]
) -> dict[str, Any] | None:
    """The stage's entry when the run is RUNNING and the stage is at ``attempt`` in ``states``."""
    if row.state != "RUNNING":
        return None
    entry = row.stages.get(stage_key(stage))
    if entry is None or int(entry.get("attempt", 0)) != attempt or entry["state"] not in states:
        return None
    return entry


def _active(row: m.PipelineRun) -> ActiveStage | None:
    if row.state != "RUNNING":
        return None
    for key, entry in row.stages.items():
        if entry["state"] in {"STARTING", "RUNNING"}:
            return ActiveStage(
                run=row.name, stage=pb.Stage.Value(key), state=entry["state"],
                attempt=int(entry.get("attempt", 0)), resource=entry.get("resource", ""),
                spec=_spec(row), summary=_summary(row), start_time=entry.get("start_time", ""),
                project=row.project,
            )  # fmt: skip
    return None


def _set_stage(row: m.PipelineRun, stage: int, **values: Any) -> None:
    # JSON columns track assignment only: build a new dict.
    key = stage_key(stage)
    row.stages = {**row.stages, key: {**row.stages.get(key, _stage_entry("PENDING")), **values}}


def _stage_entry(state: str) -> dict[str, Any]:
    return {"state": state, "resource": "", "reason": "", "attempt": 0,
            "start_time": "", "end_time": ""}  # fmt: skip


def _stage_label(stage: int) -> str:
    """ "train" for STAGE_TRAIN: how messages name a stage."""
    return stage_key(stage).removeprefix("STAGE_").lower().replace("_", "-")


def _initial_summary(spec: pb.PipelineSpec) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if spec.dataset.dataset_version:
        summary["dataset_version"] = spec.dataset.dataset_version
    if spec.model.model_version:
        summary["model_version"] = spec.model.model_version
    return summary


def _now_text() -> str:
    return utcnow().isoformat()


# ---------------------------------------------------------------- row <-> proto


def _row(session: Session, run_id: str) -> m.PipelineRun:
    row = session.scalar(select(m.PipelineRun).where(m.PipelineRun.name == run_id))
    if row is None:
        raise NotFound(f"pipelineRuns/{run_id} does not exist")
    scope.check_visible(row.project, f"pipelineRuns/{run_id}")
    return row


def _spec(row: m.PipelineRun) -> pb.PipelineSpec:
    return json_format.ParseDict(row.spec, pb.PipelineSpec(), ignore_unknown_fields=True)


def _summary(row: m.PipelineRun) -> pb.PipelineSummary:
    return json_format.ParseDict(row.summary, pb.PipelineSummary(), ignore_unknown_fields=True)


def _timestamp(value: datetime | str | None) -> Timestamp | None:
    if not value:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(value) if isinstance(value, str) else value)
    return stamp


def run_to_proto(row: m.PipelineRun) -> pb.PipelineRun:
    run = pb.PipelineRun(
        name=f"pipelineRuns/{row.name}",
        description=row.description,
        labels=row.labels,
        spec=_spec(row),
        state=pb.RunState.Value(f"RUN_STATE_{row.state}"),
        failed_stage=pb.Stage.Value(row.failed_stage) if row.failed_stage else 0,
        reason=row.reason,
        summary=_summary(row),
        attempt=row.attempt,
        creator=row.creator,
        etag=row.etag,
        project=row.project,
    )
    for stage, _ in specs.planned_stages(run.spec):
        entry = row.stages.get(stage_key(stage), _stage_entry("PENDING"))
        status = run.stages.add(
            stage=stage,
            state=pb.StageState.Value(f"STAGE_STATE_{entry['state']}"),
            resource=entry.get("resource", ""),
            reason=entry.get("reason", ""),
            attempt=int(entry.get("attempt", 0)),
        )
        for field in ("start_time", "end_time"):
            stamp = _timestamp(entry.get(field))
            if stamp is not None:
                getattr(status, field).CopyFrom(stamp)
    for field in ("create_time", "update_time", "end_time"):
        stamp = _timestamp(getattr(row, field))
        if stamp is not None:
            getattr(run, field).CopyFrom(stamp)
    return run
