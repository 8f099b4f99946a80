"""Migrations: up to head and down to base, models == migrations, check_at_head, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

import aimass.core.db.models  # noqa: F401  (every table on Base.metadata)
from aimass.core.db import migrate
from aimass.core.db.base import Base
from aimass.core.db.engine import make_engine
from aimass.core.errors import FailedPrecondition

EXPECTED_TABLES = set(Base.metadata.tables)


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_metadata_holds_every_resource_table():
    # The outbox tables come with the models; a sample of each service's tables.
    assert {
        "outbox_events",
        "processed_events",
        "datasets",
        "dataset_versions",
        "training_jobs",
        "job_events",
        "evaluations",
        "compression_jobs",
        "registered_models",
        "model_versions",
        "version_metrics",
        "aliases",
        "deployments",
        "api_keys",
        "webhook_deliveries",
        "pipeline_schedules",
    } <= EXPECTED_TABLES


def test_upgrade_creates_every_table_and_downgrade_removes_them(db_url):
    assert migrate.current_revision(db_url) is None

    migrate.upgrade(db_url)

    assert migrate.current_revision(db_url) == migrate.head_revision()
    assert table_names(db_url) == EXPECTED_TABLES | {"alembic_version"}

    migrate.downgrade(db_url, "base")

    assert migrate.current_revision(db_url) is None
    assert table_names(db_url) <= {"alembic_version"}


def test_upgrade_twice_changes_nothing(db_url):
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == migrate.head_revision()


def test_models_and_migrations_agree(migrated_db_url):
    engine = make_engine(migrated_db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_check_at_head_accepts_a_migrated_database(migrated_db_url):
    migrate.check_at_head(migrated_db_url)


def test_check_at_head_refuses_an_empty_database(db_url):
    with pytest.raises(FailedPrecondition, match=r"code expects 0001: run `aimass db upgrade`"):
        migrate.check_at_head(db_url)


def test_check_at_head_refuses_a_schema_of_another_revision(migrated_db_url):
    engine = make_engine(migrated_db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '0000old'"))
    finally:
        engine.dispose()

    with pytest.raises(FailedPrecondition) as caught:
        migrate.check_at_head(migrated_db_url)
    assert "database schema is at 0000old, code expects 0001" in caught.value.message


@pytest.mark.slow
def test_two_processes_upgrading_at_once_both_succeed(db_url):
    # Services of the embedded stack may start together: the lock (advisory on
    # PostgreSQL, BEGIN IMMEDIATE on SQLite) makes the second find the work done.
    command = [sys.executable, "-m", "aimass.core.db.migrate", "--url", db_url, "upgrade"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], results
    assert migrate.current_revision(db_url) == migrate.head_revision()


def test_threads_upgrading_at_once_both_succeed(db_url):
    # alembic keeps its context in module globals; upgrade() serializes callers.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(db_url)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert migrate.current_revision(db_url) == migrate.head_revision()


def test_scripts_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert migrate.head_revision() == "0001"
    assert (migrate.script_location() / "env.py").is_file()


def test_command_line_upgrade_current_check_downgrade(db_url, capsys):
    assert migrate.main(["--url", db_url, "check"]) == 1
    assert "run `aimass db upgrade`" in capsys.readouterr().err

    assert migrate.main(["--url", db_url, "upgrade"]) == 0
    assert migrate.main(["--url", db_url, "current"]) == 0
    assert migrate.main(["--url", db_url, "check"]) == 0
    out = capsys.readouterr().out
    assert "database at 0001" in out
    assert "0001\n" in out

    assert migrate.main(["--url", db_url, "downgrade", "base"]) == 0
    assert migrate.current_revision(db_url) is None


FAILING_REVISION = '''
"""A revision that fails half way."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
    op.execute("SELECT * FROM no_such_table")


def downgrade():
    op.drop_table("half_done")
'''


def test_a_failing_migration_leaves_the_schema_as_it_was(db_url, tmp_path):
    # The whole upgrade is one transaction on both databases: 0001 and the
    # first half of 0002 are rolled back together.
    scripts = tmp_path / "scripts"
    shutil.copytree(
        migrate.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__")
    )
    (scripts / "versions" / "0002_fails.py").write_text(FAILING_REVISION)
    config = Config()
    config.set_main_option("script_location", str(scripts))
    engine = make_engine(db_url, sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            with pytest.raises(DBAPIError, match="no_such_table"):
                command.upgrade(config, "head")
    finally:
        engine.dispose()

    assert migrate.current_revision(db_url) is None
    assert table_names(db_url) <= {"alembic_version"}
