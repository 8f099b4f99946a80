"""The bus rides out a restart of the NATS server: publishing and consuming resume."""

from __future__ import annotations

import pytest
from event_support import eventually

from aimass.core.errors import Unavailable
from aimass.core.events import EVENTS_STREAM, Envelope, EventBus, build_envelope
from aimass.events.v1 import events_pb2
from tests.fixtures.nats import NatsServer

TOPIC = "aimass.data.version.ready"


def ready(name: str) -> events_pb2.DatasetVersionReady:
    return events_pb2.DatasetVersionReady(dataset_version=name)


async def publish_until_stored(bus: EventBus, name: str) -> Envelope:
    """Publishes one envelope, retrying while the client reconnects (as the relay does).

    The same envelope each time: if an ack was lost, the stream drops the copy.
    """
    envelope = build_envelope(TOPIC, ready(name), subject=name, source="data")

    async def attempt() -> bool:
        try:
            await bus.publish_envelope(envelope)
        except Unavailable:
            return False
        return True

    await eventually(attempt, timeout_s=30.0)
    return envelope


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_publish_and_consume_resume_after_server_restart(
    nats_server: NatsServer, kill: bool
) -> None:
    bus = await EventBus.connect(
        nats_server.url, "test-reconnect", reconnect_time_wait_s=0.1, request_timeout_s=1.0
    )
    try:
        await bus.ensure_streams()
        seen: list[str] = []

        async def handler(envelope: Envelope) -> None:
            seen.append(envelope.subject)

        await bus.subscribe("survivor", [TOPIC], handler)
        await bus.publish(TOPIC, ready("before"), subject="before", source="data")
        await eventually(lambda: seen == ["before"])

        nats_server.restart(kill=kill)

        await publish_until_stored(bus, "after")
        await eventually(lambda: seen == ["before", "after"], timeout_s=30.0)
        assert bus.is_connected
        info = await bus.js.stream_info(EVENTS_STREAM)
        assert info.state.messages == 2
    finally:
        await bus.close()
