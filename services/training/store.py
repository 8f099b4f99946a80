"""The training service's tables (training_jobs, job_events, workers) behind one store.

Both the service (API) and the workers use it: a worker reports state,
metrics, logs and checkpoints straight into the shared database (workers
need the database URL, as services do). Every state change writes its job
event and, where one is due, its outbox event in the same transaction:
enqueueing a job (``aimassjobs.training``) and ``aimass.training.job.*``.
ORM rows never leave the store: callers get ``TrainingJob`` protos.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.models import JobEvent, TrainingJob, Worker
from aimass.core.db.pagination import paginate
from aimass.core.errors import InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.core.protodict import message_from_dict, message_to_dict
from aimass.events.v1 import events_pb2
from aimass.training.v1 import training_pb2 as tpb

SOURCE = "training"
JOB_TOPIC = "aimassjobs.training"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
PREFIX = "trainingJobs/"
_FILTER_COLUMNS = {
    "state": TrainingJob.state,
    "dataset_version": TrainingJob.dataset_version,
    "target_model": TrainingJob.target_model,
    "model_version": TrainingJob.result_version,
    "project": TrainingJob.project,
}


def job_id(name: str, field: str = "name") -> str:
    if not name.startswith(PREFIX) or not name[len(PREFIX) :]:
        raise InvalidArgument(field, f"must look like 'trainingJobs/{{job}}', got {name!r}")
    return name[len(PREFIX) :]


def _ts(value: datetime | None) -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    if value is not None:
        stamp.FromDatetime(value)
    return stamp


class TrainingStore:
    """Jobs, their events and the workers, in the metadata database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- conversion --------------------------------------------------------------------------

    def _to_proto(self, session: Session, row: TrainingJob) -> tpb.TrainingJob:
        job = tpb.TrainingJob(
            name=PREFIX + row.name,
            description=row.display_name,
            labels=row.labels or {},
            project=row.project,
            dataset_version=row.dataset_version,
            target_model=row.target_model,
            priority=row.priority,
            model_version=row.result_version,
            creator=row.creator,
        )
        message_from_dict(row.spec, job.model)
        message_from_dict(row.config, job.training)
        options = row.options or {}
        job.evaluate_after = bool(options.get("evaluate_after", False))
        if "resources" in options:
            message_from_dict(options["resources"], job.resources)
        if "search" in options:
            message_from_dict(options["search"], job.hyperparameter_search)
        if "trial_parameters" in options:
            json_format.ParseDict(options["trial_parameters"], job.trial_parameters)
        job.best_trial = options.get("best_trial", "")
        for checkpoint in options.get("checkpoints", []):
            job.checkpoints.add(
                step=checkpoint["step"],
                epoch=checkpoint["epoch"],
                artifact=common_pb2.Artifact(kind="checkpoint", **checkpoint["artifact"]),
                metrics=checkpoint.get("metrics", {}),
            )
        if row.worker:
            job.workers.append(f"workers/{row.worker}")
        for key, value in sorted((row.metrics or {}).items()):
            job.final_metrics.add(name=key, value=float(value), source="training")
        if row.parent_id is not None:
            parent = session.get(TrainingJob, row.parent_id)
            job.parent_job = PREFIX + parent.name if parent else ""
        job.status.CopyFrom(self._status(row))
        return job

    @staticmethod
    def _status(row: TrainingJob) -> common_pb2.JobStatus:
        options = row.options or {}
        return common_pb2.JobStatus(
            state=common_pb2.JobState.Value(f"JOB_STATE_{row.state}"),
            reason=row.reason,
            progress=common_pb2.Progress(
                completed=int(options.get("completed", 0)),
                total=int(options.get("total", 0)),
                unit=options.get("unit", "steps"),
            ),
            create_time=_ts(row.create_time),
            start_time=_ts(row.start_time),
            end_time=_ts(row.end_time),
            attempt=row.attempt,
        )

    def _row(self, session: Session, name: str, *, lock: bool = False) -> TrainingJob:
        stmt = select(TrainingJob).where(TrainingJob.name == job_id(name))
        if lock:
            stmt = stmt.with_for_update()
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise NotFound(f"{name} does not exist")
        return row

    # -- events ------------------------------------------------------------------------------

    def _add_event(self, session: Session, row: TrainingJob, kind: str, payload: dict) -> int:
        name = PREFIX + row.name
        last = session.scalar(select(func.max(JobEvent.sequence)).where(JobEvent.job == name))
        sequence = (last or 0) + 1
        session.add(
            JobEvent(job=name, sequence=sequence, event_time=utcnow(), kind=kind, payload=payload)
        )
        session.flush()
        return sequence

    def _state_event(self, session: Session, row: TrainingJob) -> None:
        self._add_event(
            session,
            row,
            "state",
            {"state": row.state, "reason": row.reason, "attempt": row.attempt},
        )
        change = events_pb2.JobStateChanged(job=PREFIX + row.name, state=row.state)
        change.reason = row.reason
        change.time.FromDatetime(utcnow())
        add_event(
            session,
            "aimass.training.job.state_changed",
            change,
            subject=PREFIX + row.name,
            source=SOURCE,
        )

    def _retrying(self, work: Any) -> Any:
        """Runs a write; a lost race on a job's next event sequence is simply retried."""
        for attempt in range(5):
            try:
                with self.db.session() as session:
                    return work(session)
            except IntegrityError:
                if attempt == 4:
                    raise
        return None

    def append_events(self, name: str, events: Iterable[tuple[str, dict]]) -> None:
        """Metrics, log lines, checkpoints of a running job, in order."""
        items = list(events)

        def work(session: Session) -> None:
            row = self._row(session, name)
            for kind, payload in items:
                self._add_event(session, row, kind, payload)
                if kind == "metrics" and "completed" in payload:
                    row.options = {**(row.options or {}), "completed": payload["completed"]}

        self._retrying(work)

    def events(self, name: str, after: int, limit: int = 500) -> list[JobEvent]:
        """Events of a job after ``after``, as detached rows (kind, sequence, payload, time)."""
        with self.db.session(read_only=True) as session:
            stmt = (
                select(JobEvent)
                .where(JobEvent.job == name, JobEvent.sequence > after)
                .order_by(JobEvent.sequence)
                .limit(limit)
            )
            return list(session.scalars(stmt))

    # -- create, read, list, cancel ----------------------------------------------------------

    def create(
        self,
        job: tpb.TrainingJob,
        *,
        request_id: str,
        creator: str,
        trials: list[tuple[tpb.TrainingJob, dict[str, Any]]] | None = None,
    ) -> tpb.TrainingJob:
        """Stores a queued job (and its trials) and enqueues it, in one transaction.

        A repeated ``request_id`` returns the job the first call created.
        """
        if request_id:
            with self.db.session(read_only=True) as session:
                existing = session.scalars(
                    select(TrainingJob).where(TrainingJob.request_id == request_id)
                ).one_or_none()
                if existing is not None:
                    return self._to_proto(session, existing)

        def work(session: Session) -> tpb.TrainingJob:
            row = self._insert(session, job, request_id or None, creator, parent=None)
            if trials:
                row.state = "RUNNING"
                row.start_time = utcnow()
                row.options = {**row.options, "total": len(trials), "unit": "trials"}
                self._state_event(session, row)
                for trial, parameters in trials:
                    child = self._insert(session, trial, None, creator, parent=row)
                    child.options = {**child.options, "trial_parameters": parameters}
            return self._to_proto(session, row)

        return self._retrying(work)

    def _insert(
        self,
        session: Session,
        job: tpb.TrainingJob,
        request_id: str | None,
        creator: str,
        parent: TrainingJob | None,
    ) -> TrainingJob:
        options: dict[str, Any] = {"evaluate_after": job.evaluate_after, "unit": "steps"}
        if job.HasField("resources"):
            options["resources"] = message_to_dict(job.resources)
        if job.HasField("hyperparameter_search"):
            options["search"] = message_to_dict(job.hyperparameter_search)
        row = TrainingJob(
            name=uuid.uuid4().hex[:16],
            display_name=job.description,
            project=job.project,
            creator=creator,
            spec=message_to_dict(job.model),
            config=message_to_dict(job.training),
            dataset_version=job.dataset_version,
            target_model=job.target_model,
            labels=dict(job.labels),
            state="QUEUED",
            reason="",
            progress=0.0,
            priority=job.priority,
            attempt=0,
            worker="",
            checkpoint_uri="",
            result_version="",
            metrics={},
            request_id=request_id,
            options=options,
            parent_id=parent.id if parent is not None else None,
        )
        session.add(row)
        session.flush()
        if not job.HasField("hyperparameter_search"):
            self._add_event(session, row, "state", {"state": "QUEUED", "reason": "", "attempt": 0})
            add_event(
                session,
                JOB_TOPIC,
                events_pb2.JobStateChanged(job=PREFIX + row.name, state="QUEUED"),
                subject=PREFIX + row.name,
                source=SOURCE,
            )
        return row

    def get(self, name: str) -> tpb.TrainingJob:
        with self.db.session(read_only=True, resource=name) as session:
            return self._to_proto(session, self._row(session, name))

    def state(self, name: str) -> str:
        with self.db.session(read_only=True) as session:
            return self._row(session, name).state

    def list(
        self, filter_text: str, page_size: int, page_token: str, order_by: str
    ) -> tuple[list[tpb.TrainingJob], str]:
        stmt = select(TrainingJob)
        with self.db.session(read_only=True) as session:
            for key, value in parse_filter(filter_text):
                if key == "parent_job":
                    parent = self._row(session, value, lock=False) if value else None
                    stmt = stmt.where(
                        TrainingJob.parent_id == parent.id
                        if parent
                        else TrainingJob.parent_id.is_(None)
                    )
                elif key.startswith("labels."):
                    continue  # applied below: JSON columns differ between backends
                else:
                    stmt = stmt.where(_FILTER_COLUMNS[key] == value)
            order = order_by.strip().lower() or "create_time desc"
            if order not in ("create_time desc", "create_time", "create_time asc"):
                raise InvalidArgument("order_by", f"unsupported order {order_by!r}")
            descending = order.endswith("desc")
            keys = (
                [TrainingJob.create_time.desc(), TrainingJob.id.desc()]
                if descending
                else [TrainingJob.create_time, TrainingJob.id]
            )
            rows, token = paginate(session, stmt, keys, page_size, page_token)
            labels = [(k[7:], v) for k, v in parse_filter(filter_text) if k.startswith("labels.")]
            rows = [r for r in rows if all((r.labels or {}).get(k) == v for k, v in labels)]
            return [self._to_proto(session, r) for r in rows], token

    def cancel(self, name: str) -> tpb.TrainingJob:
        """QUEUED -> CANCELLED at once; RUNNING -> CANCELLING (the worker stops it)."""

        def work(session: Session) -> tpb.TrainingJob:
            row = self._row(session, name, lock=True)
            self._cancel_row(session, row)
            for child in session.scalars(
                select(TrainingJob).where(TrainingJob.parent_id == row.id)
            ):
                self._cancel_row(session, child)
            return self._to_proto(session, row)

        return self._retrying(work)

    def _cancel_row(self, session: Session, row: TrainingJob) -> None:
        if row.state in TERMINAL or row.state == "CANCELLING":
            return
        has_trials = (row.options or {}).get("unit") == "trials"
        if row.state == "QUEUED" or has_trials:
            row.state, row.end_time = "CANCELLED", utcnow()
            row.reason = "cancelled on request"
        else:
            row.state, row.reason = "CANCELLING", "cancel requested"
        self._state_event(session, row)

    # -- the worker's side ---------------------------------------------------------------------

    def begin_attempt(self, name: str, worker: str) -> tpb.TrainingJob | None:
        """Marks the job RUNNING for this delivery; None when it must not run (ended, cancelled)."""

        def work(session: Session) -> tpb.TrainingJob | None:
            row = self._row(session, name, lock=True)
            if row.state in TERMINAL:
                return None
            if row.state == "CANCELLING":
                row.state, row.end_time, row.reason = "CANCELLED", utcnow(), "cancelled on request"
                self._state_event(session, row)
                return None
            row.state, row.reason = "RUNNING", ""
            row.attempt += 1
            row.worker = worker
            row.heartbeat_time = utcnow()
            row.start_time = row.start_time or utcnow()
            self._state_event(session, row)
            return self._to_proto(session, row)

        return self._retrying(work)

    def checkpoint_uri(self, name: str) -> str:
        with self.db.session(read_only=True) as session:
            return self._row(session, name).checkpoint_uri

    def set_total_steps(self, name: str, total: int) -> None:
        def work(session: Session) -> None:
            row = self._row(session, name)
            row.options = {**(row.options or {}), "total": total, "unit": "steps"}

        self._retrying(work)

    def record_checkpoint(
        self,
        name: str,
        step: int,
        epoch: int,
        artifact: dict[str, Any],
        metrics: dict[str, float],
        keep: int,
    ) -> list[str]:
        """Makes the checkpoint the one to resume from; returns URIs that fell out of ``keep``."""

        def work(session: Session) -> list[str]:
            row = self._row(session, name, lock=True)
            row.checkpoint_uri = artifact["uri"]
            entry = {"step": step, "epoch": epoch, "artifact": artifact, "metrics": metrics}
            kept = [*(row.options or {}).get("checkpoints", []), entry]
            dropped = [c["artifact"]["uri"] for c in kept[:-keep]]
            row.options = {**(row.options or {}), "checkpoints": kept[-keep:], "completed": step}
            self._add_event(session, row, "checkpoint", {"step": step, "epoch": epoch})
            still_used = {c["artifact"]["uri"] for c in kept[-keep:]}
            return [uri for uri in dropped if uri not in still_used]

        return self._retrying(work)

    def heartbeat(self, name: str) -> bool:
        """Records a heartbeat; True when a cancel was asked for."""

        def work(session: Session) -> bool:
            row = self._row(session, name)
            row.heartbeat_time = utcnow()
            return row.state == "CANCELLING"

        return self._retrying(work)

    def finish(
        self,
        name: str,
        state: str,
        *,
        reason: str = "",
        metrics: dict[str, float] | None = None,
        model_version: str = "",
        outputs: dict[str, Any] | None = None,
    ) -> tpb.TrainingJob:
        """Ends the job (SUCCEEDED, FAILED, CANCELLED) with its outbox event, once."""

        def work(session: Session) -> tpb.TrainingJob:
            row = self._row(session, name, lock=True)
            if row.state in TERMINAL:
                return self._to_proto(session, row)
            row.state, row.reason, row.end_time = state, reason, utcnow()
            row.worker = ""
            if metrics is not None:
                row.metrics = {k: float(v) for k, v in metrics.items()}
            if model_version:
                row.result_version = model_version
            if outputs is not None:
                row.options = {**(row.options or {}), "outputs": outputs}
            self._state_event(session, row)
            self._outcome_event(session, row)
            return self._to_proto(session, row)

        return self._retrying(work)

    def _outcome_event(self, session: Session, row: TrainingJob) -> None:
        name = PREFIX + row.name
        if row.state == "SUCCEEDED":
            payload: Any = events_pb2.TrainingJobSucceeded(
                job=name,
                model_version=row.result_version,
                metrics=row.metrics,
                evaluate=bool((row.options or {}).get("evaluate_after")),
            )
            add_event(
                session, "aimass.training.job.succeeded", payload, subject=name, source=SOURCE
            )
        elif row.state == "FAILED":
            payload = events_pb2.TrainingJobFailed(job=name, reason=row.reason)
            add_event(session, "aimass.training.job.failed", payload, subject=name, source=SOURCE)

    # -- searches ----------------------------------------------------------------------------

    def search_outcome(self, trial_name: str) -> dict[str, Any] | None:
        """When every trial of the trial's parent has ended: the parent and its trials' results.

        Returns None while trials are still running, or for a job that is no trial.
        """
        with self.db.session(read_only=True) as session:
            row = self._row(session, trial_name)
            if row.parent_id is None:
                return None
            parent = session.get(TrainingJob, row.parent_id)
            if parent is None or parent.state in TERMINAL:
                return None
            children = list(
                session.scalars(select(TrainingJob).where(TrainingJob.parent_id == parent.id))
            )
            if any(c.state not in TERMINAL for c in children):
                return None
            return {
                "parent": self._to_proto(session, parent),
                "trials": [
                    {
                        "name": PREFIX + c.name,
                        "state": c.state,
                        "metrics": dict(c.metrics or {}),
                        "outputs": (c.options or {}).get("outputs"),
                        "parameters": (c.options or {}).get("trial_parameters", {}),
                    }
                    for c in sorted(children, key=lambda c: c.id)
                ],
            }

    def set_best_trial(self, parent: str, best: str, completed: int) -> None:
        def work(session: Session) -> None:
            row = self._row(session, parent)
            row.options = {**(row.options or {}), "best_trial": best, "completed": completed}

        self._retrying(work)

    # -- workers -----------------------------------------------------------------------------

    def register_worker(self, name: str, host: str, pid: int, capabilities: dict) -> None:
        def work(session: Session) -> None:
            row = session.scalars(select(Worker).where(Worker.name == name)).one_or_none()
            if row is None:
                row = Worker(name=name, kind="training")
                session.add(row)
            row.host, row.pid, row.capabilities = host, pid, capabilities
            row.state, row.current_job, row.heartbeat_time = "IDLE", "", utcnow()

        self._retrying(work)

    def worker_state(self, name: str, state: str, current_job: str = "") -> None:
        def work(session: Session) -> None:
            row = session.scalars(select(Worker).where(Worker.name == name)).one_or_none()
            if row is not None:
                row.state, row.current_job, row.heartbeat_time = state, current_job, utcnow()

        self._retrying(work)

    def list_workers(self, page_size: int, page_token: str) -> tuple[list[tpb.Worker], str]:
        with self.db.session(read_only=True) as session:
            stmt = select(Worker).where(Worker.kind == "training")
            rows, token = paginate(session, stmt, [Worker.name], page_size, page_token)
            workers = []
            for row in rows:
                worker = tpb.Worker(
                    name=f"workers/{row.name}",
                    host=row.host,
                    state=tpb.WorkerState.Value(
                        f"WORKER_STATE_{'LOST' if row.state == 'GONE' else row.state}"
                    ),
                    current_job=row.current_job,
                    heartbeat_time=_ts(row.heartbeat_time),
                    register_time=_ts(row.create_time),
                    software_version=str((row.capabilities or {}).get("version", "")),
                )
                message_from_dict((row.capabilities or {}).get("resources", {}), worker.resources)
                workers.append(worker)
            return workers, token


def parse_filter(text: str) -> list[tuple[str, str]]:
    """``state = RUNNING AND target_model = "models/x"`` -> [("state", "RUNNING"), ...]."""
    terms: list[tuple[str, str]] = []
    if not text.strip():
        return terms
    for part in text.replace(" and ", " AND ").split(" AND "):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().strip('"').strip("'")
        allowed = key in _FILTER_COLUMNS or key == "parent_job" or key.startswith("labels.")
        if not sep or not allowed:
            raise InvalidArgument(
                "filter",
                f"cannot filter on {part.strip()!r}; use state, dataset_version, target_model, "
                "model_version, parent_job, project or labels.<key> with '='",
            )
        if key == "state":
            value = value.upper().removeprefix("JOB_STATE_")
        terms.append((key, value))
    return terms


def struct_of(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out
