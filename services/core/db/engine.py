"""Engines, the one managed session scope, and database errors mapped to ours.

Stores are synchronous classes; services call them with
``await asyncio.to_thread(store.method, ...)``. Each call opens its own
session with :meth:`Database.session` (the session maker is thread-safe, no
scoped globals), which commits on success, rolls back on error, always closes,
and turns database errors into aimass errors:

    sqlalchemy IntegrityError
        unique / primary key  -> AlreadyExists
        foreign key           -> FailedPrecondition
        not null / check      -> InvalidArgument
    lost connection, server down, database locked or busy -> Unavailable
    serialization failure, deadlock                       -> Aborted (retry)
    missing table or column                               -> FailedPrecondition
    anything else (a bug)                                 -> left as is (INTERNAL)

SQLite: WAL so readers never block the writer, foreign keys on, a busy timeout
so several processes can share the file, and transactions begun by SQLAlchemy
(``BEGIN IMMEDIATE`` for writers: a deferred transaction that reads and then
writes can fail at once with "database is locked", whatever the timeout).
PostgreSQL through psycopg 3, with pre-ping and UTC sessions.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from aimass.core.errors import (
    Aborted,
    AimassError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)

# Milliseconds a SQLite connection waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000
UPGRADE_HINT = "run `aimass db upgrade`"
# Execution option read by the "begin" hook: how a SQLite transaction begins.
_SQLITE_BEGIN = "aimass_sqlite_begin"


def normalize_url(url: str | URL) -> URL:
    """The SQLAlchemy URL aimass connects with: plain ``postgresql://`` means psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, configured for aimass.

    ``sqlite_foreign_keys=False`` is for migrations only: batch-mode table
    rebuilds on SQLite drop and recreate tables other tables refer to.
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, foreign_keys=sqlite_foreign_keys)
    if backend == "postgresql":
        return _postgresql_engine(parsed)
    raise InvalidArgument(
        "database_url", f"must be a sqlite:// or postgresql:// URL, not {backend}"
    )


def _is_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def _sqlite_engine(url: URL, *, foreign_keys: bool) -> Engine:
    memory = _is_memory(url)
    if not memory:
        # The default database lives under $AIMASS_HOME, which may not exist yet.
        Path(url.database or "").expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        # One connection shared by every thread: in-memory databases are for
        # single-threaded tests only; files get a normal pool.
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (see _begin); sqlite3's own
        # transaction handling never wraps SELECTs and cannot BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                # Durable at each checkpoint, and WAL keeps the file consistent.
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _postgresql_engine(url: URL) -> Engine:
    # Timestamps come back in UTC whatever the server's TimeZone is; options
    # already in the URL (a search_path) are kept.
    given = url.query.get("options", "")
    options = " ".join([*(given if isinstance(given, tuple) else [given]), "-c timezone=UTC"])
    return create_engine(url, pool_pre_ping=True, connect_args={"options": options.strip()})


