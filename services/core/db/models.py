"""Every table of the aimass metadata, in one SQLAlchemy metadata (``Base.metadata``).

One module so alembic sees the whole schema and the tests can compare it with
the migrations. Each service's store reads and writes only its own tables and
turns rows into entities before they leave the store.

Conventions:
- Surrogate integer primary keys (``id``); the resource id users see (the
  ``{model}`` of ``models/{model}``) is a unique ``name`` column.
- Foreign keys join resources of the SAME service (a version to its model, an
  alias to its version). A reference to another service's resource is its
  resource name as a string (``dataset_version = "datasets/d/versions/3"``):
  services share no tables, and imported bundles refer to resources this
  installation may not have.
- ``state`` columns hold the upper-case names of the proto enums ("RUNNING").
- JSON columns are JSON on SQLite and JSONB on PostgreSQL; assign new values,
  in-place changes are not tracked.
- Every timestamp is aware UTC; :class:`~aimass.core.db.columns.Etagged` tables
  renew their etag on each update.
- ``request_id`` columns make Create calls idempotent: unique per parent, NULL
  when the caller sent none.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from aimass.core.db.base import Base, Timestamps
from aimass.core.db.columns import Etagged, JSONType, UtcDateTime

# The outbox tables belong to the same metadata: importing this module is
# enough to see every table.
from aimass.core.db.outbox import SEQ_TYPE
from aimass.core.db.outbox import OutboxEvent as OutboxEvent
from aimass.core.db.outbox import ProcessedEvent as ProcessedEvent

# Lengths of identifiers: resource ids follow AIP-122 (63 characters);
# resource names of another service's resources get room for their path.
ID_LEN = 63
REF_LEN = 300
STATE_LEN = 32
SHA256_LEN = 64


def _id() -> Mapped[int]:
    return mapped_column(SEQ_TYPE, primary_key=True, autoincrement=True)


def _name() -> Mapped[str]:
    return mapped_column(String(ID_LEN), unique=True, nullable=False)


def _fk(
    target: str, *, ondelete: str | None = None, nullable: bool = False, index: bool = False
) -> Mapped[Any]:
    """A foreign key column of the same type as the surrogate keys it points at.

    ``ondelete=None`` (NO ACTION) refuses to delete a referenced row; it is
    checked at the end of the statement, so a delete that cascades to the
    referring rows as well (a whole model) still succeeds, where RESTRICT,
    checked row by row, would fail depending on the order of the cascade.
    """
    return mapped_column(
        SEQ_TYPE, ForeignKey(target, ondelete=ondelete), nullable=nullable, index=index
    )


def _state(default: str) -> Mapped[str]:
    return mapped_column(String(STATE_LEN), default=default, index=True)


def _json_dict() -> Mapped[dict[str, Any]]:
    return mapped_column(JSONType, default=dict)


# ---------------------------------------------------------------- data service


class Dataset(Timestamps, Etagged, Base):
    """``datasets/{dataset}``: a named collection of immutable versions."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    display_name: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict[str, str]] = _json_dict()
    owner: Mapped[str] = mapped_column(String(200), default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    # Highest version number handed out so far.
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    # The DatasetConfig (proto JSON, field names as in the proto) new ingests start from.
    config: Mapped[dict[str, Any]] = _json_dict()

    versions: Mapped[list[DatasetVersion]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class DatasetVersion(Timestamps, Etagged, Base):
    """``datasets/{dataset}/versions/{version}``: converted, split, described data."""

    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_version"),
        UniqueConstraint("dataset_id", "request_id", name="uq_dataset_versions_request_id"),
        Index("ix_dataset_versions_create_time", "create_time"),
    )

    id: Mapped[int] = _id()
    dataset_id: Mapped[int] = _fk("datasets.id", ondelete="CASCADE")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    # PENDING, INGESTING, READY, FAILED.
    state: Mapped[str] = _state("PENDING")
    reason: Mapped[str] = mapped_column(Text, default="")
    # sha256 of the source content and the conversion config: the ingest cache key.
    fingerprint: Mapped[str | None] = mapped_column(String(SHA256_LEN), index=True)
    source_uri: Mapped[str] = mapped_column(Text, default="")
    source_format: Mapped[str] = mapped_column(String(20), default="")
    # Arrow schema as JSON: [{"name", "type", "nullable"}, ...].
    schema: Mapped[dict[str, Any]] = _json_dict()
    # {"train": 1400, "valid": 200, "test": 197}.
    split_row_counts: Mapped[dict[str, int]] = _json_dict()
    label_column: Mapped[str] = mapped_column(String(200), default="")
    # {"train": {"0": 140, "1": 138, ...}, ...}.
    label_distribution: Mapped[dict[str, Any]] = _json_dict()
    statistics: Mapped[dict[str, Any]] = _json_dict()
    # Artifact URI of each split's columnar file: {"train": "file://..."}.
    split_uris: Mapped[dict[str, str]] = _json_dict()
    # Split ratios, seed, stratify column, conversion options.
    config: Mapped[dict[str, Any]] = _json_dict()
    row_count: Mapped[int] = mapped_column(BigInteger, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    creator: Mapped[str] = mapped_column(String(200), default="")
    request_id: Mapped[str | None] = mapped_column(String(64))

    dataset: Mapped[Dataset] = relationship(back_populates="versions")


class Upload(Timestamps, Base):
    """A resumable upload: bytes received so far sit at ``temp_uri``."""

    __tablename__ = "uploads"

    id: Mapped[int] = _id()
    # Upload id handed to the client ("uploads/{upload}").
    name: Mapped[str] = _name()
    file_name: Mapped[str] = mapped_column(String(255), default="")
    # Declared size; NULL when the client did not know it.
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Bytes received and durably written; the client resumes from here.
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    # Expected sha256 from the client, checked when the upload completes.
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), default="")
    temp_uri: Mapped[str] = mapped_column(Text, default="")
    # OPEN, COMPLETE, ABORTED.
    state: Mapped[str] = _state("OPEN")
    # Why an upload was aborted (e.g. the sha256 did not match); empty otherwise.
    reason: Mapped[str] = mapped_column(Text, default="")
    creator: Mapped[str] = mapped_column(String(200), default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="")
    # Abandoned uploads are swept after this time.
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)


