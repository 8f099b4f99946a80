"""aimass.core.db.engine when PostgreSQL drops its connections (``pg_terminate_backend``):
a statement cut off mid-flight raises Unavailable (the caller's UNAVAILABLE, never a raw
SQLAlchemy error that would become INTERNAL), a write cut off rolls back whole, and pooled
connections killed while idle are replaced by pre-ping before the next session uses them.
The process-level variant is test_database_connection_drop.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from aimass.core.db.engine import Database
from aimass.core.errors import Unavailable
from tests.faults.procs import terminate_backends

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg(pg_schema_url: str) -> Iterator[Database]:
    database = Database(pg_schema_url)
    with database.session() as session:
        session.execute(text("CREATE TABLE items (id integer PRIMARY KEY)"))
    yield database
    database.dispose()


def backend_pid(database: Database) -> int:
    with database.session(read_only=True) as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def count_items(database: Database) -> int:
    with database.session(read_only=True) as session:
        return int(session.execute(text("SELECT count(*) FROM items")).scalar_one())


def terminate_when_waiting(db_url: str, started: threading.Event) -> threading.Thread:
    """Kills the database's backends once ``started`` is set (the statement is running)."""

    def run() -> None:
        started.wait(10)
        time.sleep(0.3)  # let the statement reach the server
        terminate_backends(db_url)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_idle_pooled_connections_killed_are_replaced_before_use(
    pg: Database, pg_schema_url: str
) -> None:
    before = backend_pid(pg)  # one connection, now idle in the pool

    assert terminate_backends(pg_schema_url) >= 1

    # Pre-ping finds the pooled connection dead and opens a new one: no error surfaces.
    assert count_items(pg) == 0
    assert backend_pid(pg) != before


def sleep_in_read(database: Database, started: threading.Event) -> None:
    with database.session(read_only=True) as session:
        started.set()
        session.execute(text("SELECT pg_sleep(10)"))


def write_then_sleep(database: Database, started: threading.Event) -> None:
    with database.session() as session:
        session.execute(text("INSERT INTO items (id) VALUES (1), (2)"))
        started.set()
        session.execute(text("SELECT pg_sleep(10)"))
        session.execute(text("INSERT INTO items (id) VALUES (3)"))


def test_statement_cut_off_mid_flight_is_unavailable(pg: Database, pg_schema_url: str) -> None:
    started = threading.Event()
    killer = terminate_when_waiting(pg_schema_url, started)
    with pytest.raises(Unavailable) as caught:
        sleep_in_read(pg, started)
    killer.join(10)

    assert "database unavailable" in caught.value.message
    assert count_items(pg) == 0  # the next session works


def test_write_cut_off_mid_transaction_leaves_nothing_behind(
    pg: Database, pg_schema_url: str
) -> None:
    started = threading.Event()
    killer = terminate_when_waiting(pg_schema_url, started)
    with pytest.raises(Unavailable):
        write_then_sleep(pg, started)
    killer.join(10)

    assert count_items(pg) == 0
