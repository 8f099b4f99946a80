"""The initial schema: every table of aimass.core.db.models.

Revision ID: 0001
Revises:
Create Date: 2026-11-29 18:17:10.066522
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Column types spelled once; the models use the same (JSONType, SEQ_TYPE, UtcDateTime).
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_DATETIME = sa.DateTime(timezone=True)

# Revision identifiers, used by alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("revoke_time", UTC_DATETIME, nullable=True),
        sa.Column("expire_time", UTC_DATETIME, nullable=True),
        sa.Column("last_use_time", UTC_DATETIME, nullable=True),
        sa.Column("rate_limit_per_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    op.create_index(op.f("ix_api_keys_project"), "api_keys", ["project"])

    op.create_table(
        "benchmarks",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("model_version", sa.String(length=300), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("results", JSON, nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=True),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_benchmarks")),
        sa.UniqueConstraint("name", name=op.f("uq_benchmarks_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_benchmarks_request_id")),
    )
    op.create_index("ix_benchmarks_create_time", "benchmarks", ["create_time"])
    op.create_index(op.f("ix_benchmarks_model_version"), "benchmarks", ["model_version"])
    op.create_index(op.f("ix_benchmarks_project"), "benchmarks", ["project"])
    op.create_index(op.f("ix_benchmarks_state"), "benchmarks", ["state"])

    op.create_table(
        "compression_policies",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=300), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compression_policies")),
        sa.UniqueConstraint("model", "name", name="uq_compression_policies_model_name"),
    )
    op.create_index(op.f("ix_compression_policies_model"), "compression_policies", ["model"])
    op.create_index(op.f("ix_compression_policies_project"), "compression_policies", ["project"])

    op.create_table(
        "datasets",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_index("ix_datasets_create_time", "datasets", ["create_time"])
    op.create_index(op.f("ix_datasets_project"), "datasets", ["project"])

    op.create_table(
        "evaluations",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("model_version", sa.String(length=300), nullable=False),
        sa.Column("dataset_version", sa.String(length=300), nullable=False),
        sa.Column("split", sa.String(length=20), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("results", JSON, nullable=False),
        sa.Column("report_uri", sa.Text(), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=True),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("name", name=op.f("uq_evaluations_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_evaluations_request_id")),
    )
    op.create_index("ix_evaluations_create_time", "evaluations", ["create_time"])
    op.create_index(op.f("ix_evaluations_model_version"), "evaluations", ["model_version"])
    op.create_index(op.f("ix_evaluations_project"), "evaluations", ["project"])
    op.create_index(op.f("ix_evaluations_state"), "evaluations", ["state"])

    op.create_table(
        "inference_servers",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("grpc_address", sa.String(length=255), nullable=False),
        sa.Column("http_address", sa.String(length=255), nullable=False),
        sa.Column("model_repository", sa.Text(), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("memory_budget_bytes", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("check_time", UTC_DATETIME, nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_servers")),
        sa.UniqueConstraint("name", name=op.f("uq_inference_servers_name")),
    )
    op.create_index(op.f("ix_inference_servers_state"), "inference_servers", ["state"])

    op.create_table(
        "job_events",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("job", sa.String(length=300), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_time", UTC_DATETIME, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
        sa.UniqueConstraint("job", "sequence", name="uq_job_events_job_sequence"),
    )
    op.create_table(
        "outbox_events",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("trace_headers", sa.Text(), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("publish_time", UTC_DATETIME, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_events_event_id")),
    )
    op.create_index(op.f("ix_outbox_events_publish_time"), "outbox_events", ["publish_time"])

    op.create_table(
        "pipeline_runs",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("failed_stage", sa.String(length=32), nullable=False),
        sa.Column("stages", JSON, nullable=False),
        sa.Column("summary", JSON, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("waiting_on", sa.String(length=300), nullable=False),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_pipeline_runs_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_pipeline_runs_request_id")),
    )
    op.create_index("ix_pipeline_runs_create_time", "pipeline_runs", ["create_time"])
    op.create_index(op.f("ix_pipeline_runs_project"), "pipeline_runs", ["project"])
    op.create_index(op.f("ix_pipeline_runs_state"), "pipeline_runs", ["state"])
    op.create_index(op.f("ix_pipeline_runs_waiting_on"), "pipeline_runs", ["waiting_on"])
    op.create_table(
        "pipeline_schedules",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("next_run_time", UTC_DATETIME, nullable=True),
        sa.Column("last_run", sa.String(length=300), nullable=False),
        sa.Column("last_run_time", UTC_DATETIME, nullable=True),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_schedules")),
        sa.UniqueConstraint("name", name=op.f("uq_pipeline_schedules_name")),
    )
    op.create_index("ix_pipeline_schedules_create_time", "pipeline_schedules", ["create_time"])
    op.create_index(
        op.f("ix_pipeline_schedules_next_run_time"), "pipeline_schedules", ["next_run_time"]
    )
    op.create_index(op.f("ix_pipeline_schedules_project"), "pipeline_schedules", ["project"])
    op.create_index(op.f("ix_pipeline_schedules_state"), "pipeline_schedules", ["state"])
    op.create_table(
        "processed_events",
        sa.Column("consumer", sa.String(length=100), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("process_time", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=op.f("pk_processed_events")),
    )
    op.create_table(
        "registered_models",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_models")),
        sa.UniqueConstraint("name", name=op.f("uq_registered_models_name")),
    )
    op.create_index("ix_registered_models_create_time", "registered_models", ["create_time"])
    op.create_index(op.f("ix_registered_models_project"), "registered_models", ["project"])

    op.create_table(
        "prediction_logs",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=300), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=False),
        sa.Column("end_time", UTC_DATETIME, nullable=False),
        sa.Column("model_versions", JSON, nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prediction_logs")),
    )
    op.create_index(
        "ix_prediction_logs_deployment_end", "prediction_logs", ["deployment", "end_time"]
    )

    op.create_table(
        "monitors",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("deployment", sa.String(length=300), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_run_time", UTC_DATETIME, nullable=True),
        sa.Column("last_report", JSON, nullable=False),
        sa.Column("firing", JSON, nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitors")),
        sa.UniqueConstraint("name", name=op.f("uq_monitors_name")),
    )
    op.create_index(op.f("ix_monitors_deployment"), "monitors", ["deployment"])
    op.create_index(op.f("ix_monitors_next_run_time"), "monitors", ["next_run_time"])
    op.create_index(op.f("ix_monitors_project"), "monitors", ["project"])

    op.create_table(
        "monitor_alerts",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("monitor_id", SEQ, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("rule", sa.String(length=63), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("feature", sa.String(length=300), nullable=False),
        sa.Column("fire_time", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["monitor_id"],
            ["monitors.id"],
            name=op.f("fk_monitor_alerts_monitor_id_monitors"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_alerts")),
        sa.UniqueConstraint("monitor_id", "name", name="uq_monitor_alerts_name"),
    )
    op.create_index(op.f("ix_monitor_alerts_monitor_id"), "monitor_alerts", ["monitor_id"])
    op.create_index(op.f("ix_monitor_alerts_fire_time"), "monitor_alerts", ["fire_time"])

    op.create_table(
        "monitored_batches",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("deployment", sa.String(length=300), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=False),
        sa.Column("end_time", UTC_DATETIME, nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitored_batches")),
        sa.UniqueConstraint("event_id", name=op.f("uq_monitored_batches_event_id")),
    )
    op.create_index(
        "ix_monitored_batches_deployment_end", "monitored_batches", ["deployment", "end_time"]
    )

    op.create_table(
        "training_jobs",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("dataset_version", sa.String(length=300), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=True),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("worker", sa.String(length=126), nullable=False),
        sa.Column("heartbeat_time", UTC_DATETIME, nullable=True),
        sa.Column("checkpoint_uri", sa.Text(), nullable=False),
        sa.Column("result_version", sa.String(length=300), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("parent_id", SEQ, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("target_model", sa.String(length=300), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["training_jobs.id"],
            name=op.f("fk_training_jobs_parent_id_training_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_jobs")),
        sa.UniqueConstraint("name", name=op.f("uq_training_jobs_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_training_jobs_request_id")),
    )
    op.create_index("ix_training_jobs_create_time", "training_jobs", ["create_time"])
    op.create_index(op.f("ix_training_jobs_dataset_version"), "training_jobs", ["dataset_version"])
    op.create_index(op.f("ix_training_jobs_parent_id"), "training_jobs", ["parent_id"])
    op.create_index(op.f("ix_training_jobs_project"), "training_jobs", ["project"])
    op.create_index(op.f("ix_training_jobs_target_model"), "training_jobs", ["target_model"])
    op.create_index(
        "ix_training_jobs_state_priority", "training_jobs", ["state", "priority", "create_time"]
    )

    op.create_table(
        "uploads",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=True),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("temp_uri", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("expire_time", UTC_DATETIME, nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("name", name=op.f("uq_uploads_name")),
    )
    op.create_index(op.f("ix_uploads_expire_time"), "uploads", ["expire_time"])
    op.create_index(op.f("ix_uploads_state"), "uploads", ["state"])

    op.create_table(
        "webhooks",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", JSON, nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.UniqueConstraint("name", name=op.f("uq_webhooks_name")),
    )
    op.create_index(op.f("ix_webhooks_project"), "webhooks", ["project"])

    op.create_table(
        "workers",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=126), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("capabilities", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("current_job", sa.String(length=300), nullable=False),
        sa.Column("heartbeat_time", UTC_DATETIME, nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("name", name=op.f("uq_workers_name")),
    )
    op.create_index(op.f("ix_workers_heartbeat_time"), "workers", ["heartbeat_time"])
    op.create_index(op.f("ix_workers_state"), "workers", ["state"])

    op.create_table(
        "alias_moves",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("model_id", SEQ, nullable=False),
        sa.Column("alias", sa.String(length=63), nullable=False),
        sa.Column("old_version", sa.Integer(), nullable=False),
        sa.Column("new_version", sa.Integer(), nullable=False),
        sa.Column("moved_by", sa.String(length=200), nullable=False),
        sa.Column("move_time", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["registered_models.id"],
            name=op.f("fk_alias_moves_model_id_registered_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_moves")),
    )
    op.create_index("ix_alias_moves_model_alias", "alias_moves", ["model_id", "alias", "move_time"])

    op.create_table(
        "compression_jobs",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("source_version", sa.String(length=300), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=126), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=True),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("result_version", sa.String(length=300), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("policy_id", SEQ, nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["compression_policies.id"],
            name=op.f("fk_compression_jobs_policy_id_compression_policies"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compression_jobs")),
        sa.UniqueConstraint("name", name=op.f("uq_compression_jobs_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_compression_jobs_request_id")),
    )
    op.create_index("ix_compression_jobs_create_time", "compression_jobs", ["create_time"])
    op.create_index(op.f("ix_compression_jobs_policy_id"), "compression_jobs", ["policy_id"])
    op.create_index(op.f("ix_compression_jobs_project"), "compression_jobs", ["project"])
    op.create_index(
        op.f("ix_compression_jobs_source_version"), "compression_jobs", ["source_version"]
    )
    op.create_index(
        "ix_compression_jobs_state_priority",
        "compression_jobs",
        ["state", "priority", "create_time"],
    )

    op.create_table(
        "dataset_versions",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("dataset_id", SEQ, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("source_format", sa.String(length=20), nullable=False),
        sa.Column("schema", JSON, nullable=False),
        sa.Column("split_row_counts", JSON, nullable=False),
        sa.Column("label_column", sa.String(length=200), nullable=False),
        sa.Column("label_distribution", JSON, nullable=False),
        sa.Column("statistics", JSON, nullable=False),
        sa.Column("split_uris", JSON, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_versions_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_versions")),
        sa.UniqueConstraint("dataset_id", "request_id", name="uq_dataset_versions_request_id"),
        sa.UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_version"),
    )
    op.create_index("ix_dataset_versions_create_time", "dataset_versions", ["create_time"])
    op.create_index(op.f("ix_dataset_versions_fingerprint"), "dataset_versions", ["fingerprint"])
    op.create_index(op.f("ix_dataset_versions_state"), "dataset_versions", ["state"])

    op.create_table(
        "deployments",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("servers", JSON, nullable=False),
        sa.Column("routes", JSON, nullable=False),
        sa.Column("shadow", JSON, nullable=False),
        sa.Column("serving_config", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("server_id", SEQ, nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["server_id"],
            ["inference_servers.id"],
            name=op.f("fk_deployments_server_id_inference_servers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint("name", name=op.f("uq_deployments_name")),
    )
    op.create_index("ix_deployments_create_time", "deployments", ["create_time"])
    op.create_index(op.f("ix_deployments_project"), "deployments", ["project"])
    op.create_index(op.f("ix_deployments_server_id"), "deployments", ["server_id"])
    op.create_index(op.f("ix_deployments_state"), "deployments", ["state"])

    op.create_table(
        "model_versions",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("model_id", SEQ, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("signature", JSON, nullable=False),
        sa.Column("framework", sa.String(length=40), nullable=False),
        sa.Column("opset", sa.Integer(), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("model_card", sa.Text(), nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=True),
        sa.Column("source_dataset_version", sa.String(length=300), nullable=False),
        sa.Column("source_job", sa.String(length=300), nullable=False),
        sa.Column("parent_version_id", SEQ, nullable=True),
        sa.Column("derivation", sa.String(length=60), nullable=False),
        sa.Column("imported_lineage", JSON, nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["registered_models.id"],
            name=op.f("fk_model_versions_model_id_registered_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("model_id", "request_id", name="uq_model_versions_request_id"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )
    op.create_index("ix_model_versions_create_time", "model_versions", ["create_time"])
    op.create_index(
        op.f("ix_model_versions_parent_version_id"), "model_versions", ["parent_version_id"]
    )
    op.create_index(
        op.f("ix_model_versions_source_dataset_version"),
        "model_versions",
        ["source_dataset_version"],
    )
    op.create_index(op.f("ix_model_versions_source_job"), "model_versions", ["source_job"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("webhook_id", SEQ, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_time", UTC_DATETIME, nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("deliver_time", UTC_DATETIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_event"),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_time"]
    )

    op.create_table(
        "aliases",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("model_id", SEQ, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id", "version"],
            ["model_versions.model_id", "model_versions.version"],
            name="fk_aliases_version_model_versions",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["registered_models.id"],
            name=op.f("fk_aliases_model_id_registered_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("model_id", "name", name="uq_aliases_model_name"),
    )
    op.create_table(
        "ingest_jobs",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("dataset_id", SEQ, nullable=False),
        sa.Column("dataset_version_id", SEQ, nullable=True),
        sa.Column("upload_id", SEQ, nullable=True),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("start_time", UTC_DATETIME, nullable=True),
        sa.Column("end_time", UTC_DATETIME, nullable=True),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.Column("etag", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_ingest_jobs_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["dataset_version_id"],
            ["dataset_versions.id"],
            name=op.f("fk_ingest_jobs_dataset_version_id_dataset_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["upload_id"],
            ["uploads.id"],
            name=op.f("fk_ingest_jobs_upload_id_uploads"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_jobs")),
        sa.UniqueConstraint("name", name=op.f("uq_ingest_jobs_name")),
        sa.UniqueConstraint("request_id", name=op.f("uq_ingest_jobs_request_id")),
    )
    op.create_index("ix_ingest_jobs_create_time", "ingest_jobs", ["create_time"])
    op.create_index(op.f("ix_ingest_jobs_dataset_id"), "ingest_jobs", ["dataset_id"])
    op.create_index(
        op.f("ix_ingest_jobs_dataset_version_id"), "ingest_jobs", ["dataset_version_id"]
    )
    op.create_index(op.f("ix_ingest_jobs_state"), "ingest_jobs", ["state"])
    op.create_index(op.f("ix_ingest_jobs_upload_id"), "ingest_jobs", ["upload_id"])

    op.create_table(
        "model_artifacts",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("version_id", SEQ, nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_artifacts_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_artifacts")),
        sa.UniqueConstraint("version_id", "file_name", name="uq_model_artifacts_version_file"),
    )
    op.create_index(op.f("ix_model_artifacts_sha256"), "model_artifacts", ["sha256"])

    op.create_table(
        "releases",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("version_id", SEQ, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("bundle_uri", sa.Text(), nullable=False),
        sa.Column("bundle_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=False),
        sa.Column("create_time", UTC_DATETIME, nullable=False),
        sa.Column("update_time", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_releases_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_releases")),
        sa.UniqueConstraint("version_id", "name", name="uq_releases_version_name"),
    )
    op.create_table(
        "version_metrics",
        sa.Column("id", SEQ, autoincrement=True, nullable=False),
        sa.Column("version_id", SEQ, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("lower", sa.Float(), nullable=True),
        sa.Column("upper", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_version_metrics_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_version_metrics")),
        sa.UniqueConstraint("version_id", "source", "name", name="uq_version_metrics_version_name"),
    )
    op.create_index("ix_version_metrics_name_value", "version_metrics", ["name", "value"])

    op.create_table(
        "version_tags",
        sa.Column("version_id", SEQ, nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_version_tags_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "key", name=op.f("pk_version_tags")),
    )
    op.create_index("ix_version_tags_key_value", "version_tags", ["key", "value"])


def downgrade() -> None:
    # Indexes and constraints go with their tables; children before parents.
    op.drop_table("version_tags")
    op.drop_table("monitor_alerts")
    op.drop_table("monitors")
    op.drop_table("monitored_batches")
    op.drop_table("prediction_logs")
    op.drop_table("version_metrics")
    op.drop_table("releases")
    op.drop_table("model_artifacts")
    op.drop_table("ingest_jobs")
    op.drop_table("aliases")
    op.drop_table("webhook_deliveries")
    op.drop_table("model_versions")
    op.drop_table("deployments")
    op.drop_table("dataset_versions")
    op.drop_table("compression_jobs")
    op.drop_table("alias_moves")
    op.drop_table("workers")
    op.drop_table("webhooks")
    op.drop_table("uploads")
    op.drop_table("training_jobs")
    op.drop_table("registered_models")
    op.drop_table("pipeline_schedules")
    op.drop_table("pipeline_runs")
    op.drop_table("processed_events")
    op.drop_table("outbox_events")
    op.drop_table("job_events")
    op.drop_table("inference_servers")
    op.drop_table("evaluations")
    op.drop_table("datasets")
    op.drop_table("compression_policies")
    op.drop_table("benchmarks")
    op.drop_table("api_keys")
