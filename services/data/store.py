"""Rows of the data service's tables and their proto form. ORM rows never leave this module's
callers' sessions: handlers convert them with the ``*_to_proto`` functions inside the session.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.errors import InvalidArgument, NotFound
from aimass.data import config as cfg
from aimass.data.v1 import data_pb2 as pb

ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
SPLIT_ENUMS = {
    "train": common_pb2.DATASET_SPLIT_TRAIN,
    "valid": common_pb2.DATASET_SPLIT_VALID,
    "test": common_pb2.DATASET_SPLIT_TEST,
}
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
ACTIVE = ("QUEUED", "RUNNING", "CANCELLING")
UPLOAD_STATES = {
    "OPEN": pb.UPLOAD_STATE_ACTIVE,
    "COMPLETE": pb.UPLOAD_STATE_COMPLETE,
    "ABORTED": pb.UPLOAD_STATE_FAILED,
}


def check_id(value: str, field: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            field, f"{value!r} is not valid: use 1-63 lower-case letters, digits or '-'"
        )
    return value


def parse_dataset_name(name: str, field: str = "name") -> str:
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "datasets":
        raise InvalidArgument(field, f"{name!r} is not of the form 'datasets/{{dataset}}'")
    return check_id(parts[1], field)


def parse_version_name(name: str, field: str = "name") -> tuple[str, int]:
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "datasets" or parts[2] != "versions":
        raise InvalidArgument(
            field, f"{name!r} is not of the form 'datasets/{{dataset}}/versions/{{version}}'"
        )
    if not parts[3].isdigit() or parts[3].startswith("0"):
        raise InvalidArgument(field, f"version {parts[3]!r} is not a positive number")
    return check_id(parts[1], field), int(parts[3])


def parse_simple_name(name: str, collection: str, field: str = "name") -> str:
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != collection or not parts[1]:
        raise InvalidArgument(field, f"{name!r} is not of the form '{collection}/{{id}}'")
    return parts[1]


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def get_dataset(session: Session, dataset_id: str) -> m.Dataset:
    row = session.scalar(select(m.Dataset).where(m.Dataset.name == dataset_id))
    if row is None:
        raise NotFound(f"datasets/{dataset_id} not found")
    scope.check_visible(row.project, f"datasets/{dataset_id}")
    return row


def get_version(session: Session, dataset_id: str, number: int) -> m.DatasetVersion:
    row = session.scalar(
        select(m.DatasetVersion)
        .join(m.Dataset)
        .where(m.Dataset.name == dataset_id, m.DatasetVersion.version == number)
    )
    if row is None:
        raise NotFound(f"datasets/{dataset_id}/versions/{number} not found")
    scope.check_visible(row.dataset.project, f"datasets/{dataset_id}/versions/{number}")
    return row


def get_job(session: Session, job_id: str, *, for_update: bool = False) -> m.IngestJob:
    """The job row; ``for_update`` locks it (PostgreSQL) so concurrent writers of its events
    (worker progress, a Cancel on another replica) take turns for the next sequence."""
    stmt = select(m.IngestJob).where(m.IngestJob.name == job_id)
    row = session.scalar(stmt.with_for_update() if for_update else stmt)
    if row is None:
        raise NotFound(f"ingestJobs/{job_id} not found")
    if scope.caller_project():
        dataset_project = session.scalar(
            select(m.Dataset.project).where(m.Dataset.id == row.dataset_id)
        )
        scope.check_visible(dataset_project or "", f"ingestJobs/{job_id}")
    return row


def dataset_config(row: m.Dataset) -> pb.DatasetConfig:
    return cfg.from_json(row.config)


def dataset_to_proto(row: m.Dataset) -> pb.Dataset:
    return pb.Dataset(
        name=f"datasets/{row.name}",
        description=row.description,
        labels=row.tags,
        project=row.project,
        config=dataset_config(row),
        latest_version=row.latest_version,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=row.etag,
    )


def version_to_proto(row: m.DatasetVersion, dataset_id: str) -> pb.DatasetVersion:
    schema = row.schema.get("columns", [])
    stats = row.statistics.get("columns", [])
    splits = []
    for split_name in cfg.SPLIT_NAMES:
        if split_name not in row.split_uris:
            continue
        artifact = row.config.get("artifacts", {}).get(split_name, {})
        splits.append(
            pb.SplitSummary(
                split=SPLIT_ENUMS[split_name],
                row_count=row.split_row_counts.get(split_name, 0),
                label_distribution=_label_counts(row.label_distribution.get(split_name, {})),
                artifact=common_pb2.Artifact(kind="data", **artifact),
            )
        )
    total = row.label_distribution.get("all", {})
    return pb.DatasetVersion(
        name=f"datasets/{dataset_id}/versions/{row.version}",
        version=row.version,
        state=pb.DatasetVersionState.Value(f"DATASET_VERSION_STATE_{row.state}")
        if row.state in ("INGESTING", "READY", "FAILED")
        else pb.DATASET_VERSION_STATE_UNSPECIFIED,
        reason=row.reason,
        fingerprint=row.fingerprint or "",
        config=cfg.from_json(row.config.get("config", {})),
        schema=[pb.ColumnSchema(**c) for c in schema],
        splits=splits,
        total_rows=row.row_count,
        label_distribution=_label_counts(total),
        column_statistics=[pb.ColumnStatistics(**s) for s in stats],
        size_bytes=row.size_bytes,
        ingest_job=row.config.get("ingest_job", ""),
        create_time=ts(row.create_time),
        ready_time=ts(row.update_time) if row.state in ("READY", "FAILED") else None,
    )


def _label_counts(counts: dict[str, int]) -> list[pb.LabelCount]:
    return [pb.LabelCount(label=k, count=v) for k, v in counts.items()]


def job_status(row: m.IngestJob) -> common_pb2.JobStatus:
    progress = row.config.get("progress", {})
    return common_pb2.JobStatus(
        state=common_pb2.JobState.Value(f"JOB_STATE_{row.state}"),
        reason=row.reason,
        progress=common_pb2.Progress(**progress),
        create_time=ts(row.create_time),
        start_time=ts(row.start_time),
        end_time=ts(row.end_time),
        attempt=1 if row.start_time else 0,
    )


def job_to_proto(row: m.IngestJob, session: Session) -> pb.IngestJob:
    version_name = ""
    if row.dataset_version_id is not None:
        version = session.get(m.DatasetVersion, row.dataset_version_id)
        if version is not None:
            version_name = f"datasets/{version.dataset.name}/versions/{version.version}"
    version_name = version_name or row.config.get("dataset_version", "")
    dataset = session.get(m.Dataset, row.dataset_id)
    return pb.IngestJob(
        name=f"ingestJobs/{row.name}",
        dataset=f"datasets/{dataset.name}" if dataset else "",
        config=cfg.from_json(row.config.get("config", {})),
        status=job_status(row),
        dataset_version=version_name,
        cache_hit=row.cache_hit,
        creator=row.creator,
    )


def upload_to_proto(row: m.Upload) -> pb.Upload:
    return pb.Upload(
        name=f"uploads/{row.name}",
        file_name=row.file_name,
        size_bytes=row.total_bytes or 0,
        sha256=row.sha256,
        committed_offset=row.offset,
        state=UPLOAD_STATES.get(row.state, pb.UPLOAD_STATE_UNSPECIFIED),
        reason=row.reason,
        uri=row.temp_uri if row.state == "COMPLETE" else "",
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        expire_time=ts(row.expire_time),
    )


def add_job_event(
    session: Session, row: m.IngestJob, metrics: dict[str, float] | None = None
) -> None:
    """Appends the job's current status to its Watch stream."""
    last = row.config.get("sequence", 0) + 1
    row.config = {**row.config, "sequence": last}
    status = json_format.MessageToDict(job_status(row), preserving_proto_field_name=True)
    session.add(
        m.JobEvent(
            job=f"ingestJobs/{row.name}",
            sequence=last,
            event_time=_now(),
            kind="status",
            payload={"status": status, "metrics": metrics or {}},
        )
    )


def _now() -> datetime:
    from aimass.core.db.base import utcnow

    return utcnow()


def event_to_proto(row: m.JobEvent) -> common_pb2.JobEvent:
    event = common_pb2.JobEvent(job=row.job, sequence=row.sequence, time=ts(row.event_time))
    json_format.ParseDict(row.payload.get("status", {}), event.status)
    event.metrics.update(row.payload.get("metrics", {}))
    return event


def json_any(value: Any) -> Any:
    """Plain JSON-able copy (numpy scalars to Python)."""
    return json.loads(json.dumps(value, default=float))
