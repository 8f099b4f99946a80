"""Tables of the transactional outbox and of event deduplication.

A service writes its state change and the OutboxEvent row in one database
transaction; the relay (aimass.core.events.outbox) publishes unpublished rows
to NATS in ``seq`` order and marks them published. The JetStream message id is
the event id, so a row published twice (relay killed between publish and mark)
is dropped by the stream's duplicate window, and consumers dedupe again by
ProcessedEvent. Nothing acknowledged is lost; nothing is delivered twice to a
handler.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aimass.core.db.base import Base, utcnow
from aimass.core.db.columns import UtcDateTime

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")


class OutboxEvent(Base):
    """An event waiting to be (or already) published to NATS."""

    __tablename__ = "outbox_events"

    seq: Mapped[int] = mapped_column(SEQ_TYPE, primary_key=True, autoincrement=True)
    # Envelope id; also the JetStream Nats-Msg-Id header.
    event_id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    # NATS subject, "aimass.registry.version.created".
    topic: Mapped[str] = mapped_column(String(200), nullable=False)
    # Serialized aimass.events.v1.Envelope.
    envelope: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # W3C trace context of the transaction that wrote it, as "k=v\n" lines.
    trace_headers: Mapped[str] = mapped_column(Text, default="", nullable=False)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # NULL until the relay got the stream's acknowledgement.
    publish_time: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)


class ProcessedEvent(Base):
    """Marks an event as handled by one durable consumer (idempotent handlers)."""

    __tablename__ = "processed_events"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    process_time: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
