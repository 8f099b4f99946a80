"""Subscribing to aimass events from an external program, with nothing but nats-py.

    import asyncio
    from datetime import UTC, datetime, timedelta
    from aimass.client.events import subscribe

    async def main() -> None:
        since = datetime.now(UTC) - timedelta(hours=1)          # replay the last hour
        async for envelope, payload in subscribe(
            "nats://127.0.0.1:4232", ["aimass.registry.version.*"], start_time=since
        ):
            print(envelope.topic, envelope.subject, payload)

    asyncio.run(main())

Events are ``aimass.events.v1.Envelope`` messages on the JetStream stream
AIMASS_EVENTS, subjects ``aimass.<service>.<resource>.<verb>``; the payload is
an ``Any`` of one of the messages of aimass/events/v1/events.proto. Without
``durable`` the consumer is ephemeral and ordered (it starts over on every
run, from ``start_time`` or from now); with ``durable`` the server remembers
what was acknowledged and a restarted program resumes there. Delivery is at
least once: dedupe by ``envelope.id``. See docs/events.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import nats
from google.protobuf import symbol_database
from google.protobuf.message import Message
from nats.js import api

from aimass.events.v1 import events_pb2

STREAM = "AIMASS_EVENTS"


def payload_of(envelope: events_pb2.Envelope) -> Message | None:
    """The envelope's payload as its own message type (None for a type this code lacks)."""
    name = envelope.payload.TypeName()
    try:
        message_class = symbol_database.Default().GetSymbol(name)
    except KeyError:
        return None
    message = message_class()
    envelope.payload.Unpack(message)
    return message


async def subscribe(
    nats_url: str,
    topics: Sequence[str],
    *,
    start_time: datetime | None = None,
    durable: str | None = None,
    idle_timeout_s: float | None = None,
) -> AsyncIterator[tuple[events_pb2.Envelope, Message | None]]:
    """(envelope, payload) of every event on ``topics``, acknowledged once yielded.

    ``start_time`` replays the stream from that moment (timezone-aware); otherwise
    only new events arrive (or, for a durable that exists, where it stopped).
    ``idle_timeout_s`` ends the iteration after that long without an event.
    """
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        policy = api.DeliverPolicy.BY_START_TIME if start_time else api.DeliverPolicy.NEW
        config = api.ConsumerConfig(
            deliver_policy=policy,
            opt_start_time=start_time.isoformat() if start_time else None,
            ack_policy=api.AckPolicy.EXPLICIT,
            filter_subjects=list(topics) if len(topics) > 1 else None,
            # An ephemeral consumer is removed by the server a minute after its program left.
            inactive_threshold=None if durable else 60.0,
        )
        subscription = await js.pull_subscribe(
            topics[0], durable=durable, stream=STREAM, config=config
        )
        while True:
            try:
                messages = await subscription.fetch(16, timeout=idle_timeout_s or 5.0)
            except nats.errors.TimeoutError:
                if idle_timeout_s is not None:
                    return
                continue
            for message in messages:
                envelope = events_pb2.Envelope.FromString(message.data)
                yield envelope, payload_of(envelope)
                await message.ack()
    finally:
        await client.drain()
