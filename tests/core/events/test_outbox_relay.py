"""The transactional outbox: nothing lost, nothing doubled, whatever the relay's crash point."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

import pytest
from event_procs import TOPIC, Widget, write_widgets
from event_support import Proc, eventually
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import func, select, update

from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.outbox import OutboxEvent
from aimass.core.errors import InvalidArgument
from aimass.core.events import (
    EVENTS_STREAM,
    Envelope,
    EventBus,
    OutboxRelay,
    Subscription,
    add_event,
)
from aimass.core.events.outbox import AFTER_PUBLISH, BEFORE_PUBLISH
from aimass.events.v1 import events_pb2
from tests.fixtures.nats import NatsServer


def rows(db: Database) -> list[tuple[int, str, bool]]:
    """(seq, event_id, published) of every outbox row, in seq order."""
    with db.session(read_only=True) as session:
        query = select(OutboxEvent.seq, OutboxEvent.event_id, OutboxEvent.publish_time)
        return [
            (seq, event_id, published is not None)
            for seq, event_id, published in session.execute(query.order_by(OutboxEvent.seq))
        ]


def count_widgets(db: Database) -> int:
    with db.session(read_only=True) as session:
        return int(session.execute(select(func.count()).select_from(Widget)).scalar_one())


async def stream_messages(bus: EventBus) -> int:
    return int((await bus.js.stream_info(EVENTS_STREAM)).state.messages)


async def collect(bus: EventBus, durable: str) -> tuple[list[str], Subscription]:
    """A downstream consumer recording every event id it is handed, duplicates included."""
    seen: list[str] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(envelope.id)

    return seen, await bus.subscribe(durable, [TOPIC], handler)


async def assert_seen_exactly_once(
    seen: list[str], subscription: Subscription, expected: list[str]
) -> None:
    await eventually(lambda: len(seen) >= len(expected))

    async def settled() -> bool:
        info = await subscription.consumer_info()
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(settled)
    assert seen == expected
    info = await subscription.consumer_info()
    assert info.delivered.consumer_seq == len(expected)
    assert info.num_redelivered == 0


def test_event_rolls_back_with_the_state_change(sqlite_db: Database) -> None:
    def failing_service_call() -> None:
        with sqlite_db.session() as session:
            session.add(Widget(name="doomed"))
            payload = events_pb2.DatasetVersionReady()
            add_event(session, TOPIC, payload, subject="w", source="t")
            raise RuntimeError("the service failed after writing")

    with pytest.raises(RuntimeError, match="after writing"):
        failing_service_call()
    assert rows(sqlite_db) == []
    assert count_widgets(sqlite_db) == 0


@pytest.mark.parametrize("topic", ["registry.created", "aimass.a.*", "aimassjobs"])
def test_add_event_validates_the_topic(sqlite_db: Database, topic: str) -> None:
    payload = events_pb2.DatasetVersionReady()
    with sqlite_db.session() as session, pytest.raises(InvalidArgument, match="topic"):
        add_event(session, topic, payload, subject="", source="")


def test_add_event_accepts_a_job_topic(sqlite_db: Database) -> None:
    with sqlite_db.session() as session:
        payload = events_pb2.TrainingJobFailed(job="trainingJobs/1")
        add_event(session, "aimassjobs.training", payload, subject="trainingJobs/1", source="t")
    assert len(rows(sqlite_db)) == 1


async def test_relay_publishes_in_order_and_continues_the_trace(
    bus: EventBus, any_db: Database
) -> None:
    tracer = TracerProvider().get_tracer("test")
    traces: list[int] = []

    async def handler(envelope: Envelope) -> None:
        traces.append(trace.get_current_span().get_span_context().trace_id)

    await bus.subscribe("tracer", [TOPIC], handler)
    with tracer.start_as_current_span("create widgets") as span:
        write_widgets(any_db, 3)
        trace_id = span.get_span_context().trace_id

    relay = OutboxRelay(any_db, bus)
    assert await relay.drain() == 3
    await relay.stop()

    assert [published for _, _, published in rows(any_db)] == [True] * 3
    stored = [await bus.js.get_msg(EVENTS_STREAM, n) for n in (1, 2, 3)]
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [e for _, e, _ in rows(any_db)]
    await eventually(lambda: len(traces) == 3)
    assert traces == [trace_id] * 3


async def test_commit_wakes_the_relay_at_once(bus: EventBus, sqlite_db: Database) -> None:
    # A poll interval no test waits out: only the commit hook can wake it.
    relay = OutboxRelay(sqlite_db, bus, poll_interval_s=3600)
    relay.watch()
    relay.start()
    try:
        await asyncio.to_thread(write_widgets, sqlite_db, 2)
        await eventually(lambda: all(published for _, _, published in rows(sqlite_db)))
    finally:
        await relay.stop()
    assert await stream_messages(bus) == 2


async def test_relay_retries_while_nats_is_down(
    nats_server: NatsServer, sqlite_db: Database
) -> None:
    bus = await EventBus.connect(
        nats_server.url, "test-relay", reconnect_time_wait_s=0.1, request_timeout_s=0.5
    )
    await bus.ensure_streams()
    relay = OutboxRelay(sqlite_db, bus, poll_interval_s=0.1, backoff_max_s=0.2)
    relay.start()
    try:
        nats_server.stop()
        write_widgets(sqlite_db, 3)

        def attempted() -> bool:
            with sqlite_db.session(read_only=True) as session:
                return bool(session.scalar(select(func.max(OutboxEvent.attempts))))

        await eventually(attempted)
        assert not any(published for _, _, published in rows(sqlite_db))

        nats_server.start()
        await eventually(lambda: all(p for _, _, p in rows(sqlite_db)), timeout_s=30)
        assert await stream_messages(bus) == 3
    finally:
        await relay.stop()
        await bus.close()


@pytest.mark.parametrize("crash_at", [BEFORE_PUBLISH, AFTER_PUBLISH])
async def test_relay_killed_mid_batch_loses_and_doubles_nothing(
    bus: EventBus,
    nats_url: str,
    any_db: Database,
    procs: list[Proc],
    crash_at: str,
) -> None:
    seen, subscription = await collect(bus, "downstream")
    url = any_db.engine.url.render_as_string(hide_password=False)
    relay_proc = await Proc.spawn(
        "relay", "--nats", nats_url, "--db", url, "--events", "5", "--batch", "2",
        "--crash-at", crash_at, "--crash-seq", "3",
    )  # fmt: skip
    procs.append(relay_proc)

    await relay_proc.line_starting("written")
    assert await relay_proc.line_starting("dying") == f"dying at {crash_at} 3"
    assert await relay_proc.wait() == -signal.SIGKILL

    # The state changes are all committed; the first batch (1, 2) was marked.
    assert count_widgets(any_db) == 5
    assert [published for _, _, published in rows(any_db)] == [True, True, False, False, False]
    assert await stream_messages(bus) == (2 if crash_at == BEFORE_PUBLISH else 3)

    relay = OutboxRelay(any_db, bus)
    assert await relay.drain() == 3
    await relay.stop()

    assert all(published for _, _, published in rows(any_db))
    assert await stream_messages(bus) == 5
    await assert_seen_exactly_once(seen, subscription, [event for _, event, _ in rows(any_db)])


async def test_concurrent_relays_publish_every_row_once(bus: EventBus, any_db: Database) -> None:
    write_widgets(any_db, 40)
    published: list[int] = []

    def record(point: str, seq: int) -> None:
        if point == AFTER_PUBLISH:
            published.append(seq)

    relays = [OutboxRelay(any_db, bus, batch_size=5, fault_hook=record) for _ in range(3)]
    await asyncio.gather(*(relay.drain() for relay in relays))
    for relay in relays:
        await relay.stop()

    assert all(done for _, _, done in rows(any_db))
    assert await stream_messages(bus) == 40
    assert sorted(set(published)) == list(range(1, 41))
    if any_db.engine.dialect.name == "postgresql":
        # SKIP LOCKED: no row is ever claimed by two relays.
        assert len(published) == 40


async def test_prune_deletes_only_old_published_rows(bus: EventBus, sqlite_db: Database) -> None:
    write_widgets(sqlite_db, 3)
    relay = OutboxRelay(sqlite_db, bus, batch_size=2, retention_s=3600)
    assert await relay.relay_once() == 2
    with sqlite_db.session() as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.seq == 1)
            .values(publish_time=utcnow() - timedelta(hours=2))
        )

    assert await relay.prune() == 1
    await relay.stop()
    assert [(seq, published) for seq, _, published in rows(sqlite_db)] == [
        (2, True),
        (3, False),
    ]
