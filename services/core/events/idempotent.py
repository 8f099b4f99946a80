"""Idempotent event handlers: each event's database work happens once per consumer.

Delivery is at least once, so a handler can see an event twice (redelivery
after a crash, a nak, a republish outside the duplicate window). An
:class:`IdempotentHandler` runs the handler's database work and the insert of
``ProcessedEvent(consumer, event_id)`` in one transaction: a second delivery
finds the row and does nothing, and a crash before commit leaves no row, so
the redelivered event runs the work again.

    @idempotent("registry-on-training", db)
    def on_job_succeeded(session: Session, envelope: Envelope) -> None:
        ...  # writes through session; add_event(session, ...) chains events

    await bus.subscribe("registry-on-training", ["aimass.training.job.succeeded"],
                        on_job_succeeded)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.outbox import ProcessedEvent
from aimass.core.events.envelope import Envelope, validate_name

Work = Callable[[Session, Envelope], object]


class _AlreadyProcessed(Exception):
    """Raised inside the transaction to roll it back when another delivery won."""


class IdempotentHandler:
    """An async event handler running ``work(session, envelope)`` at most once per event id."""

    def __init__(self, consumer: str, db: Database | Engine, work: Work) -> None:
        self.consumer = validate_name(consumer, "consumer")
        self.db = db if isinstance(db, Database) else Database(db)
        self.work = work

    async def __call__(self, envelope: Envelope) -> bool:
        """Handles the event in a worker thread; True if the work ran, False if a duplicate."""
        return await asyncio.to_thread(self.handle, envelope)

    def handle(self, envelope: Envelope) -> bool:
        """Synchronous form of :meth:`__call__`."""
        try:
            with self.db.session() as session:
                if session.get(ProcessedEvent, (self.consumer, envelope.id)) is not None:
                    return False
                session.add(ProcessedEvent(consumer=self.consumer, event_id=envelope.id))
                try:
                    # Claim first: a concurrent delivery of the same event blocks here
                    # (PostgreSQL) or never started (SQLite's single writer).
                    session.flush()
                except IntegrityError as err:
                    raise _AlreadyProcessed from err
                self.work(session, envelope)
        except _AlreadyProcessed:
            return False
        return True


def idempotent(consumer: str, db: Database | Engine) -> Callable[[Work], IdempotentHandler]:
    """Decorator form of :class:`IdempotentHandler`."""

    def wrap(work: Work) -> IdempotentHandler:
        return IdempotentHandler(consumer, db, work)

    return wrap


def prune_processed(session: Session, older_than: timedelta) -> int:
    """Forgets marks older than ``older_than`` (keep it past the replay horizon)."""
    result = session.execute(
        delete(ProcessedEvent).where(ProcessedEvent.process_time < utcnow() - older_than)
    )
    return int(getattr(result, "rowcount", 0) or 0)
