"""Processes the event tests kill with SIGKILL: a consumer, a job worker, an outbox relay.

Run as a script (``python event_procs.py <command> ...``). Each prints one
line per step it reaches and flushes, so a test knows exactly where the
process is before it kills it; the relay kills itself at a named point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aimass.core.db.engine import Database
from aimass.core.events import ConsumerOptions, Envelope, EventBus, OutboxRelay, add_event
from aimass.events.v1 import events_pb2

TOPIC = "aimass.test.widget.created"


class ScratchTables(DeclarativeBase):
    """Tables of the tests only, kept out of aimass's own metadata."""


class Widget(ScratchTables):
    """The "state change" a test service commits together with its event."""

    __tablename__ = "test_widgets"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)


def say(line: str) -> None:
    print(line, flush=True)


async def consume(args: argparse.Namespace) -> None:
    """Takes events and never acks them: the test kills it mid-handler."""
    bus = await EventBus.connect(args.nats, "test-consumer")

    async def hang(envelope: Envelope) -> None:
        say(f"got {envelope.id}")
        await asyncio.Event().wait()

    options = ConsumerOptions(ack_wait_s=args.ack_wait, batch=1)
    await bus.subscribe(args.durable, [args.topic], hang, options=options)
    say("subscribed")
    await asyncio.Event().wait()


async def work(args: argparse.Namespace) -> None:
    """Pulls one job and hangs holding it without heartbeats."""
    bus = await EventBus.connect(args.nats, "test-worker")
    queue = await bus.job_queue(args.kind, ack_wait_s=args.ack_wait)
    say("ready")
    while (job := await queue.pull(timeout_s=5.0)) is None:
        pass
    say(f"job {job.name} {job.num_delivered}")
    await asyncio.Event().wait()


def write_widgets(db: Database, count: int) -> None:
    """Commits ``count`` widgets, each with its event, one transaction each."""
    for index in range(count):
        name = f"widget-{index}"
        with db.session() as session:
            session.add(Widget(name=name))
            payload = events_pb2.DatasetVersionReady(dataset_version=name)
            add_event(session, TOPIC, payload, subject=name, source="test")


async def relay(args: argparse.Namespace) -> None:
    """Writes widgets, then relays them, SIGKILLing itself at (crash_at, crash_seq)."""
    db = Database(args.db)
    write_widgets(db, args.events)
    say("written")

    def crash(point: str, seq: int) -> None:
        if point == args.crash_at and seq == args.crash_seq:
            say(f"dying at {point} {seq}")
            os.kill(os.getpid(), signal.SIGKILL)

    bus = await EventBus.connect(args.nats, "test-relay")
    outbox = OutboxRelay(db, bus, batch_size=args.batch, fault_hook=crash)
    published = await outbox.drain()
    say(f"published {published}")
    await outbox.stop()
    await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    consumer = commands.add_parser("consume")
    consumer.add_argument("--nats", required=True)
    consumer.add_argument("--durable", required=True)
    consumer.add_argument("--topic", required=True)
    consumer.add_argument("--ack-wait", type=float, default=1.0)
    worker = commands.add_parser("work")
    worker.add_argument("--nats", required=True)
    worker.add_argument("--kind", required=True)
    worker.add_argument("--ack-wait", type=float, default=1.0)
    relayer = commands.add_parser("relay")
    relayer.add_argument("--nats", required=True)
    relayer.add_argument("--db", required=True)
    relayer.add_argument("--events", type=int, required=True)
    relayer.add_argument("--batch", type=int, default=100)
    relayer.add_argument("--crash-at", default="")
    relayer.add_argument("--crash-seq", type=int, default=0)
    args = parser.parse_args()
    runner = {"consume": consume, "work": work, "relay": relay}[args.command]
    asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
