"""Column types and mixins shared by the tables of models.py.

- :class:`UtcDateTime`: a timestamp that is always timezone-aware UTC in Python,
  on SQLite (which stores no offset) as on PostgreSQL (timestamptz).
- :data:`JSONType`: JSON on SQLite, JSONB on PostgreSQL (comparable, indexable).
  In-place changes of a loaded JSON value are not tracked: assign a new value.
- :class:`Etagged`: an ``etag`` column renewed on every ORM update, for optimistic
  concurrency (AIP-154). :func:`require_etag` checks the etag a caller sent.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, String, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, Mapper, mapped_column
from sqlalchemy.types import TypeDecorator

from aimass.core.errors import Aborted

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """DateTime(timezone=True) that binds and returns aware UTC datetimes.

    SQLite keeps no offset, so values are converted to UTC before they are
    written (comparisons between stored values stay right) and come back
    tagged as UTC. A naive datetime is refused: its zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given: aimass stores UTC only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def new_etag() -> str:
    """A fresh opaque etag. Random, not a content hash: two updates that end in
    the same content still get distinct etags, so a stale writer always loses."""
    return uuid.uuid4().hex


class Etagged:
    """Adds an ``etag`` column that changes on every ORM update of the row.

    Core ``update()`` statements bypass ORM events: they must set
    ``etag=new_etag()`` themselves (the usual compare-and-swap
    ``update(T).where(T.etag == old).values(..., etag=new_etag())``).
    """

    etag: Mapped[str] = mapped_column(String(32), default=new_etag)


@event.listens_for(Etagged, "before_update", propagate=True)
def _renew_etag(mapper: Mapper[Any], connection: Any, target: Etagged) -> None:
    # before_update also fires for rows whose only change is a relationship
    # collection; the etag names the row's own content, so it moves with
    # any flush that touches the row (callers compare it, never parse it).
    target.etag = new_etag()


def require_etag(resource: str, current: str, expected: str) -> None:
    """Raises Aborted when the caller sent an etag and it is not the current one.

    An empty ``expected`` means "no concurrency check", as in AIP-154.
    """
    if expected and expected != current:
        raise Aborted(
            f"{resource} was changed by someone else (etag {expected!r} is stale): "
            "read it again and retry"
        )
