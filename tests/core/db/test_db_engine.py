"""Engines and the managed session: configuration, commit/rollback, errors mapped to ours."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from aimass.core.db.engine import Database, make_engine, map_db_errors, normalize_url
from aimass.core.db.models import JobEvent, RegisteredModel
from aimass.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)


def test_sqlite_engine_uses_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30000}


def test_sqlite_engine_creates_the_folder_of_its_file(tmp_path):
    path = tmp_path / "home" / "nested" / "aimass.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert path.exists()


def test_plain_postgresql_urls_mean_psycopg_3():
    assert normalize_url("postgresql://u@h:5432/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_other_databases_are_refused():
    with pytest.raises(InvalidArgument, match="database_url"):
        make_engine("mysql://u@h/d")


def test_session_commits_on_success(database):
    with database.session() as session:
        session.add(RegisteredModel(name="digits"))

    with database.session(read_only=True) as session:
        names = session.scalars(select(RegisteredModel.name)).all()
    assert names == ["digits"]


def test_session_rolls_back_when_the_block_raises(database):
    class Boom(Exception):
        pass

    def add_then_fail() -> None:
        with database.session() as session:
            session.add(RegisteredModel(name="digits"))
            session.flush()
            raise Boom

    with pytest.raises(Boom):
        add_then_fail()

    with database.session(read_only=True) as session:
        assert session.scalars(select(RegisteredModel)).all() == []


def test_duplicate_name_is_already_exists_naming_the_resource(database):
    with database.session() as session:
        session.add(RegisteredModel(name="digits"))

    with (
        pytest.raises(AlreadyExists, match=r"^models/digits already exists$"),
        database.session(resource="models/digits") as session,
    ):
        session.add(RegisteredModel(name="digits"))


def test_duplicate_without_a_resource_names_table_and_column(database):
    with database.session() as session:
        session.add(RegisteredModel(name="digits"))

    with pytest.raises(AlreadyExists) as caught, database.session() as session:
        session.add(RegisteredModel(name="digits"))
    assert "registered_models" in caught.value.message
    assert "name" in caught.value.message


def test_map_db_errors_maps_a_flush_inside_the_block(database):
    with database.session() as session:
        session.add(JobEvent(job="trainingJobs/a", sequence=1, event_time=_now(), kind="log"))

    def add_again(session) -> None:
        with map_db_errors("trainingJobs/a event 1"):
            session.add(JobEvent(job="trainingJobs/a", sequence=1, event_time=_now(), kind="log"))
            session.flush()

    with database.session() as session:
        with pytest.raises(AlreadyExists, match="trainingJobs/a event 1"):
            add_again(session)
        session.rollback()


def test_missing_required_value_is_invalid_argument(database):
    with pytest.raises(InvalidArgument) as caught, database.session() as session:
        session.add(JobEvent(job="trainingJobs/a", sequence=1, event_time=_now(), kind=None))
    assert caught.value.violations[0].field == "kind"


def test_a_database_without_tables_is_failed_precondition(db_url):
    database = Database(db_url)
    try:
        with (
            pytest.raises(FailedPrecondition, match="run `aimass db upgrade`"),
            database.session(read_only=True) as session,
        ):
            session.scalars(select(RegisteredModel)).all()
    finally:
        database.dispose()


def test_an_unreachable_server_is_unavailable():
    # Port 9 (discard) is closed on loopback: the connection is refused.
    database = Database("postgresql://postgres@127.0.0.1:9/none?connect_timeout=2")
    try:
        with (
            pytest.raises(Unavailable, match="database unavailable"),
            database.session() as session,
        ):
            session.execute(text("SELECT 1"))
    finally:
        database.dispose()


@pytest.mark.postgres
def test_read_only_sessions_cannot_write_on_postgresql(pg_schema_url):
    from aimass.core.db.migrate import upgrade

    upgrade(pg_schema_url)
    database = Database(pg_schema_url)
    try:
        with pytest.raises(Exception, match="read-only"), database.session(read_only=True) as s:
            s.add(RegisteredModel(name="digits"))
        # The connection goes back to the pool writable.
        with database.session() as session:
            session.add(RegisteredModel(name="digits"))
    finally:
        database.dispose()


def test_timestamps_come_back_aware_and_in_utc(database):
    paris = timezone(timedelta(hours=2))
    when = datetime(2030, 5, 1, 14, 0, tzinfo=paris)
    with database.session() as session:
        session.add(JobEvent(job="trainingJobs/a", sequence=1, event_time=when, kind="log"))

    with database.session(read_only=True) as session:
        stored = session.scalars(select(JobEvent.event_time)).one()
    assert stored == when
    assert stored.tzinfo is not None
    assert stored.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(database):
    naive = JobEvent(job="trainingJobs/a", sequence=1, event_time=datetime(2030, 1, 1), kind="l")
    with pytest.raises(Exception, match="naive datetime"), database.session() as session:
        session.add(naive)


async def test_sessions_from_many_threads_serialize_read_modify_write(database):
    # Stores run in threads (asyncio.to_thread). A counter bumped under
    # SELECT ... FOR UPDATE (BEGIN IMMEDIATE on SQLite) loses no increment.
    with database.session() as session:
        session.add(RegisteredModel(name="digits"))

    def bump(times: int) -> None:
        for _ in range(times):
            with database.session() as session:
                model = session.scalars(
                    select(RegisteredModel)
                    .where(RegisteredModel.name == "digits")
                    .with_for_update()
                ).one()
                model.latest_version = model.latest_version + 1

    await asyncio.gather(*(asyncio.to_thread(bump, 10) for _ in range(6)))

    with database.session(read_only=True) as session:
        model = session.scalars(select(RegisteredModel)).one()
    assert model.latest_version == 60


def _now() -> datetime:
    return datetime.now(UTC)
