"""Rows of the evaluations, benchmarks and job_events tables <-> protos.

ORM rows never leave this module's callers' sessions: the servicer and the
runner turn them into protos here. The request as asked is kept in
``config``; what came out in ``results`` (NaN and infinities stored as null,
since PostgreSQL's JSONB has no NaN).
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.errors import InvalidArgument, NotFound
from aimass.core.metrics import count_job_end
from aimass.evaluation.v1 import evaluation_pb2 as pb

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
SPLIT_NAMES = {
    common_pb2.DATASET_SPLIT_UNSPECIFIED: "test",
    common_pb2.DATASET_SPLIT_TRAIN: "train",
    common_pb2.DATASET_SPLIT_VALID: "valid",
    common_pb2.DATASET_SPLIT_TEST: "test",
}
SPLIT_ENUMS = {"train": common_pb2.DATASET_SPLIT_TRAIN, "valid": common_pb2.DATASET_SPLIT_VALID,
               "test": common_pb2.DATASET_SPLIT_TEST}  # fmt: skip
TASK_NAMES = {
    common_pb2.TASK_CLASSIFICATION: "classification",
    common_pb2.TASK_REGRESSION: "regression",
    common_pb2.TASK_RANKING: "ranking",
}
TASK_ENUMS = {v: k for k, v in TASK_NAMES.items()}
PROVIDER_NAMES = {pb.PROVIDER_UNSPECIFIED: "cpu", pb.PROVIDER_CPU: "cpu", pb.PROVIDER_CUDA: "cuda"}
PROVIDER_ENUMS = {"cpu": pb.PROVIDER_CPU, "cuda": pb.PROVIDER_CUDA}
CURVE_KINDS = {"roc": pb.CURVE_KIND_ROC, "pr": pb.CURVE_KIND_PRECISION_RECALL}

_VERSION_NAME = re.compile(r"^models/[a-z][a-z0-9-]{0,62}/versions/[1-9][0-9]*\Z")
_DATASET_VERSION = re.compile(r"^datasets/[a-z][a-z0-9-]{0,62}/versions/[1-9][0-9]*\Z")


def check_version_name(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _VERSION_NAME.match(value):
        raise InvalidArgument(field, f"{value!r} is not models/{{model}}/versions/{{version}}")
    return value


def check_dataset_version(value: str, field: str) -> str:
    if not _DATASET_VERSION.match(value):
        raise InvalidArgument(field, f"{value!r} is not datasets/{{dataset}}/versions/{{version}}")
    return value


def parse_name(name: str, collection: str, field: str = "name") -> str:
    prefix = f"{collection}/"
    job_id = name.removeprefix(prefix)
    if not name.startswith(prefix) or not re.fullmatch(r"[a-z0-9-]{1,63}", job_id):
        raise InvalidArgument(field, f"{name!r} is not {collection}/{{id}}")
    return job_id


def new_id() -> str:
    return uuid.uuid4().hex


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def jsonable(value: Any) -> Any:
    """A copy with numpy scalars as Python numbers and NaN / infinity as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return finite_or_none(value)
    return value


# ------------------------------------------------------------------------ lookups


def get_evaluation(session: Session, job_id: str, *, lock: bool = False) -> m.Evaluation:
    stmt = select(m.Evaluation).where(m.Evaluation.name == job_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"evaluations/{job_id} not found")
    scope.check_visible(row.project, f"evaluations/{job_id}")
    return row


def get_benchmark(session: Session, job_id: str, *, lock: bool = False) -> m.Benchmark:
    stmt = select(m.Benchmark).where(m.Benchmark.name == job_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"benchmarks/{job_id} not found")
    scope.check_visible(row.project, f"benchmarks/{job_id}")
    return row


JobRow = m.Evaluation | m.Benchmark


def resource_name(row: JobRow) -> str:
    return f"{'evaluations' if isinstance(row, m.Evaluation) else 'benchmarks'}/{row.name}"


# --------------------------------------------------------------------- job status


def job_status(row: JobRow) -> common_pb2.JobStatus:
    progress = row.config.get("progress", {})
    return common_pb2.JobStatus(
        state=common_pb2.JobState.Value(f"JOB_STATE_{row.state}"),
        reason=row.reason,
        progress=common_pb2.Progress(**progress),
        create_time=ts(row.create_time),
        start_time=ts(row.start_time),
        end_time=ts(row.end_time),
        attempt=int(row.config.get("attempt", 0)),
    )


def add_job_event(
    session: Session, row: JobRow, metrics: dict[str, float] | None = None, log_line: str = ""
) -> None:
    """Appends the job's current status (and metrics) to its Watch stream."""
    job = resource_name(row)
    last = session.scalar(select(func.max(m.JobEvent.sequence)).where(m.JobEvent.job == job))
    status = json_format.MessageToDict(job_status(row), preserving_proto_field_name=True)
    session.add(
        m.JobEvent(
            job=job,
            sequence=(last or 0) + 1,
            event_time=utcnow(),
            kind="status",
            payload={"status": status, "metrics": jsonable(metrics or {}), "log": log_line},
        )
    )


def events_after(session: Session, job: str, after: int) -> list[common_pb2.JobEvent]:
    rows = session.scalars(
        select(m.JobEvent)
        .where(m.JobEvent.job == job, m.JobEvent.sequence > after)
        .order_by(m.JobEvent.sequence)
    ).all()
    events = []
    for row in rows:
        event = common_pb2.JobEvent(
            job=row.job, sequence=row.sequence, time=ts(row.event_time),
            log_line=row.payload.get("log", ""),
        )  # fmt: skip
        json_format.ParseDict(row.payload.get("status", {}), event.status)
        event.metrics.update(
            {k: v for k, v in row.payload.get("metrics", {}).items() if v is not None}
        )
        events.append(event)
    return events


