"""Fixtures of the event tests: a connected bus, SQLite and PostgreSQL databases, subprocesses."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from event_support import Proc, create_tables
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from aimass.core.db.engine import Database
from aimass.core.events import EventBus

PG_URL = os.environ.get("AIMASS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    """A bus on a fresh server with both streams created."""
    connected = await EventBus.connect(nats_url, "test", reconnect_time_wait_s=0.2)
    await connected.ensure_streams()
    try:
        yield connected
    finally:
        await connected.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite file database holding the outbox tables."""
    db = Database(f"sqlite:///{tmp_path / 'events.db'}")
    create_tables(db)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def pg_db() -> Iterator[Database]:
    """A PostgreSQL database in a schema of its own (skipped when no server answers)."""
    schema = f"test_events_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as err:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {err}")
    options = f"-csearch_path%3D{schema}%20-ctimezone%3DUTC"
    db = Database(f"{PG_URL}?options={options}")
    create_tables(db)
    try:
        yield db
    finally:
        db.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_db(request: pytest.FixtureRequest) -> Database:
    """Each outbox test runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    """Collects spawned helpers and kills any left running at the end of the test."""
    spawned: list[Proc] = []
    yield spawned
    for proc in spawned:
        await proc.kill()
