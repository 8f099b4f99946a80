"""Monitors, their alerts and the captured-prediction files they read: rows <-> protos.

Tables (aimass.core.db.models): ``monitors``, ``monitor_alerts`` and
``monitored_batches`` (the files routing announced with
``aimass.routing.predictions.logged``; a redelivered event adds nothing).

A scheduled run claims its monitor with a compare-and-swap on
``next_run_time``, so two evaluation processes never run one monitor twice for
the same slot. Runs change only output fields (report, firing rules, next run
time) with Core updates that keep the etag: the etag moves with what callers
change, so a Get -> Update is not refused because the schedule ran in between.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.columns import require_etag
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import AlreadyExists, InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.evaluation.store import filter_clauses, ts
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.events.v1 import events_pb2

TOPIC_ALERT_FIRED = "aimass.monitoring.alert.fired"
DEFAULT_INTERVAL_S = 300.0
DEFAULT_WINDOW_S = 3600.0
DEFAULT_BINS = 10
DEFAULT_MIN_ROWS = 100
MAX_RULES = 50
_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
_DEPLOYMENT = re.compile(r"^deployments/[a-z][a-z0-9-]{0,62}\Z")


def check_id(value: str, field: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(field, f"{value!r} must match [a-z][a-z0-9-]{{0,62}}")
    return value


def parse_monitor(name: str, field: str = "name") -> str:
    monitor_id = name.removeprefix("monitors/")
    if not name.startswith("monitors/") or not _ID.match(monitor_id):
        raise InvalidArgument(field, f"{name!r} is not monitors/{{monitor}}")
    return monitor_id


def _seconds(value: Duration) -> float:
    return value.seconds + value.nanos / 1e9


def monitor_config(monitor: pb.Monitor, field: str = "monitor") -> dict[str, Any]:
    """The checked settings of a monitor as stored; InvalidArgument names the bad field."""
    if not _DEPLOYMENT.match(monitor.deployment):
        raise InvalidArgument(
            f"{field}.deployment", f"{monitor.deployment!r} is not deployments/{{deployment}}"
        )
    interval = _seconds(monitor.interval) if monitor.HasField("interval") else DEFAULT_INTERVAL_S
    if interval < 1.0:
        raise InvalidArgument(f"{field}.interval", f"{interval} s is shorter than 1 s")
    window = _seconds(monitor.window) if monitor.HasField("window") else DEFAULT_WINDOW_S
    if window <= 0:
        raise InvalidArgument(f"{field}.window", "must be positive")
    if monitor.bins and not 2 <= monitor.bins <= 100:
        raise InvalidArgument(f"{field}.bins", f"{monitor.bins} is not 0 or 2-100")
    if len(monitor.rules) > MAX_RULES:
        raise InvalidArgument(f"{field}.rules", f"has {len(monitor.rules)}; at most {MAX_RULES}")
    rules, seen = [], set()
    for i, rule in enumerate(monitor.rules):
        where = f"{field}.rules[{i}]"
        check_id(rule.name, f"{where}.name")
        if rule.name in seen:
            raise InvalidArgument(f"{where}.name", f"{rule.name!r} is given twice")
        seen.add(rule.name)
        if (
            rule.metric == pb.MONITOR_METRIC_UNSPECIFIED
            or rule.metric not in pb.MonitorMetric.values()
        ):
            raise InvalidArgument(f"{where}.metric", "choose a MonitorMetric")
        if not math.isfinite(rule.threshold) or rule.threshold < 0:
            raise InvalidArgument(f"{where}.threshold", f"{rule.threshold} is not a number >= 0")
        if rule.min_rows < 0:
            raise InvalidArgument(f"{where}.min_rows", "must be 0 or more")
        rules.append(
            {
                "name": rule.name,
                "metric": pb.MonitorMetric.Name(rule.metric),
                "threshold": rule.threshold,
                "min_rows": rule.min_rows or DEFAULT_MIN_ROWS,
            }
        )
    return {
        "interval_s": interval,
        "window_s": window,
        "bins": monitor.bins or DEFAULT_BINS,
        "rules": rules,
    }


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


def _monitor_project(session: Session, monitor: pb.Monitor) -> str:
    """The project of a new monitor: its deployment's when that exists (NotFound naming
    ``monitor.deployment`` when the caller may not see it), else the caller's."""
    project = scope.stamp_project(monitor.project, "monitor.project")
    deployment_project = session.scalar(
        select(m.Deployment.project).where(
            m.Deployment.name == monitor.deployment.removeprefix("deployments/")
        )
    )
    if deployment_project is None:
        return project
    scope.check_visible(deployment_project, f"monitor.deployment: {monitor.deployment}")
    if project and project != deployment_project:
        raise InvalidArgument(
            "monitor.project",
            f"must be {deployment_project!r}, the project of {monitor.deployment}",
        )
    return deployment_project


