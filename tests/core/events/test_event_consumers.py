"""Durable consumers survive a crashed process; idempotent handlers apply an event once."""

from __future__ import annotations

import signal

import pytest
from event_procs import Widget
from event_support import Proc, eventually
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimass.core.db.engine import Database
from aimass.core.db.outbox import ProcessedEvent
from aimass.core.events import (
    ConsumerOptions,
    Envelope,
    EventBus,
    IdempotentHandler,
    build_envelope,
    idempotent,
)
from aimass.events.v1 import events_pb2

TOPIC = "aimass.registry.version.created"


def created(name: str) -> events_pb2.DatasetVersionReady:
    return events_pb2.DatasetVersionReady(dataset_version=name)


async def test_event_of_a_killed_consumer_goes_to_its_successor(
    bus: EventBus, nats_url: str, procs: list[Proc]
) -> None:
    doomed = await Proc.spawn(
        "consume", "--nats", nats_url, "--durable", "indexer", "--topic", TOPIC, "--ack-wait", "1"
    )
    procs.append(doomed)
    await doomed.line_starting("subscribed")
    sent = await bus.publish(TOPIC, created("v1"), subject="models/m/versions/1", source="t")

    assert await doomed.line_starting("got") == f"got {sent.id}"
    assert await doomed.kill() == -signal.SIGKILL

    received: list[tuple[str, int]] = []

    async def handler(envelope: Envelope) -> None:
        received.append((envelope.id, len(received)))

    successor = await bus.subscribe(
        "indexer", [TOPIC], handler, options=ConsumerOptions(ack_wait_s=1.0)
    )
    await eventually(lambda: received)
    assert [event_id for event_id, _ in received] == [sent.id]

    async def settled() -> bool:
        info = await successor.consumer_info()
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled)
    info = await successor.consumer_info()
    assert info.num_redelivered == 0  # nothing left out for redelivery
    assert info.delivered.consumer_seq >= 2  # once to the dead process, once to us


def count_widgets(db: Database) -> int:
    with db.session(read_only=True) as session:
        return int(session.execute(select(func.count()).select_from(Widget)).scalar_one())


async def test_event_delivered_twice_is_applied_once(bus: EventBus, sqlite_db: Database) -> None:
    @idempotent("widget-maker", sqlite_db)
    def make_widget(session: Session, envelope: Envelope) -> None:
        session.add(Widget(name=f"w-{envelope.id}"))

    await bus.subscribe("widget-maker", [TOPIC], make_widget)
    envelope = build_envelope(TOPIC, created("v1"), subject="x", source="t")
    data = envelope.SerializeToString()
    # Two copies with different message ids, as after a republish outside the duplicate window.
    await bus.publish_raw(TOPIC, data, msg_id="copy-1")
    await bus.publish_raw(TOPIC, data, msg_id="copy-2")
    other = await bus.publish(TOPIC, created("v2"), subject="y", source="t")

    def processed() -> set[str]:
        with sqlite_db.session(read_only=True) as session:
            return set(session.scalars(select(ProcessedEvent.event_id)))

    await eventually(lambda: processed() == {envelope.id, other.id})
    await eventually(lambda: _all_acked(bus, "widget-maker", 3))
    assert count_widgets(sqlite_db) == 2


async def _all_acked(bus: EventBus, durable: str, count: int) -> bool:
    info = await bus.js.consumer_info("AIMASS_EVENTS", durable)
    return info.ack_floor.stream_seq == count and info.num_ack_pending == 0


def test_work_that_fails_leaves_no_mark_so_the_retry_runs_it(sqlite_db: Database) -> None:
    attempts: list[int] = []

    def fragile(session: Session, envelope: Envelope) -> None:
        session.add(Widget(name="only-once"))
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("crash before commit")

    handler = IdempotentHandler("fragile", sqlite_db, fragile)
    envelope = build_envelope(TOPIC, created("v1"), subject="x", source="t")

    with pytest.raises(RuntimeError, match="crash before commit"):
        handler.handle(envelope)
    assert count_widgets(sqlite_db) == 0
    assert handler.handle(envelope) is True
    assert handler.handle(envelope) is False
    assert count_widgets(sqlite_db) == 1
    assert len(attempts) == 2


def test_consumers_dedupe_independently(sqlite_db: Database) -> None:
    ran: list[str] = []
    first = IdempotentHandler("first", sqlite_db, lambda s, e: ran.append("first"))
    second = IdempotentHandler("second", sqlite_db, lambda s, e: ran.append("second"))
    envelope = build_envelope(TOPIC, created("v1"), subject="x", source="t")

    assert [first.handle(envelope), second.handle(envelope), first.handle(envelope)] == [
        True,
        True,
        False,
    ]
    assert ran == ["first", "second"]