class IngestJob(Timestamps, Etagged, Base):
    """``ingestJobs/{job}``: turns a source (path, s3://, upload) into a dataset version."""

    __tablename__ = "ingest_jobs"
    __table_args__ = (Index("ix_ingest_jobs_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    dataset_id: Mapped[int] = _fk("datasets.id", ondelete="CASCADE", index=True)
    # The version being written; NULL until it is allocated.
    dataset_version_id: Mapped[int | None] = _fk(
        "dataset_versions.id", ondelete="SET NULL", nullable=True, index=True
    )
    upload_id: Mapped[int | None] = _fk(
        "uploads.id", ondelete="SET NULL", nullable=True, index=True
    )
    source_uri: Mapped[str] = mapped_column(Text, default="")
    config: Mapped[dict[str, Any]] = _json_dict()
    # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED.
    state: Mapped[str] = _state("QUEUED")
    reason: Mapped[str] = mapped_column(Text, default="")
    # True when an existing version with the same fingerprint was reused.
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    creator: Mapped[str] = mapped_column(String(200), default="")
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


# ------------------------------------------------------------ training service


class TrainingJob(Timestamps, Etagged, Base):
    """``trainingJobs/{job}``: one training run, or one trial of a search (``parent``)."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        # The scheduler's query: queued jobs, highest priority first, oldest first.
        Index("ix_training_jobs_state_priority", "state", "priority", "create_time"),
        Index("ix_training_jobs_create_time", "create_time"),
    )

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    display_name: Mapped[str] = mapped_column(String(200), default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    # The model spec (architecture) and the training config, as given.
    spec: Mapped[dict[str, Any]] = _json_dict()
    config: Mapped[dict[str, Any]] = _json_dict()
    # "datasets/{dataset}/versions/{version}" it trains on.
    dataset_version: Mapped[str] = mapped_column(String(REF_LEN), default="", index=True)
    # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED.
    state: Mapped[str] = mapped_column(String(STATE_LEN), default="QUEUED")
    reason: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Incremented each time a worker (re)starts the job.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Worker currently running it, and when it last reported.
    worker: Mapped[str] = mapped_column(String(ID_LEN * 2), default="")
    heartbeat_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Last durable checkpoint: a restarted attempt resumes from it.
    checkpoint_uri: Mapped[str] = mapped_column(Text, default="")
    # "models/{model}/versions/{version}" registered from the result.
    result_version: Mapped[str] = mapped_column(String(REF_LEN), default="")
    # Final (or best so far) metrics: {"valid_loss": 0.08, "valid_accuracy": 0.97}.
    metrics: Mapped[dict[str, float]] = _json_dict()
    # The search job this one is a trial of.
    parent_id: Mapped[int | None] = _fk(
        "training_jobs.id", ondelete="CASCADE", nullable=True, index=True
    )
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    # "models/{model}" the result is registered as a version of; "" keeps it unregistered.
    target_model: Mapped[str] = mapped_column(String(REF_LEN), default="", index=True)
    labels: Mapped[dict[str, str]] = _json_dict()
    # Everything else of the TrainingJob resource (resources, search, trial parameters,
    # best trial, checkpoints kept, outputs of a trial), as JSON.
    options: Mapped[dict[str, Any]] = _json_dict()


class JobEvent(Base):
    """One event of a job (state change, metrics, log line), replayed by Watch and logs."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job", "sequence", name="uq_job_events_job_sequence"),)

    id: Mapped[int] = _id()
    # Resource name of the job: "trainingJobs/j1", "compressionJobs/c1", ...
    job: Mapped[str] = mapped_column(String(REF_LEN), nullable=False)
    # 1, 2, 3, ... per job: a watcher resumes after the last sequence it saw.
    sequence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    # "state", "metrics", "log", "checkpoint".
    kind: Mapped[str] = mapped_column(String(STATE_LEN), nullable=False)
    payload: Mapped[dict[str, Any]] = _json_dict()