class Database:
    """An engine and its session maker: the one way aimass code opens a session.

    Safe to share between threads; every :meth:`session` call is its own
    session and transaction.
    """

    def __init__(self, url_or_engine: str | URL | Engine) -> None:
        self.engine = (
            url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
        )
        # Rows stay readable after commit: stores turn them into entities
        # after the transaction without another round trip.
        self._writer = sessionmaker(bind=self.engine, expire_on_commit=False)
        reader_engine = self.engine.execution_options(
            **{_SQLITE_BEGIN: "DEFERRED", "postgresql_readonly": True}
        )
        self._reader = sessionmaker(bind=reader_engine, expire_on_commit=False)

    @property
    def url(self) -> URL:
        """The URL the engine connects to."""
        return self.engine.url

    @contextmanager
    def session(self, *, read_only: bool = False, resource: str | None = None) -> Iterator[Session]:
        """A session in one transaction: commit on success, rollback on error, close always.

        ``read_only`` sessions may not write (PostgreSQL refuses, SQLite
        does not take the write lock so they never wait on writers).
        ``resource`` names what the block works on ("models/foo"), so a
        constraint violation reads "models/foo already exists".
        """
        maker = self._reader if read_only else self._writer
        with map_db_errors(resource), maker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Closes every pooled connection (end of a test, shutdown of a process)."""
        self.engine.dispose()


@contextmanager
def map_db_errors(resource: str | None = None) -> Iterator[None]:
    """Turns SQLAlchemy errors raised inside the block into aimass errors.

    ``resource`` is the name used in messages; without it the message names
    the table and columns the database reported.
    """
    try:
        yield
    except IntegrityError as err:
        raise _integrity_error(err, resource) from err
    except DBAPIError as err:
        mapped = _operational_error(err)
        if mapped is None:
            raise
        raise mapped from err


def _operational_error(err: DBAPIError) -> AimassError | None:
    """Our error for a failure of the database rather than of the statement; None otherwise
    (a bug: it stays a SQLAlchemy error and becomes INTERNAL)."""
    missing = _missing_schema_object(err)
    if missing:
        return FailedPrecondition(f"database schema has no {missing}: {UPGRADE_HINT}")
    sqlstate = getattr(err.orig, "sqlstate", None) or ""
    sqlite_name = getattr(err.orig, "sqlite_errorname", "") or ""
    if sqlstate in _PG_CONFLICT_STATES:
        return Aborted(f"the transaction lost a race with another one: retry ({_first_line(err)})")
    if (
        err.connection_invalidated
        or sqlstate.startswith(_PG_UNAVAILABLE_PREFIXES)
        # psycopg reports a refused or broken connection without a SQLSTATE.
        or (isinstance(err, OperationalError) and not sqlstate and not sqlite_name)
        or sqlite_name.startswith(_SQLITE_UNAVAILABLE_PREFIXES)
    ):
        return Unavailable(f"database unavailable: {_first_line(err)}")
    return None


# PostgreSQL: connection exceptions (08), operator intervention (57P0x),
# insufficient resources (53).
_PG_UNAVAILABLE_PREFIXES = ("08", "57P0", "53")
# Serialization failure and deadlock: the caller may retry the whole call.
_PG_CONFLICT_STATES = ("40001", "40P01")
_SQLITE_UNAVAILABLE_PREFIXES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_READONLY",
)


# SQLSTATE classes of PostgreSQL's integrity errors.
_PG_KINDS = {
    "23505": "unique",
    "23503": "foreign_key",
    "23502": "not_null",
    "23514": "check",
}
_SQLITE_KINDS = {
    "SQLITE_CONSTRAINT_UNIQUE": "unique",
    "SQLITE_CONSTRAINT_PRIMARYKEY": "unique",
    "SQLITE_CONSTRAINT_FOREIGNKEY": "foreign_key",
    "SQLITE_CONSTRAINT_NOTNULL": "not_null",
    "SQLITE_CONSTRAINT_CHECK": "check",
}


def _integrity_error(
    err: IntegrityError, resource: str | None
) -> AlreadyExists | FailedPrecondition | InvalidArgument:
    orig = err.orig
    sqlstate = getattr(orig, "sqlstate", None)
    kind = _PG_KINDS.get(sqlstate or "") or _SQLITE_KINDS.get(
        getattr(orig, "sqlite_errorname", ""), "other"
    )
    where = _where(orig)
    if kind == "unique":
        return AlreadyExists(f"{resource or where} already exists")
    if kind == "foreign_key":
        return FailedPrecondition(_foreign_key_message(orig, resource or where))
    column = _column_of(orig)
    if kind == "not_null":
        return InvalidArgument(column or "resource", f"is required ({resource or where})")
    if kind == "check":
        return InvalidArgument(column or "resource", f"violates a rule of {resource or where}")
    return FailedPrecondition(f"{resource or where}: {_first_line(err)}")


def _foreign_key_message(orig: Any, subject: str) -> str:
    text = str(orig)
    if "update or delete on table" in text:
        return f"{subject} cannot be deleted or changed: other resources still refer to it"
    if "insert or update on table" in text:
        return f"{subject} refers to a resource that does not exist"
    # SQLite does not say which side of the reference failed.
    return (
        f"{subject}: a resource it refers to does not exist, or other resources still refer to it"
    )


def _where(orig: Any) -> str:
    """'registered_models (name)=(foo)' on PostgreSQL, 'registered_models.name' on SQLite."""
    diag = getattr(orig, "diag", None)
    if diag is not None:
        table = diag.table_name or "a row"
        detail = diag.message_detail or ""
        key = re.search(r"Key (\(.*?\)=\(.*?\))", detail)
        return f"{table} {key.group(1)}" if key else table
    match = re.search(r"constraint failed: (.+)$", str(orig))
    return match.group(1) if match else "the row"


def _column_of(orig: Any) -> str | None:
    diag = getattr(orig, "diag", None)
    if diag is not None and diag.column_name:
        return str(diag.column_name)
    match = re.search(r"NOT NULL constraint failed: \w+\.(\w+)", str(orig))
    return match.group(1) if match else None


def _missing_schema_object(err: DBAPIError) -> str | None:
    text = str(err.orig)
    match = re.search(r"no such (table|column): (\S+)", text)
    if match:
        return f"{match.group(1)} {match.group(2)}"
    if getattr(err.orig, "sqlstate", None) in ("42P01", "42703"):
        match = re.search(r"(relation|column) (\"?[\w.]+\"?) does not exist", text)
        return f"{match.group(1)} {match.group(2)}" if match else "table it needs"
    return None


def _first_line(err: DBAPIError) -> str:
    return str(err.orig).strip().splitlines()[0] if str(err.orig).strip() else type(err).__name__
