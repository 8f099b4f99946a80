"""The training service's tables (training_jobs, job_events, workers) behind one store.

Only the training service opens it: workers report state, metrics, logs
and checkpoints through the service's internal RPCs (ClaimTrainingJob,
ReportTrainingJobProgress, CompleteTrainingJob, RegisterWorker) and never
see the database. Every state change writes its job
event and, where one is due, its outbox event in the same transaction:
enqueueing a job (``aimassjobs.training``) and ``aimass.training.job.*``.
ORM rows never leave the store: callers get ``TrainingJob`` protos.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format, struct_pb2
from sqlalchemy import String, cast, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.core.auth import scope
from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.models import JobEvent, RegisteredModel, TrainingJob, Worker
from aimass.core.db.pagination import paginate
from aimass.core.errors import Aborted, InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.core.metrics import count_job_end
from aimass.core.protodict import message_from_dict, message_to_dict
from aimass.core.telemetry import inject_headers
from aimass.events.v1 import events_pb2
from aimass.training import scheduling
from aimass.training.v1 import training_pb2 as tpb

SOURCE = "training"
JOB_TOPIC = "aimassjobs.training"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
DEFAULT_KEEP_CHECKPOINTS = 3
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


# order_by values of ListTrainingJobs -> the paging keys (the last one unique).
_ORDERS: dict[str, Callable[[], list[Any]]] = {
    "create_time desc": lambda: [TrainingJob.create_time.desc(), TrainingJob.id.desc()],
    "create_time": lambda: [TrainingJob.create_time, TrainingJob.id],
    "create_time asc": lambda: [TrainingJob.create_time, TrainingJob.id],
    # The order the scheduler admits queued jobs in: highest priority, then oldest.
    "priority desc": lambda: [TrainingJob.priority.desc(), TrainingJob.create_time, TrainingJob.id],
}


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
        for warm in ("init_from", "distillation"):
            if warm in options:
                message_from_dict(options[warm], getattr(job, warm))
        for kind, stored in sorted((options.get("outputs") or {}).items()):
            if kind in ("onnx", "state_dict") and isinstance(stored, dict):
                job.output_artifacts.add(kind=kind, **stored)
        for checkpoint in options.get("checkpoints", []):
            job.checkpoints.add(
                step=checkpoint["step"],
                epoch=checkpoint["epoch"],
                artifact=common_pb2.Artifact(kind="checkpoint", **checkpoint["artifact"]),
                metrics=checkpoint.get("metrics", {}),
            )
        if row.worker:
            job.workers.append(f"workers/{row.worker}")
        rendezvous = options.get("rendezvous") or {}
        if row.state == "RUNNING" and rendezvous.get("attempt") == row.attempt:
            job.rendezvous_address = rendezvous.get("address", "")
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
        scope.check_visible(row.project, name)
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

    def model_project(self, model: str) -> str | None:
        """The project of registered model ``models/{id}``; None when it does not exist.

        Read here rather than through the registry's API: the caller's own credential
        cannot tell another project's model from a missing one, and the check must."""
        with self.db.session(read_only=True) as session:
            return session.scalar(
                select(RegisteredModel.project).where(
                    RegisteredModel.name == model.removeprefix("models/")
                )
            )

    def create(
        self,
        job: tpb.TrainingJob,
        *,
        request_id: str,
        creator: str,
        trials: list[tuple[tpb.TrainingJob, dict[str, Any]]] | None = None,
    ) -> tpb.TrainingJob:
        """Stores a queued job (and its trials) and enqueues it, in one transaction.

        A repeated ``request_id`` returns the job the first call created; NotFound when
        that job is another project's (request ids are unique across projects, and a
        replay must not hand out another project's job).
        """
        if request_id:
            with self.db.session(read_only=True) as session:
                existing = session.scalars(
                    select(TrainingJob).where(TrainingJob.request_id == request_id)
                ).one_or_none()
                if existing is not None:
                    scope.check_visible(existing.project, f"request_id {request_id!r}")
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
        # The scheduler publishes the job later, from its own loop: the creating request's
        # trace context is kept so the worker's span continues that trace.
        if trace_headers := inject_headers():
            options["trace"] = trace_headers
        if job.HasField("resources"):
            options["resources"] = message_to_dict(job.resources)
        if job.HasField("hyperparameter_search"):
            options["search"] = message_to_dict(job.hyperparameter_search)
        for warm in ("init_from", "distillation"):  # warm starts (aimass.training.warmstart)
            if job.HasField(warm):
                options[warm] = message_to_dict(getattr(job, warm))
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
            # Not published yet: the scheduler (``schedule``) releases it to a fitting worker.
            self._add_event(session, row, "state", {"state": "QUEUED", "reason": "", "attempt": 0})
        return row

    @staticmethod
    def _enqueue_hosts(
        session: Session,
        row: TrainingJob,
        ranks: Iterable[int],
        hosts: int,
        attempt: int,
        classes: list[str],
    ) -> None:
        """One work-queue task per host of a job across several hosts, for one attempt.

        Host ``rank``'s task goes on the subject of ``classes[rank]``, the resource class
        of the worker the scheduler matched with that host.
        """
        for rank in ranks:
            task = tpb.TrainingHostTask(
                job=PREFIX + row.name, host_rank=rank, hosts=hosts, attempt=attempt
            )
            topic = scheduling.class_topic(JOB_TOPIC, classes[rank])
            trace = (row.options or {}).get("trace")
            add_event(session, topic, task, subject=PREFIX + row.name, source=SOURCE, trace=trace)

    def get(self, name: str) -> tpb.TrainingJob:
        with self.db.session(read_only=True, resource=name) as session:
            return self._to_proto(session, self._row(session, name))

    def state(self, name: str) -> str:
        with self.db.session(read_only=True) as session:
            return self._row(session, name).state

    def list(
        self, filter_text: str, page_size: int, page_token: str, order_by: str
    ) -> tuple[list[tpb.TrainingJob], str]:
        stmt = select(TrainingJob).where(*scope.project_filter(TrainingJob.project))
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
            order = " ".join(order_by.lower().split()) or "create_time desc"
            if order not in _ORDERS:
                raise InvalidArgument(
                    "order_by", f"unsupported order {order_by!r}; use one of {sorted(_ORDERS)}"
                )
            keys = _ORDERS[order]()
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

    # -- the worker's side (through the internal RPCs) ------------------------------------------

    def claim(
        self, name: str, worker: str, host_rank: int = 0, address: str = "", attempt: int = 0
    ) -> tpb.TrainingJob:
        """Marks the job RUNNING for a new attempt of ``worker``; returns it as it is now.

        An ended job is returned unchanged and a CANCELLING one becomes CANCELLED: the
        worker runs the job only when the state it gets back is RUNNING. Across several
        hosts, host 0 starts the attempt (recording its rendezvous address, and queueing
        the other hosts' tasks again when it is a retry); the other hosts only read it.
        """
        if host_rank > 0:
            return self.get(name)

        def work(session: Session) -> tpb.TrainingJob:
            row = self._row(session, name, lock=True)
            if row.state in TERMINAL:
                return self._to_proto(session, row)
            if row.state == "CANCELLING":
                row.state, row.end_time, row.reason = "CANCELLED", utcnow(), "cancelled on request"
                self._state_event(session, row)
                self._release_worker(session, row.worker)
                return self._to_proto(session, row)
            row.state, row.reason = "RUNNING", ""
            row.attempt += 1
            row.worker = worker
            row.heartbeat_time = utcnow()
            row.start_time = row.start_time or utcnow()
            self._state_event(session, row)
            self._set_worker(session, worker, "BUSY", PREFIX + row.name)
            hosts = int((row.options or {}).get("resources", {}).get("hosts", 0) or 0)
            if hosts > 1:
                rendezvous = {"attempt": row.attempt, "address": address}
                row.options = {**(row.options or {}), "rendezvous": rendezvous}
                if row.attempt > 1:  # the other hosts' tasks of attempt 1 were used up
                    classes = (row.options or {}).get("release", {}).get("classes", [])
                    self._enqueue_hosts(session, row, range(1, hosts), hosts, row.attempt, classes)
            return self._to_proto(session, row)

        return self._retrying(work)

    @staticmethod
    def _check_attempt(row: TrainingJob, attempt: int) -> None:
        # A worker presumed dead (its job redelivered) must not write over the new attempt.
        if attempt and attempt != row.attempt:
            raise Aborted(
                f"{PREFIX}{row.name}: attempt {attempt} was superseded by attempt {row.attempt}"
            )

    def report(
        self, name: str, attempt: int, records: list[tuple[str, dict]]
    ) -> tuple[bool, list[str]]:
        """Records metrics, log lines and checkpoints of a running attempt, in order.

        Also the attempt's heartbeat. Returns (cancel requested, checkpoint URIs that fell
        out of ``training.keep_checkpoints`` and may be deleted from the artifact store).
        """

        def work(session: Session) -> tuple[bool, list[str]]:
            row = self._row(session, name, lock=any(k == "checkpoint" for k, _ in records))
            self._check_attempt(row, attempt)
            row.heartbeat_time = utcnow()
            dropped: list[str] = []
            sequence = self._last_sequence(session, row)
            for kind, payload in records:
                if kind == "checkpoint":
                    dropped += self._record_checkpoint(row, payload)
                    payload = {"step": payload["step"], "epoch": payload["epoch"]}
                elif kind == "metrics" and "completed" in payload:
                    progress = {"completed": payload["completed"]}
                    if payload.get("total"):
                        progress["total"] = payload["total"]
                    row.options = {**(row.options or {}), **progress}
                sequence += 1
                session.add(
                    JobEvent(
                        job=PREFIX + row.name,
                        sequence=sequence,
                        event_time=utcnow(),
                        kind=kind,
                        payload=payload,
                    )
                )
            session.flush()
            return row.state == "CANCELLING", dropped

        return self._retrying(work)

    @staticmethod
    def _last_sequence(session: Session, row: TrainingJob) -> int:
        name = PREFIX + row.name
        return session.scalar(select(func.max(JobEvent.sequence)).where(JobEvent.job == name)) or 0

    @staticmethod
    def _record_checkpoint(row: TrainingJob, entry: dict[str, Any]) -> list[str]:
        """Makes the checkpoint the resume point; returns URIs that fell out of ``keep``."""
        keep = int((row.config or {}).get("keep_checkpoints", 0) or 0) or DEFAULT_KEEP_CHECKPOINTS
        row.checkpoint_uri = entry["artifact"]["uri"]
        kept = [*(row.options or {}).get("checkpoints", []), entry]
        row.options = {
            **(row.options or {}),
            "checkpoints": kept[-keep:],
            "completed": entry["step"],
        }
        still_used = {c["artifact"]["uri"] for c in kept[-keep:]}
        return [
            c["artifact"]["uri"] for c in kept[:-keep] if c["artifact"]["uri"] not in still_used
        ]

    def checkpoints_in_use(self, uris: list[str]) -> set[str]:
        """Those of ``uris`` still listed by some job (identical checkpoints share a URI)."""
        if not uris:
            return set()
        with self.db.session(read_only=True) as session:
            used = set()
            for uri in uris:
                stmt = select(TrainingJob.id).where(
                    cast(TrainingJob.options, String).contains(uri)
                    | (TrainingJob.checkpoint_uri == uri)
                )
                if session.scalars(stmt.limit(1)).first() is not None:
                    used.add(uri)
            return used

    def finish(
        self,
        name: str,
        state: str,
        *,
        reason: str = "",
        metrics: dict[str, float] | None = None,
        model_version: str = "",
        outputs: dict[str, Any] | None = None,
        attempt: int = 0,
        best_trial: str = "",
        trials_completed: int = 0,
    ) -> tpb.TrainingJob:
        """Ends the job (SUCCEEDED, FAILED, CANCELLED) with its outbox event, once."""

        def work(session: Session) -> tpb.TrainingJob:
            row = self._row(session, name, lock=True)
            if row.state in TERMINAL:
                return self._to_proto(session, row)
            self._check_attempt(row, attempt)
            self._release_worker(session, row.worker)
            row.state, row.reason, row.end_time = state, reason, utcnow()
            count_job_end(row, "training", state)
            row.worker = ""
            if metrics is not None:
                row.metrics = {k: float(v) for k, v in metrics.items()}
            if model_version:
                row.result_version = model_version
            if outputs is not None:
                row.options = {**(row.options or {}), "outputs": outputs}
            if best_trial:
                row.options = {
                    **(row.options or {}),
                    "best_trial": best_trial,
                    "completed": trials_completed,
                }
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

    # -- admission (aimass.training.scheduling) ------------------------------------------------

    def schedule(self, config: scheduling.SchedulingConfig) -> int:
        """One admission pass: releases QUEUED jobs to free fitting workers; returns how many.

        A released job is published on its matched workers' class subjects and marked
        ``options.release`` (it stays QUEUED until a worker claims it, and holds a worker of
        that class meanwhile). A job that stays QUEUED gets the reason it waits.
        """

        def work(session: Session) -> int:
            free = self._free_workers(session, config.worker_stale_s)
            admitted = self._admitted(session)
            queued = session.scalars(
                select(TrainingJob)
                .where(TrainingJob.state == "QUEUED")
                .order_by(TrainingJob.priority.desc(), TrainingJob.create_time, TrainingJob.id)
            )
            rows: dict[int, TrainingJob] = {}
            candidates: list[scheduling.Candidate] = []
            parallel: dict[int, int] = {}
            for row in queued:
                release = (row.options or {}).get("release")
                if release:  # released, not claimed yet: its workers are promised
                    free = scheduling.take_reserved(free, release.get("classes", []))
                    self._count_admitted(admitted, row)
                    continue
                rows[row.id] = row
                candidates.append(self._candidate(session, row, parallel))
            if not candidates:
                return 0
            decision = scheduling.plan(
                candidates, free, admitted, config.quotas, config.default_quota
            )
            for candidate, workers in decision.releases:
                self._release(session, rows[candidate.key], workers)
            for key, reason in decision.waiting.items():
                if rows[key].reason != reason:
                    rows[key].reason = reason
            return len(decision.releases)

        return self._retrying(work)

    @staticmethod
    def _free_workers(session: Session, stale_s: float) -> list[scheduling.FreeWorker]:
        """Idle workers heard from within ``stale_s`` that declared a resource class."""
        cutoff = utcnow() - timedelta(seconds=stale_s)
        stmt = (
            select(Worker)
            .where(
                Worker.kind == "training",
                Worker.state == "IDLE",
                Worker.heartbeat_time >= cutoff,
            )
            .order_by(Worker.name)
            .with_for_update()  # serializes passes of several service replicas (PostgreSQL)
        )
        free = []
        for row in session.scalars(stmt):
            declared = scheduling.declared_offer(row.capabilities or {})
            if declared is not None:
                free.append(scheduling.FreeWorker(row.name, *declared))
        return free

    @staticmethod
    def _count_admitted(admitted: scheduling.Admitted, row: TrainingJob) -> None:
        admitted.by_project[row.project] += 1
        if row.parent_id is not None:
            admitted.by_parent[row.parent_id] += 1

    def _admitted(self, session: Session) -> scheduling.Admitted:
        """Running jobs, by project and by search (search parents themselves excluded)."""
        admitted = scheduling.Admitted()
        running = session.scalars(
            select(TrainingJob).where(TrainingJob.state.in_(("RUNNING", "CANCELLING")))
        )
        for row in running:
            if (row.options or {}).get("unit") != "trials":
                self._count_admitted(admitted, row)
        return admitted

    @staticmethod
    def _candidate(
        session: Session, row: TrainingJob, parallel: dict[int, int]
    ) -> scheduling.Candidate:
        options = row.options or {}
        request = tpb.Resources()
        message_from_dict(options.get("resources", {}), request)
        if row.parent_id is not None and row.parent_id not in parallel:
            parent = session.get(TrainingJob, row.parent_id)
            search = (parent.options or {}).get("search", {}) if parent else {}
            parallel[row.parent_id] = int(search.get("max_parallel_trials", 0) or 0)
        return scheduling.Candidate(
            key=row.id,
            project=row.project,
            request=request,
            parent=row.parent_id,
            max_parallel=parallel.get(row.parent_id, 0) if row.parent_id is not None else 0,
        )

    def _release(
        self, session: Session, row: TrainingJob, workers: list[scheduling.FreeWorker]
    ) -> None:
        """Publishes the job on the class subject of each matched worker (one per host)."""
        classes = [w.resource_class for w in workers]
        release = {"classes": classes, "workers": [w.name for w in workers]}
        row.options = {**(row.options or {}), "release": release}
        row.reason = ""
        if len(workers) == 1:
            add_event(
                session,
                scheduling.class_topic(JOB_TOPIC, classes[0]),
                events_pb2.JobStateChanged(job=PREFIX + row.name, state="QUEUED"),
                subject=PREFIX + row.name,
                source=SOURCE,
                trace=(row.options or {}).get("trace"),
            )
        else:
            self._enqueue_hosts(session, row, range(len(workers)), len(workers), 1, classes)

    def worker_offers(self, stale_s: float) -> list[tuple[str, tpb.Resources]]:
        """(name, offer) of the workers that count at create time: registered with a resource
        class, not gone, and busy or heard from within ``stale_s``."""
        cutoff = utcnow() - timedelta(seconds=stale_s)
        with self.db.session(read_only=True) as session:
            stmt = select(Worker).where(Worker.kind == "training", Worker.state != "GONE")
            offers = []
            for row in session.scalars(stmt.order_by(Worker.name)):
                declared = scheduling.declared_offer(row.capabilities or {})
                fresh = row.heartbeat_time is not None and row.heartbeat_time >= cutoff
                if declared is not None and (row.state == "BUSY" or fresh):
                    offers.append((f"workers/{row.name}", declared[1]))
            return offers

    # -- workers -----------------------------------------------------------------------------

    def register_worker(
        self, name: str, host: str, pid: int, capabilities: dict, state: str, current_job: str
    ) -> tpb.Worker:
        """Registers the worker or records its state (IDLE, BUSY, GONE)."""
        scheduling.check_declared(capabilities)

        def work(session: Session) -> tpb.Worker:
            row = session.scalars(select(Worker).where(Worker.name == name)).one_or_none()
            if row is None:
                row = Worker(name=name, kind="training", host=host, pid=pid, capabilities={})
                session.add(row)
            if host:
                row.host, row.pid = host, pid
            if capabilities:
                row.capabilities = capabilities
            row.state, row.current_job, row.heartbeat_time = state, current_job, utcnow()
            session.flush()
            return self._worker_proto(row)

        return self._retrying(work)

    @staticmethod
    def _set_worker(session: Session, name: str, state: str, current_job: str) -> None:
        row = session.scalars(select(Worker).where(Worker.name == name)).one_or_none()
        if row is not None:
            row.state, row.current_job, row.heartbeat_time = state, current_job, utcnow()

    def _release_worker(self, session: Session, name: str) -> None:
        if name:
            self._set_worker(session, name, "IDLE", "")

    def list_workers(self, page_size: int, page_token: str) -> tuple[list[tpb.Worker], str]:
        with self.db.session(read_only=True) as session:
            stmt = select(Worker).where(Worker.kind == "training")
            rows, token = paginate(session, stmt, [Worker.name], page_size, page_token)
            return [self._worker_proto(row) for row in rows], token

    @staticmethod
    def _worker_proto(row: Worker) -> tpb.Worker:
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
            resource_class=str((row.capabilities or {}).get("resource_class", "")),
        )
        message_from_dict((row.capabilities or {}).get("resources", {}), worker.resources)
        return worker


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


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain values, with whole numbers as ints (Struct has only doubles).

    Outputs travel from workers as Structs; sizes, shapes and counts must come back as
    the ints they were (an artifact size of 1234.0 is not a valid int64 field).
    """

    def plain(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(json_format.MessageToDict(struct))


def struct_of(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out