class Worker(Timestamps, Base):
    """A process that pulls jobs (training, compression, evaluation) and reports back."""

    __tablename__ = "workers"

    id: Mapped[int] = _id()
    # Stable id of the worker ("host-pid-random").
    name: Mapped[str] = mapped_column(String(ID_LEN * 2), unique=True, nullable=False)
    # "training", "compression", "evaluation".
    kind: Mapped[str] = mapped_column(String(STATE_LEN), nullable=False)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    # Devices, CPU count, memory, torch version: what jobs it can take.
    capabilities: Mapped[dict[str, Any]] = _json_dict()
    # IDLE, BUSY, GONE.
    state: Mapped[str] = _state("IDLE")
    current_job: Mapped[str] = mapped_column(String(REF_LEN), default="")
    heartbeat_time: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)


# ---------------------------------------------------------- evaluation service


class Evaluation(Timestamps, Etagged, Base):
    """``evaluations/{evaluation}``: metrics of a model version on a dataset split."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    model_version: Mapped[str] = mapped_column(String(REF_LEN), nullable=False, index=True)
    dataset_version: Mapped[str] = mapped_column(String(REF_LEN), nullable=False)
    split: Mapped[str] = mapped_column(String(20), default="test")
    # Metrics asked for, task type, k for ranking metrics, thresholds.
    config: Mapped[dict[str, Any]] = _json_dict()
    state: Mapped[str] = _state("QUEUED")
    reason: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # [{"name", "value", "lower", "upper"}], confusion matrix, curves.
    results: Mapped[dict[str, Any]] = _json_dict()
    report_uri: Mapped[str] = mapped_column(Text, default="")
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


class Monitor(Timestamps, Etagged, Base):
    """``monitors/{monitor}``: scheduled drift and health checks of a deployment."""

    __tablename__ = "monitors"

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    deployment: Mapped[str] = mapped_column(String(REF_LEN), nullable=False, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    # Per-project scoping: the deployment's project, set once.
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    labels: Mapped[dict[str, str]] = _json_dict()
    # {"interval_s", "window_s", "bins", "rules": [{"name", "metric", "threshold", "min_rows"}]}.
    config: Mapped[dict[str, Any]] = _json_dict()
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_time: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    # The MonitorReport of the last run (proto JSON).
    last_report: Mapped[dict[str, Any]] = _json_dict()
    # Names of the rules firing after the last run.
    firing: Mapped[list[str]] = mapped_column(JSONType, default=list)
    creator: Mapped[str] = mapped_column(String(200), default="")


class MonitorAlert(Base):
    """``monitors/{monitor}/alerts/{alert}``: a rule that crossed its threshold."""

    __tablename__ = "monitor_alerts"
    __table_args__ = (UniqueConstraint("monitor_id", "name", name="uq_monitor_alerts_name"),)

    id: Mapped[int] = _id()
    monitor_id: Mapped[int] = _fk("monitors.id", ondelete="CASCADE", index=True)
    name: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    rule: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    metric: Mapped[str] = mapped_column(String(STATE_LEN), nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    feature: Mapped[str] = mapped_column(String(REF_LEN), default="")
    fire_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, index=True)


class MonitoredBatch(Base):
    """A captured-predictions file the evaluation service learnt of from routing's events."""

    __tablename__ = "monitored_batches"
    __table_args__ = (Index("ix_monitored_batches_deployment_end", "deployment", "end_time"),)

    id: Mapped[int] = _id()
    # The event's id: a redelivered event adds nothing.
    event_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    deployment: Mapped[str] = mapped_column(String(REF_LEN), nullable=False)
    artifact_uri: Mapped[str] = mapped_column(Text, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    start_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    end_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)