def monitor_to_proto(row: m.Monitor) -> pb.Monitor:
    config = row.config
    monitor = pb.Monitor(
        name=f"monitors/{row.name}",
        deployment=row.deployment,
        project=row.project,
        description=row.description,
        interval=_duration(config["interval_s"]),
        window=_duration(config["window_s"]),
        bins=config["bins"],
        paused=row.paused,
        labels=row.labels,
        firing_rules=row.firing,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=row.etag,
    )
    for rule in config["rules"]:
        monitor.rules.add(
            name=rule["name"],
            metric=pb.MonitorMetric.Value(rule["metric"]),
            threshold=rule["threshold"],
            min_rows=rule["min_rows"],
        )
    if row.next_run_time is not None and not row.paused:
        monitor.next_run_time.CopyFrom(ts(row.next_run_time))
    if row.last_report:
        json_format.ParseDict(row.last_report, monitor.last_report)
    return monitor


def alert_to_proto(row: m.MonitorAlert, monitor: str) -> pb.Alert:
    return pb.Alert(
        name=f"monitors/{monitor}/alerts/{row.name}",
        rule=row.rule,
        metric=pb.MonitorMetric.Value(row.metric),
        value=row.value,
        threshold=row.threshold,
        feature=row.feature,
        fire_time=ts(row.fire_time),
    )


@dataclass(frozen=True)
class Batch:
    uri: str
    rows: int
    dropped: int
    start_time: datetime
    end_time: datetime


@dataclass(frozen=True)
class FiredAlert:
    rule: str
    metric: str
    value: float
    threshold: float
    feature: str


MUTABLE = ("description", "labels", "interval", "window", "bins", "rules", "paused")


