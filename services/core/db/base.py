"""The declarative base every ORM table of aimass derives from.

A fixed naming convention for constraints keeps alembic migrations identical
on SQLite and PostgreSQL (batch mode on SQLite needs named constraints).
ORM rows never leave a store: stores turn them into protos or domain objects.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aimass.core.db.columns import UtcDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp aimass stores is UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base of all aimass tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Timestamps:
    """create_time / update_time columns kept by the database session.

    UtcDateTime, not plain DateTime: SQLite would hand back naive datetimes.
    """

    create_time: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)
