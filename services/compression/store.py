"""Rows of compression_jobs, compression_policies and job_events <-> protos.

A job row keeps the request as asked in ``config["job"]`` (proto JSON of the
CompressionJob's input fields) and what came out in ``metrics`` (the
baseline and step reports as proto JSON, the chosen step). A policy row keeps
its recipe and options in ``config``; its ``name`` is the ``{policy}`` id,
unique within its ``model``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.errors import InvalidArgument, NotFound
from aimass.core.metrics import count_job_end

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
JOB_INPUT_FIELDS = ("parent_version", "recipe", "evaluate", "target_model", "labels")
_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
_VERSION = re.compile(r"^models/([a-z][a-z0-9-]{0,62})/versions/[1-9][0-9]*\Z")
_MODEL = re.compile(r"^models/([a-z][a-z0-9-]{0,62})\Z")
_DATASET_VERSION = re.compile(r"^datasets/[a-z][a-z0-9-]{0,62}/versions/[1-9][0-9]*\Z")


def new_id() -> str:
    return uuid.uuid4().hex


def ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def check_version_name(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _VERSION.match(value):
        raise InvalidArgument(field, f"{value!r} is not models/{{model}}/versions/{{version}}")
    return value


def check_model_name(value: str, field: str) -> str:
    if not _MODEL.match(value):
        raise InvalidArgument(field, f"{value!r} is not models/{{model}}")
    return value


def check_dataset_version(value: str, field: str) -> str:
    if value and not _DATASET_VERSION.match(value):
        raise InvalidArgument(field, f"{value!r} is not datasets/{{dataset}}/versions/{{version}}")
    return value


def model_of(version_name: str) -> str:
    """ "models/m" of "models/m/versions/3"."""
    return version_name.rsplit("/versions/", 1)[0]


def parse_job_name(name: str) -> str:
    job_id = name.removeprefix("compressionJobs/")
    if not name.startswith("compressionJobs/") or not re.fullmatch(r"[a-z0-9-]{1,63}", job_id):
        raise InvalidArgument("name", f"{name!r} is not compressionJobs/{{job}}")
    return job_id


def parse_policy_name(name: str, field: str = "name") -> tuple[str, str]:
    """("models/m", "policy") of "models/m/compressionPolicies/policy"."""
    model, sep, policy = name.partition("/compressionPolicies/")
    if not sep or not _MODEL.match(model) or not _ID.match(policy):
        raise InvalidArgument(
            field, f"{name!r} is not models/{{model}}/compressionPolicies/{{policy}}"
        )
    return model, policy


def check_policy_id(value: str, field: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(
            field,
            f"{value!r} must be 1-63 lower-case letters, digits or '-', starting with a letter",
        )
    return value


# ------------------------------------------------------------------------- jobs


def get_job(session: Session, job_id: str, *, lock: bool = False) -> m.CompressionJob:
    stmt = select(m.CompressionJob).where(m.CompressionJob.name == job_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"compressionJobs/{job_id} not found")
    scope.check_visible(row.project, f"compressionJobs/{job_id}")
    return row


def job_input(row: m.CompressionJob) -> pb.CompressionJob:
    message = pb.CompressionJob()
    json_format.ParseDict(row.config.get("job", {}), message, ignore_unknown_fields=True)
    return message


def job_input_dict(job: pb.CompressionJob) -> dict[str, Any]:
    trimmed = pb.CompressionJob()
    for name in JOB_INPUT_FIELDS:
        if name == "labels":
            trimmed.labels.update(job.labels)
        elif name == "recipe":
            trimmed.recipe.CopyFrom(job.recipe)
        else:
            setattr(trimmed, name, getattr(job, name))
    return json_format.MessageToDict(trimmed, preserving_proto_field_name=True)


def method_summary(recipe: pb.Recipe) -> str:
    methods = [step.WhichOneof("method") or "" for step in recipe.steps]
    return ",".join(methods)[:40]


def job_status(row: m.CompressionJob) -> common_pb2.JobStatus:
    progress = row.config.get("progress", {})
    return common_pb2.JobStatus(
        state=common_pb2.JobState.Value(f"JOB_STATE_{row.state}"),
        reason=row.reason,
        progress=common_pb2.Progress(**progress),
        create_time=ts(row.create_time),
        start_time=ts(row.start_time),
        end_time=ts(row.end_time),
        attempt=row.attempt,
    )


def job_to_proto(row: m.CompressionJob, policy_name: str = "") -> pb.CompressionJob:
    message = job_input(row)
    message.name = f"compressionJobs/{row.name}"
    message.status.CopyFrom(job_status(row))
    message.creator = row.creator
    message.project = row.project or ""
    message.model_version = row.result_version
    message.policy = policy_name or row.config.get("policy", "")
    results = row.metrics or {}
    if results.get("baseline"):
        json_format.ParseDict(results["baseline"], message.baseline, ignore_unknown_fields=True)
    for report in results.get("steps", []):
        json_format.ParseDict(report, message.step_reports.add(), ignore_unknown_fields=True)
    message.chosen_step = results.get("chosen_step", "")
    message.triton_check = results.get("triton_check", "")
    if results.get("before_after"):
        json_format.ParseDict(
            results["before_after"], message.before_after, ignore_unknown_fields=True
        )
    return message


def report_dict(report: pb.StepReport) -> dict[str, Any]:
    return json_format.MessageToDict(report, preserving_proto_field_name=True)


def set_state(row: m.CompressionJob, state: str, reason: str = "") -> None:
    row.state = state
    row.reason = reason
    now = utcnow()
    if state == "RUNNING":
        row.start_time = now
        row.attempt = (row.attempt or 0) + 1
    if state in TERMINAL:
        row.end_time = now
        count_job_end(row, "compression", state)


def set_progress(row: m.CompressionJob, completed: int, total: int) -> None:
    row.config = {**row.config, "progress": {"completed": completed, "total": total,
                                             "unit": "steps"}}  # fmt: skip
    row.progress = completed / total if total else 0.0


def add_job_event(
    session: Session,
    row: m.CompressionJob,
    metrics: dict[str, float] | None = None,
    log_line: str = "",
    step: int = 0,
) -> None:
    """Appends the job's current status (and a step's figures) to its Watch stream."""
    job = f"compressionJobs/{row.name}"
    last = session.scalar(select(func.max(m.JobEvent.sequence)).where(m.JobEvent.job == job))
    status = json_format.MessageToDict(job_status(row), preserving_proto_field_name=True)
    clean = {k: float(v) for k, v in (metrics or {}).items() if v == v and abs(v) != float("inf")}
    session.add(
        m.JobEvent(
            job=job,
            sequence=(last or 0) + 1,
            event_time=utcnow(),
            kind="status",
            payload={"status": status, "metrics": clean, "log": log_line, "step": step},
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
            log_line=row.payload.get("log", ""), step=int(row.payload.get("step", 0)),
        )  # fmt: skip
        json_format.ParseDict(row.payload.get("status", {}), event.status)
        event.metrics.update(row.payload.get("metrics", {}))
        events.append(event)
    return events


# --------------------------------------------------------------------- policies


def get_policy(session: Session, model: str, policy_id: str) -> m.CompressionPolicy:
    row = session.scalar(
        select(m.CompressionPolicy).where(
            m.CompressionPolicy.model == model, m.CompressionPolicy.name == policy_id
        )
    )
    if row is None:
        raise NotFound(f"{model}/compressionPolicies/{policy_id} not found")
    return row


def policy_resource(row: m.CompressionPolicy) -> str:
    return f"{row.model}/compressionPolicies/{row.name}"


def policy_config(policy: pb.CompressionPolicy) -> dict[str, Any]:
    return {
        "recipe": json_format.MessageToDict(policy.recipe, preserving_proto_field_name=True),
        "evaluate": policy.evaluate,
        "target_model": policy.target_model,
        "version_filter": policy.version_filter,
    }


def policy_recipe(row: m.CompressionPolicy) -> pb.Recipe:
    recipe = pb.Recipe()
    json_format.ParseDict(row.config.get("recipe", {}), recipe, ignore_unknown_fields=True)
    return recipe


def policy_to_proto(row: m.CompressionPolicy) -> pb.CompressionPolicy:
    return pb.CompressionPolicy(
        name=policy_resource(row),
        description=row.description,
        recipe=policy_recipe(row),
        evaluate=bool(row.config.get("evaluate", False)),
        target_model=row.config.get("target_model", ""),
        enabled=row.enabled,
        version_filter=row.config.get("version_filter", ""),
        last_job=row.config.get("last_job", ""),
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=row.etag,
    )


_FILTER = re.compile(r'^\s*(tags\.[A-Za-z0-9_.-]+|framework)\s*(=|!=)\s*"([^"]*)"\s*$')


def check_version_filter(text: str, field: str) -> list[tuple[str, str, str]]:
    """``tags.k = "v" AND framework != "x"`` as (key, operator, value) clauses."""
    if not text.strip():
        return []
    clauses = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = _FILTER.match(part)
        if match is None:
            raise InvalidArgument(
                field,
                f'{part!r}: expected tags.<key> = "value" or framework = "value", joined by AND',
            )
        clauses.append((match.group(1), match.group(2), match.group(3)))
    return clauses


def version_matches(
    clauses: list[tuple[str, str, str]], tags: dict[str, str], framework: str
) -> bool:
    for key, operator, value in clauses:
        actual = framework if key == "framework" else tags.get(key.removeprefix("tags."))
        if (actual == value) != (operator == "="):
            return False
    return True