class MonitorStore:
    """Every database access of monitoring, synchronous (callers use asyncio.to_thread)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def _get(self, session: Session, monitor_id: str) -> m.Monitor:
        row = session.scalar(select(m.Monitor).where(m.Monitor.name == monitor_id))
        if row is None:
            raise NotFound(f"monitors/{monitor_id} not found")
        # Another project's monitor answers as a missing one (the schedule is unscoped).
        scope.check_visible(row.project, f"monitors/{monitor_id}")
        return row

    def create(self, monitor_id: str, monitor: pb.Monitor, creator: str) -> pb.Monitor:
        config = monitor_config(monitor)
        now = datetime.now(UTC)
        with self.database.session(resource=f"monitors/{monitor_id}") as session:
            if session.scalar(select(m.Monitor.id).where(m.Monitor.name == monitor_id)):
                raise AlreadyExists(f"monitors/{monitor_id} already exists")
            row = m.Monitor(
                name=monitor_id,
                deployment=monitor.deployment,
                project=_monitor_project(session, monitor),
                description=monitor.description,
                labels=dict(monitor.labels),
                config=config,
                paused=monitor.paused,
                next_run_time=now + timedelta(seconds=config["interval_s"]),
                last_report={},
                firing=[],
                creator=creator,
            )
            session.add(row)
            session.flush()
            return monitor_to_proto(row)

    def get(self, monitor_id: str) -> pb.Monitor:
        with self.database.session(read_only=True) as session:
            return monitor_to_proto(self._get(session, monitor_id))

    def list(self, page_size: int, page_token: str, text: str) -> tuple[list[pb.Monitor], str]:
        clauses = filter_clauses(text, {"deployment": m.Monitor.deployment})
        with self.database.session(read_only=True) as session:
            stmt = select(m.Monitor).where(*clauses, *scope.project_filter(m.Monitor.project))
            rows, token = paginate(session, stmt, [m.Monitor.id], page_size, page_token)
            return [monitor_to_proto(r) for r in rows], token

    def update(self, monitor: pb.Monitor, paths: list[str]) -> pb.Monitor:
        monitor_id = parse_monitor(monitor.name, "monitor.name")
        with self.database.session(resource=monitor.name) as session:
            row = self._get(session, monitor_id)
            require_etag(monitor.name, row.etag, monitor.etag)
            merged = monitor_to_proto(row)
            for path in paths:
                merged.ClearField(path)  # type: ignore[arg-type]
                value = getattr(monitor, path)
                if path == "rules":
                    merged.rules.extend(value)
                elif path == "labels":
                    merged.labels.update(value)
                elif path in ("interval", "window"):
                    if monitor.HasField(path):
                        getattr(merged, path).CopyFrom(value)
                else:
                    setattr(merged, path, value)
            config = monitor_config(merged)
            row.description = merged.description
            row.labels = dict(merged.labels)
            row.config = config
            if (row.paused and not merged.paused) or "interval" in paths:
                row.next_run_time = datetime.now(UTC) + timedelta(seconds=config["interval_s"])
            row.paused = merged.paused
            if "rules" in paths:
                names = {r["name"] for r in config["rules"]}
                row.firing = [r for r in row.firing if r in names]
            session.flush()
            return monitor_to_proto(row)

    def delete(self, monitor_id: str, etag: str) -> None:
        with self.database.session(resource=f"monitors/{monitor_id}") as session:
            row = self._get(session, monitor_id)
            require_etag(f"monitors/{monitor_id}", row.etag, etag)
            session.execute(delete(m.MonitorAlert).where(m.MonitorAlert.monitor_id == row.id))
            session.delete(row)

    # ---- schedule ---------------------------------------------------------------------

    def claim_due(self, now: datetime) -> list[str]:
        """Monitors whose run is due, each moved to its next slot (compare-and-swap)."""
        claimed = []
        with self.database.session() as session:
            due = session.execute(
                select(m.Monitor.id, m.Monitor.name, m.Monitor.next_run_time, m.Monitor.config)
                .where(m.Monitor.paused.is_(False), m.Monitor.next_run_time <= now)
                .limit(100)
            ).all()
            for row_id, name, slot, config in due:
                result = session.execute(
                    update(m.Monitor)
                    .where(m.Monitor.id == row_id, m.Monitor.next_run_time == slot)
                    .values(next_run_time=now + timedelta(seconds=config["interval_s"]))
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(name)
        return claimed

    def save_run(
        self, monitor_id: str, report: pb.MonitorReport, firing: list[str], fired: list[FiredAlert]
    ) -> list[pb.Alert]:
        """Stores the report and firing rules; new alerts and their events in one transaction."""
        now = datetime.now(UTC)
        alerts = []
        with self.database.session() as session:
            row = self._get(session, monitor_id)
            session.execute(
                update(m.Monitor)
                .where(m.Monitor.id == row.id)
                .values(last_report=json_format.MessageToDict(report), firing=firing)
            )
            for alert in fired:
                alert_row = m.MonitorAlert(
                    monitor_id=row.id,
                    name=uuid.uuid4().hex,
                    rule=alert.rule,
                    metric=alert.metric,
                    value=alert.value,
                    threshold=alert.threshold,
                    feature=alert.feature,
                    fire_time=now,
                )
                session.add(alert_row)
                proto = alert_to_proto(alert_row, monitor_id)
                alerts.append(proto)
                add_event(
                    session,
                    TOPIC_ALERT_FIRED,
                    events_pb2.AlertFired(
                        alert=proto.name,
                        monitor=f"monitors/{monitor_id}",
                        deployment=row.deployment,
                        rule=alert.rule,
                        metric=alert.metric.removeprefix("MONITOR_METRIC_"),
                        value=alert.value,
                        threshold=alert.threshold,
                        feature=alert.feature,
                        time=ts(now),
                    ),
                    subject=proto.name,
                    source="evaluation",
                )
        return alerts

    def firing(self, monitor_id: str) -> list[str]:
        with self.database.session(read_only=True) as session:
            return list(self._get(session, monitor_id).firing)

    def list_alerts(
        self, parent: str, page_size: int, page_token: str
    ) -> tuple[list[pb.Alert], str]:
        with self.database.session(read_only=True) as session:
            stmt = (
                select(m.MonitorAlert, m.Monitor.name)
                .join(m.Monitor, m.Monitor.id == m.MonitorAlert.monitor_id)
                .where(*scope.project_filter(m.Monitor.project))
            )
            if parent != "monitors/-":
                monitor_id = parse_monitor(parent, "parent")
                self._get(session, monitor_id)
                stmt = stmt.where(m.Monitor.name == monitor_id)
            rows, token = paginate(
                session,
                stmt,
                [m.MonitorAlert.fire_time.desc(), m.MonitorAlert.id.desc()],
                page_size,
                page_token,
            )
            return [alert_to_proto(alert, name) for alert, name in rows], token

    # ---- captured files ---------------------------------------------------------------

    def record_batch(self, event_id: str, logged: events_pb2.PredictionsLogged) -> bool:
        """Remembers an announced file; False when this event was recorded before."""
        with self.database.session(read_only=True) as session:
            if session.scalar(
                select(m.MonitoredBatch.id).where(m.MonitoredBatch.event_id == event_id)
            ):
                return False
        try:
            with self.database.session() as session:
                session.add(
                    m.MonitoredBatch(
                        event_id=event_id,
                        deployment=logged.deployment,
                        artifact_uri=logged.artifact_uri,
                        rows=logged.rows,
                        start_time=logged.start_time.ToDatetime(UTC),
                        end_time=logged.end_time.ToDatetime(UTC),
                        dropped=logged.dropped,
                    )
                )
        except AlreadyExists:  # a concurrent delivery of the same event won
            return False
        return True

    def batches(self, deployment: str, start: datetime, end: datetime) -> list[Batch]:
        """Files of ``deployment`` holding calls in [start, end], oldest first."""
        with self.database.session(read_only=True) as session:
            rows = session.scalars(
                select(m.MonitoredBatch)
                .where(
                    m.MonitoredBatch.deployment == deployment,
                    m.MonitoredBatch.end_time >= start,
                    m.MonitoredBatch.start_time <= end,
                )
                .order_by(m.MonitoredBatch.end_time, m.MonitoredBatch.id)
            ).all()
            return [
                Batch(r.artifact_uri, r.rows, r.dropped, r.start_time, r.end_time) for r in rows
            ]
