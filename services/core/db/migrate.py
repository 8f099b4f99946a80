"""Schema migrations of the metadata store, driven from Python (no alembic.ini needed).

Services call :func:`check_at_head` when they start and refuse to serve an
old (or newer) schema; an operator runs ``aimass db upgrade`` or::

    python -m aimass.core.db.migrate upgrade [--url URL] [--revision head]
    python -m aimass.core.db.migrate downgrade REVISION [--url URL]
    python -m aimass.core.db.migrate current [--url URL]

The URL defaults to the aimass settings (AIMASS_DATABASE_URL, else the
SQLite file under AIMASS_HOME).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL

import aimass.migrations
from aimass.core.db.engine import UPGRADE_HINT, make_engine, map_db_errors
from aimass.core.errors import AimassError, FailedPrecondition

# alembic's `context` and `op` are module globals: one command at a time per
# process. Other processes are kept out by the lock taken in env.py.
_ALEMBIC_LOCK = threading.Lock()


def script_location() -> Path:
    """The folder of env.py and versions/, found from the installed package, whatever the cwd."""
    return Path(aimass.migrations.__file__).resolve().parent


def alembic_config() -> Config:
    """An alembic Config that needs no ini file."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config


def _migration_engine(url: str | URL) -> Engine:
    # Batch migrations on SQLite rebuild tables: foreign keys must be off meanwhile.
    return make_engine(url, sqlite_foreign_keys=False)


def _run(url: str | URL, action: str, revision: str) -> None:
    engine = _migration_engine(url)
    config = alembic_config()
    try:
        with _ALEMBIC_LOCK, map_db_errors(), engine.connect() as connection:
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
            connection.commit()
    finally:
        engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrates the schema up to ``revision`` (all of it by default), in one transaction."""
    _run(url, "upgrade", revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrates the schema down to ``revision`` ("base" removes every table)."""
    _run(url, "downgrade", revision)


def head_revision() -> str:
    """The revision this code expects the database to be at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration scripts under {script_location()}")
    return head


def current_revision(url: str | URL) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = _migration_engine(url)
    try:
        with map_db_errors(), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def check_at_head(url: str | URL) -> None:
    """Raises FailedPrecondition unless the database schema is the one this code expects."""
    current = current_revision(url)
    expected = head_revision()
    if current != expected:
        raise FailedPrecondition(
            f"database schema is at {current or 'no revision (empty database)'}, "
            f"code expects {expected}: {UPGRADE_HINT}"
        )


def _default_url() -> str:
    from aimass.core.settings import load_settings

    return load_settings().database_url


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m aimass.core.db.migrate", description="Migrate the aimass metadata store."
    )
    parser.add_argument("--url", help="SQLAlchemy URL (default: from the aimass settings)")
    actions = parser.add_subparsers(dest="action", required=True)
    up = actions.add_parser("upgrade", help="migrate up (to head by default)")
    up.add_argument("--revision", default="head")
    down = actions.add_parser("downgrade", help="migrate down to a revision ('base': empty)")
    down.add_argument("revision")
    actions.add_parser("current", help="print the revision the database is at")
    actions.add_parser("check", help="exit 1 unless the database is at head")
    args = parser.parse_args(argv)
    url = args.url or _default_url()
    try:
        if args.action == "upgrade":
            upgrade(url, args.revision)
            print(f"database at {current_revision(url)}")
        elif args.action == "downgrade":
            downgrade(url, args.revision)
            print(f"database at {current_revision(url) or 'base'}")
        elif args.action == "current":
            print(current_revision(url) or "base")
        else:
            check_at_head(url)
            print(f"database at head ({head_revision()})")
    except AimassError as err:
        print(err.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