class Benchmark(Timestamps, Etagged, Base):
    """``benchmarks/{benchmark}``: latency and throughput of a model at batch sizes."""

    __tablename__ = "benchmarks"
    __table_args__ = (Index("ix_benchmarks_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    model_version: Mapped[str] = mapped_column(String(REF_LEN), nullable=False, index=True)
    # Batch sizes, concurrency, backend (onnxruntime, triton), duration.
    config: Mapped[dict[str, Any]] = _json_dict()
    state: Mapped[str] = _state("QUEUED")
    reason: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # Per batch size: p50/p90/p99 latency, throughput, baseline ratios.
    results: Mapped[dict[str, Any]] = _json_dict()
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


# --------------------------------------------------------- compression service


class CompressionPolicy(Timestamps, Etagged, Base):
    """``compressionPolicies/{policy}``: compress new versions of a model automatically."""

    __tablename__ = "compression_policies"
    # {policy} is unique within its model: "models/{model}/compressionPolicies/{policy}".
    __table_args__ = (UniqueConstraint("model", "name", name="uq_compression_policies_model_name"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    # "models/{model}" whose new versions it applies to.
    model: Mapped[str] = mapped_column(String(REF_LEN), nullable=False, index=True)
    # Methods and their options, plus the accuracy drop allowed.
    config: Mapped[dict[str, Any]] = _json_dict()
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    creator: Mapped[str] = mapped_column(String(200), default="")


class CompressionJob(Timestamps, Etagged, Base):
    """``compressionJobs/{job}``: quantize, prune or distill one version into a new one."""

    __tablename__ = "compression_jobs"
    __table_args__ = (
        Index("ix_compression_jobs_state_priority", "state", "priority", "create_time"),
        Index("ix_compression_jobs_create_time", "create_time"),
    )

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    # "models/{model}/versions/{version}" to compress.
    source_version: Mapped[str] = mapped_column(String(REF_LEN), nullable=False, index=True)
    # "int8-dynamic", "int8-static", "fp16", "prune-unstructured", "distill", ...
    method: Mapped[str] = mapped_column(String(40), nullable=False)
    config: Mapped[dict[str, Any]] = _json_dict()
    state: Mapped[str] = mapped_column(String(STATE_LEN), default="QUEUED")
    reason: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str] = mapped_column(String(ID_LEN * 2), default="")
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    result_version: Mapped[str] = mapped_column(String(REF_LEN), default="")
    # Size, latency and accuracy before and after.
    metrics: Mapped[dict[str, Any]] = _json_dict()
    # The policy that started it, if any.
    policy_id: Mapped[int | None] = _fk(
        "compression_policies.id", ondelete="SET NULL", nullable=True, index=True
    )
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


# ------------------------------------------------------------ registry service


class RegisteredModel(Timestamps, Etagged, Base):
    """``models/{model}``: the container of a model's versions."""

    __tablename__ = "registered_models"
    __table_args__ = (Index("ix_registered_models_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict[str, str]] = _json_dict()
    owner: Mapped[str] = mapped_column(String(200), default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    # Highest version number handed out so far; numbers are never reused.
    latest_version: Mapped[int] = mapped_column(Integer, default=0)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )
    aliases: Mapped[list[Alias]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )


class ModelVersion(Timestamps, Etagged, Base):
    """``models/{model}/versions/{version}``: immutable files, metrics, tags and lineage."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
        UniqueConstraint("model_id", "request_id", name="uq_model_versions_request_id"),
        Index("ix_model_versions_create_time", "create_time"),
    )

    id: Mapped[int] = _id()
    model_id: Mapped[int] = _fk("registered_models.id", ondelete="CASCADE")
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    # aimass.common.v1.Signature as JSON: inputs and outputs with dtype and shape.
    signature: Mapped[dict[str, Any]] = _json_dict()
    framework: Mapped[str] = mapped_column(String(40), default="")
    opset: Mapped[int | None] = mapped_column(Integer)
    # The model spec and training config it was built from.
    config: Mapped[dict[str, Any]] = _json_dict()
    model_card: Mapped[str] = mapped_column(Text, default="")
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    # Lineage: resource names of another service's resources.
    source_dataset_version: Mapped[str] = mapped_column(String(REF_LEN), default="", index=True)
    source_job: Mapped[str] = mapped_column(String(REF_LEN), default="", index=True)
    # The version this one was derived from; deleting a parent that has
    # children is refused (the lineage would lose a link).
    parent_version_id: Mapped[int | None] = _fk("model_versions.id", nullable=True, index=True)
    # "int8-dynamic", "prune-50", "distill", ...
    derivation: Mapped[str] = mapped_column(String(60), default="")
    # Lineage carried over from another installation by an imported bundle.
    imported_lineage: Mapped[dict[str, str]] = _json_dict()
    creator: Mapped[str] = mapped_column(String(200), default="")
    request_id: Mapped[str | None] = mapped_column(String(64))

    model: Mapped[RegisteredModel] = relationship(back_populates="versions")
    artifacts: Mapped[list[ModelArtifact]] = relationship(
        back_populates="version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ModelArtifact.id",
    )
    metrics: Mapped[list[VersionMetric]] = relationship(
        back_populates="version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="VersionMetric.id",
    )
    tags: Mapped[list[VersionTag]] = relationship(
        back_populates="version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="VersionTag.key",
    )
    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")


class ModelArtifact(Base):
    """One content-addressed file of a model version ("onnx", "state_dict", ...)."""

    __tablename__ = "model_artifacts"
    __table_args__ = (
        UniqueConstraint("version_id", "file_name", name="uq_model_artifacts_version_file"),
    )

    id: Mapped[int] = _id()
    version_id: Mapped[int] = _fk("model_versions.id", ondelete="CASCADE")
    kind: Mapped[str] = mapped_column(String(40), nullable=False)
    uri: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Lower-case hex; indexed to find every version sharing a file.
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), nullable=False, index=True)
    file_name: Mapped[str] = mapped_column(String(255), nullable=False)

    version: Mapped[ModelVersion] = relationship(back_populates="artifacts")


class VersionMetric(Base):
    """One metric of a version; rows, not JSON, so "accuracy > 0.9" is an indexed query."""

    __tablename__ = "version_metrics"
    __table_args__ = (
        UniqueConstraint("version_id", "source", "name", name="uq_version_metrics_version_name"),
        Index("ix_version_metrics_name_value", "name", "value"),
    )

    id: Mapped[int] = _id()
    version_id: Mapped[int] = _fk("model_versions.id", ondelete="CASCADE")
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    value: Mapped[float] = mapped_column(Float, nullable=False)
    # Confidence interval, when computed.
    lower: Mapped[float | None] = mapped_column(Float)
    upper: Mapped[float | None] = mapped_column(Float)
    # "evaluation", "training", "benchmark", "compression", "user".
    source: Mapped[str] = mapped_column(String(40), default="")

    version: Mapped[ModelVersion] = relationship(back_populates="metrics")


class VersionTag(Base):
    """One key/value tag of a version, indexed for search ("tags.stage = 'qa'")."""

    __tablename__ = "version_tags"
    __table_args__ = (Index("ix_version_tags_key_value", "key", "value"),)

    version_id: Mapped[int] = mapped_column(
        SEQ_TYPE, ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(500), default="")

    version: Mapped[ModelVersion] = relationship(back_populates="tags")


class Alias(Timestamps, Base):
    """``models/{model}/aliases/{alias}``: a named pointer to one version of the model.

    The composite foreign key makes it impossible for an alias to point at a
    version of another model or at a deleted version.
    """

    __tablename__ = "aliases"
    __table_args__ = (
        UniqueConstraint("model_id", "name", name="uq_aliases_model_name"),
        ForeignKeyConstraint(
            ["model_id", "version"],
            ["model_versions.model_id", "model_versions.version"],
            name="fk_aliases_version_model_versions",
        ),
    )

    id: Mapped[int] = _id()
    model_id: Mapped[int] = _fk("registered_models.id", ondelete="CASCADE")
    name: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_by: Mapped[str] = mapped_column(String(200), default="")

    model: Mapped[RegisteredModel] = relationship(back_populates="aliases")


class AliasMove(Base):
    """History of an alias: every set, move and delete, kept after versions go."""

    __tablename__ = "alias_moves"
    __table_args__ = (Index("ix_alias_moves_model_alias", "model_id", "alias", "move_time"),)

    id: Mapped[int] = _id()
    model_id: Mapped[int] = _fk("registered_models.id", ondelete="CASCADE")
    alias: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    # 0 when the alias was created / deleted by this move.
    old_version: Mapped[int] = mapped_column(Integer, default=0)
    new_version: Mapped[int] = mapped_column(Integer, default=0)
    moved_by: Mapped[str] = mapped_column(String(200), default="")
    move_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


class Release(Timestamps, Base):
    """``models/{m}/versions/{v}/releases/{release}``: an exported .tar.gz bundle."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("version_id", "name", name="uq_releases_version_name"),)

    id: Mapped[int] = _id()
    version_id: Mapped[int] = _fk("model_versions.id", ondelete="CASCADE")
    name: Mapped[str] = mapped_column(String(ID_LEN), nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    bundle_uri: Mapped[str] = mapped_column(Text, default="")
    bundle_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bundle_sha256: Mapped[str] = mapped_column(String(SHA256_LEN), default="")
    creator: Mapped[str] = mapped_column(String(200), default="")


# ------------------------------------------------------------- routing service


class InferenceServer(Timestamps, Etagged, Base):
    """``inferenceServers/{server}``: a Triton (or in-process ONNX Runtime) backend."""

    __tablename__ = "inference_servers"

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    # "triton", "onnxruntime".
    kind: Mapped[str] = mapped_column(String(STATE_LEN), default="triton")
    grpc_address: Mapped[str] = mapped_column(String(255), default="")
    http_address: Mapped[str] = mapped_column(String(255), default="")
    # Where the routing service writes this server's model-repository entries.
    model_repository: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = _json_dict()
    # Bytes of model files it may hold loaded; 0: no limit (LRU unloading past it).
    memory_budget_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # UNKNOWN, READY, UNREACHABLE.
    state: Mapped[str] = _state("UNKNOWN")
    reason: Mapped[str] = mapped_column(Text, default="")
    check_time: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Deployment(Timestamps, Etagged, Base):
    """``deployments/{deployment}``: an endpoint routing to model versions by weight."""

    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    labels: Mapped[dict[str, str]] = _json_dict()
    # Servers it may use, ["inferenceServers/a", ...]; [] means any READY one.
    servers: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # [{"model_version": "models/m/versions/3", "weight": 90}, ...].
    routes: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # Mirrored traffic: {"model_version": ..., "fraction": 0.1}; {} for none.
    shadow: Mapped[dict[str, Any]] = _json_dict()
    # Triton model config: max batch size, dynamic batching, instance groups.
    serving_config: Mapped[dict[str, Any]] = _json_dict()
    # PENDING, READY, UPDATING, FAILED, DELETING.
    state: Mapped[str] = _state("PENDING")
    reason: Mapped[str] = mapped_column(Text, default="")
    # Incremented on every route change; SDK route caches compare it.
    revision: Mapped[int] = mapped_column(BigInteger, default=1)
    server_id: Mapped[int | None] = _fk("inference_servers.id", nullable=True, index=True)


class PredictionLog(Base):
    """A Parquet file of captured Predict calls of one deployment (routing service)."""

    __tablename__ = "prediction_logs"
    __table_args__ = (Index("ix_prediction_logs_deployment_end", "deployment", "end_time"),)

    id: Mapped[int] = _id()
    deployment: Mapped[str] = mapped_column(String(REF_LEN), nullable=False)
    artifact_uri: Mapped[str] = mapped_column(Text, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    start_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    end_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    model_versions: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # Sampled calls dropped because the capture queue was full, since the previous file.
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


# ------------------------------------------------------------ gateway and core


class ApiKey(Base):
    """An API key: only its hash is stored; the secret is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = _id()
    # Public key id, also the key's visible prefix ("apiKeys/{key}").
    name: Mapped[str] = _name()
    # sha256 hex of the whole key.
    key_hash: Mapped[str] = mapped_column(String(SHA256_LEN), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    # "admin", "developer", "predictor", "viewer" (aimass.core.auth.roles).
    role: Mapped[str] = mapped_column(String(STATE_LEN), nullable=False)
    # Project it is scoped to; "" for every project.
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    revoke_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expire_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_use_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Token-bucket rate per service process; 0 means the configured default.
    rate_limit_per_s: Mapped[float] = mapped_column(Float, default=0.0)


class Webhook(Timestamps, Etagged, Base):
    """``webhooks/{webhook}``: POSTs matching events to a URL, signed with its secret."""

    __tablename__ = "webhooks"

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    # Subject patterns it subscribes to: ["aimass.registry.version.*"].
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # HMAC-SHA256 key of the signature header; needed in clear to sign.
    secret: Mapped[str] = mapped_column(String(128), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    creator: Mapped[str] = mapped_column(String(200), default="")

    deliveries: Mapped[list[WebhookDelivery]] = relationship(
        back_populates="webhook", cascade="all, delete-orphan", passive_deletes=True
    )


class WebhookDelivery(Base):
    """One event to deliver to one webhook, retried with backoff until it succeeds or expires."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # An event is delivered at most once per webhook, however often it arrives.
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_event"),
        # The sender's query: pending deliveries that are due.
        Index("ix_webhook_deliveries_due", "state", "next_attempt_time"),
    )

    id: Mapped[int] = _id()
    webhook_id: Mapped[int] = _fk("webhooks.id", ondelete="CASCADE")
    event_id: Mapped[str] = mapped_column(String(36), nullable=False)
    event_type: Mapped[str] = mapped_column(String(200), nullable=False)
    # The exact JSON body POSTed (and signed) on every attempt.
    body: Mapped[str] = mapped_column(Text, default="")
    # PENDING, SUCCEEDED, FAILED (gave up).
    state: Mapped[str] = mapped_column(String(STATE_LEN), default="PENDING")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)
    deliver_time: Mapped[datetime | None] = mapped_column(UtcDateTime)

    webhook: Mapped[Webhook] = relationship(back_populates="deliveries")


# ------------------------------------------------------------ pipeline service


class PipelineRun(Timestamps, Etagged, Base):
    """``pipelineRuns/{run}``: one run of a pipeline spec, stage by stage."""

    __tablename__ = "pipeline_runs"
    __table_args__ = (Index("ix_pipeline_runs_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    labels: Mapped[dict[str, Any]] = _json_dict()
    # The PipelineSpec as proto JSON.
    spec: Mapped[dict[str, Any]] = _json_dict()
    state: Mapped[str] = _state("RUNNING")
    reason: Mapped[str] = mapped_column(Text, default="")
    failed_stage: Mapped[str] = mapped_column(String(STATE_LEN), default="")
    # {"STAGE_TRAIN": {"state", "resource", "reason", "attempt", "start_time", "end_time"}}.
    stages: Mapped[dict[str, Any]] = _json_dict()
    # The PipelineSummary as proto JSON.
    summary: Mapped[dict[str, Any]] = _json_dict()
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # The resource the running stage waits for ("trainingJobs/x"): events find their run by it.
    waiting_on: Mapped[str] = mapped_column(String(REF_LEN), default="", index=True)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)


class PipelineSchedule(Timestamps, Etagged, Base):
    """``schedules/{schedule}``: a pipeline spec run every time a cron expression fires."""

    __tablename__ = "pipeline_schedules"
    __table_args__ = (Index("ix_pipeline_schedules_create_time", "create_time"),)

    id: Mapped[int] = _id()
    name: Mapped[str] = _name()
    description: Mapped[str] = mapped_column(Text, default="")
    # The project its runs belong to (per-project scoping): the creator's, set once.
    project: Mapped[str] = mapped_column(String(ID_LEN), default="", index=True)
    creator: Mapped[str] = mapped_column(String(200), default="")
    labels: Mapped[dict[str, Any]] = _json_dict()
    # The PipelineSpec as proto JSON.
    spec: Mapped[dict[str, Any]] = _json_dict()
    cron: Mapped[str] = mapped_column(String(200), default="")
    time_zone: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = _state("ACTIVE")
    # When it fires next; NULL while PAUSED. Schedulers fire a due row by compare-and-set on
    # this column, so of several pipeline replicas only one starts a given run.
    next_run_time: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    last_run: Mapped[str] = mapped_column(String(REF_LEN), default="")
    last_run_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
