"""Alembic environment of the aimass metadata store.

Run programmatically by aimass.core.db.migrate, which hands over an open
connection in ``config.attributes["connection"]``; or by the alembic command
line (migrations/alembic.ini), which takes the URL from ``-x url=...`` or the
aimass settings.

- SQLite: batch mode (``render_as_batch``), since SQLite cannot ALTER most
  things, and foreign key enforcement off while tables are rebuilt.
- The whole upgrade runs in one transaction on both databases (SQLite and
  PostgreSQL both have transactional DDL): a failed migration leaves the
  schema where it was.
- PostgreSQL: a transaction-scoped advisory lock, so two processes upgrading at
  once run one after the other and the second finds nothing left to do.
"""

from __future__ import annotations

import logging.config
from typing import Any

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.types import TypeDecorator

import aimass.core.db.models  # noqa: F401  (registers every table on Base.metadata)
from aimass.core.db.base import Base
from aimass.core.db.engine import make_engine

# Any 64-bit number, the same in every aimass process.
MIGRATION_LOCK_ID = 0x61696D617373  # "aimass"

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Writes our TypeDecorators as their plain SQLAlchemy type, so a migration
    never imports application code that may change after it was written."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        impl = obj.impl_instance
        module = "sa" if type(impl).__module__.startswith("sqlalchemy.sql") else None
        if module:
            return f"sa.{impl!r}"
    return False


def database_url() -> str:
    """-x url=... from the command line, else the URL of the aimass settings."""
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    from aimass.core.settings import load_settings

    return load_settings().database_url


def configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        # SQLite's DDL is transactional once SQLAlchemy emits BEGIN itself, as
        # make_engine arranges; alembic assumes otherwise unless told.
        transactional_ddl=True,
        compare_type=True,
        render_item=render_item,
    )


def run_in_transaction(connection: Connection) -> None:
    configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


def run_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        run_in_transaction(given)
        return
    engine = make_engine(database_url(), sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            run_in_transaction(connection)
            connection.commit()
    finally:
        engine.dispose()


def run_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


# Only the command line configures logging; a service running migrations
# keeps its own logging setup.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