def set_state(row: JobRow, state: str, reason: str = "") -> None:
    row.state = state
    row.reason = reason
    now = utcnow()
    if state == "RUNNING":
        row.start_time = now
        row.config = {**row.config, "attempt": int(row.config.get("attempt", 0)) + 1}
    if state in TERMINAL:
        row.end_time = now
        count_job_end(row, "benchmark" if isinstance(row, m.Benchmark) else "evaluation", state)


def set_progress(row: JobRow, completed: int, total: int, unit: str) -> None:
    row.config = {**row.config, "progress": {"completed": completed, "total": total, "unit": unit}}
    row.progress = completed / total if total else 0.0


# -------------------------------------------------------------------- evaluations


def evaluation_config(evaluation: pb.Evaluation, task: str, metric_names: list[str]) -> dict:
    return {
        "task": task,
        "metric_names": metric_names,
        "k": evaluation.k or 10,
        "bootstrap_samples": evaluation.bootstrap_samples,
        "confidence_level": evaluation.confidence_level or 0.95,
        "batch_size": evaluation.batch_size or 256,
        "seed": evaluation.seed,
        "log_to_registry": evaluation.log_to_registry,
        "labels": dict(evaluation.labels),
    }


def evaluation_to_proto(row: m.Evaluation) -> pb.Evaluation:
    config, results = row.config, row.results or {}
    message = pb.Evaluation(
        name=f"evaluations/{row.name}",
        project=row.project or "",
        model_version=row.model_version,
        dataset_version=row.dataset_version,
        split=SPLIT_ENUMS.get(row.split, common_pb2.DATASET_SPLIT_TEST),
        task=TASK_ENUMS.get(config.get("task", ""), common_pb2.TASK_UNSPECIFIED),
        metric_names=config.get("metric_names", []),
        k=config.get("k", 10),
        bootstrap_samples=config.get("bootstrap_samples", 0),
        confidence_level=config.get("confidence_level", 0.95),
        batch_size=config.get("batch_size", 256),
        seed=config.get("seed", 0),
        log_to_registry=config.get("log_to_registry", False),
        labels=config.get("labels", {}),
        status=job_status(row),
        row_count=results.get("row_count", 0),
        creator=row.creator,
    )
    for metric in results.get("metrics", []):
        message.metrics.add(
            name=metric["name"], value=nan_if_none(metric["value"]),
            lower=nan_if_none(metric.get("lower")), upper=nan_if_none(metric.get("upper")),
            source="evaluation",
        )  # fmt: skip
    for figures in results.get("per_class", []):
        message.per_class_metrics.add(**{k: nan_if_none(v) if k not in ("label", "support")
                                         else v for k, v in figures.items()})  # fmt: skip
    if results.get("confusion"):
        message.confusion_matrix.labels.extend(results["confusion"]["labels"])
        message.confusion_matrix.counts.extend(results["confusion"]["counts"])
    for curve in results.get("curves", []):
        message.curves.add(
            kind=CURVE_KINDS[curve["kind"]], label=curve["label"], x=curve["x"], y=curve["y"],
            thresholds=[nan_if_none(t) for t in curve["thresholds"]],
            area=nan_if_none(curve["area"]),
        )  # fmt: skip
    for artifact in results.get("reports", []):
        message.report_artifacts.add(kind="report", **artifact)
    return message


# --------------------------------------------------------------------- benchmarks


def benchmark_config(benchmark: pb.Benchmark) -> dict:
    return {
        "provider": PROVIDER_NAMES[benchmark.provider],
        "batch_sizes": list(benchmark.batch_sizes) or [1, 8, 64],
        "warmup_iterations": benchmark.warmup_iterations or 10,
        "iterations": benchmark.iterations or 100,
        "threads": benchmark.threads,
        "log_to_registry": benchmark.log_to_registry,
        "labels": dict(benchmark.labels),
    }


def benchmark_to_proto(row: m.Benchmark) -> pb.Benchmark:
    config, results = row.config, row.results or {}
    message = pb.Benchmark(
        name=f"benchmarks/{row.name}",
        project=row.project or "",
        model_version=row.model_version,
        provider=PROVIDER_ENUMS[config.get("provider", "cpu")],
        batch_sizes=config.get("batch_sizes", []),
        warmup_iterations=config.get("warmup_iterations", 10),
        iterations=config.get("iterations", 100),
        threads=config.get("threads", 0),
        log_to_registry=config.get("log_to_registry", False),
        labels=config.get("labels", {}),
        status=job_status(row),
        peak_memory_bytes=results.get("peak_memory_bytes", 0),
        model_size_bytes=results.get("model_size_bytes", 0),
        device=results.get("device", ""),
        creator=row.creator,
    )
    for result in results.get("results", []):
        message.results.add(**result)
    return message


# ------------------------------------------------------------------------ filters

_CLAUSE = re.compile(r'^\s*([a-z_]+)\s*=\s*"([^"]*)"\s*$')


def filter_clauses(text: str, columns: dict[str, Any]) -> list[ColumnElement[bool]]:
    """``field = "value" AND ...`` over the given columns; anything else is refused."""
    if not text.strip():
        return []
    clauses = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = _CLAUSE.match(part)
        if match is None:
            raise InvalidArgument("filter", f'{part!r}: expected field = "value" joined by AND')
        field, value = match.groups()
        if field not in columns:
            raise InvalidArgument(
                "filter", f"{field!r} cannot be filtered on; use {sorted(columns)}"
            )
        clauses.append(columns[field] == (value.upper() if field == "state" else value))
    return clauses
