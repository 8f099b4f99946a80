"""Envelopes on the bus: building, publishing with trace context, consuming, retries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from event_support import eventually
from nats.js import api
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from aimass.core.errors import InvalidArgument
from aimass.core.events import (
    EVENTS_STREAM,
    MSG_ID_HEADER,
    ConsumerOptions,
    Envelope,
    EventBus,
    build_envelope,
    decode_envelope,
    unpack,
)
from aimass.core.events.envelope import UndecodableEvent
from aimass.events.v1 import events_pb2

TOPIC = "aimass.training.job.succeeded"


def succeeded(job: str = "trainingJobs/1") -> events_pb2.TrainingJobSucceeded:
    return events_pb2.TrainingJobSucceeded(
        job=job, model_version="models/digits/versions/3", metrics={"accuracy": 0.97}
    )


def test_envelope_carries_type_source_subject_and_payload() -> None:
    payload = succeeded()
    envelope = build_envelope(TOPIC, payload, subject="trainingJobs/1", source="training")

    assert uuid.UUID(envelope.id).version == 4
    assert envelope.type == "aimass.events.v1.TrainingJobSucceeded"
    assert (envelope.source, envelope.subject, envelope.topic) == (
        "training",
        "trainingJobs/1",
        TOPIC,
    )
    assert envelope.time.ToDatetime(UTC).year >= 2024
    assert unpack(envelope, events_pb2.TrainingJobSucceeded) == payload
    assert decode_envelope(envelope.SerializeToString()) == envelope


def test_unpack_names_the_type_mismatch() -> None:
    envelope = build_envelope(TOPIC, succeeded(), subject="j", source="training")
    with pytest.raises(InvalidArgument, match="TrainingJobSucceeded"):
        unpack(envelope, events_pb2.TrainingJobFailed)


@pytest.mark.parametrize("data", [b"\xff\xff\xff", Envelope(type="x").SerializeToString()])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableEvent):
        decode_envelope(data)


@pytest.mark.parametrize(
    "topic",
    ["training.job.succeeded", "aimass", "aimass.", "aimass.a..b", "aimass.*.x", "aimassjobs.x"],
)
async def test_publish_rejects_topics_outside_the_event_namespace(
    bus: EventBus, topic: str
) -> None:
    with pytest.raises(InvalidArgument, match="topic"):
        await bus.publish(topic, succeeded(), subject="j", source="training")


async def test_round_trip_keeps_envelope_msg_id_and_trace(bus: EventBus) -> None:
    tracer = TracerProvider().get_tracer("test")
    received: list[tuple[Envelope, int]] = []

    async def handler(envelope: Envelope) -> None:
        received.append((envelope, trace.get_current_span().get_span_context().trace_id))

    await bus.subscribe("roundtrip", [TOPIC], handler)
    with tracer.start_as_current_span("train") as span:
        sent = await bus.publish(TOPIC, succeeded(), subject="trainingJobs/1", source="training")
        trace_id = span.get_span_context().trace_id

    await eventually(lambda: received)
    envelope, handler_trace_id = received[0]
    assert envelope == sent
    assert handler_trace_id == trace_id

    stored = await bus.js.get_msg(EVENTS_STREAM, 1)
    assert stored.headers is not None
    assert stored.headers[MSG_ID_HEADER] == sent.id
    assert f"{trace_id:032x}" in stored.headers["traceparent"]


async def test_same_event_published_twice_is_stored_once(bus: EventBus) -> None:
    envelope = build_envelope(TOPIC, succeeded(), subject="j", source="training")
    first = await bus.publish_envelope(envelope)
    second = await bus.publish_envelope(envelope)

    assert second.duplicate
    assert second.seq == first.seq
    info = await bus.js.stream_info(EVENTS_STREAM)
    assert info.state.messages == 1


async def test_failing_handler_gets_the_event_again(bus: EventBus) -> None:
    deliveries: list[str] = []

    async def flaky(envelope: Envelope) -> None:
        deliveries.append(envelope.id)
        if len(deliveries) < 3:
            raise RuntimeError("downstream not ready")

    options = ConsumerOptions(retry_delay_s=0.05)
    subscription = await bus.subscribe("flaky", [TOPIC], flaky, options=options)
    sent = await bus.publish(TOPIC, succeeded(), subject="j", source="training")

    async def acked() -> bool:
        info = await subscription.consumer_info()
        return info.ack_floor is not None and info.ack_floor.stream_seq == 1

    await eventually(acked)
    assert deliveries == [sent.id] * 3


async def test_undecodable_message_is_terminated_not_handled(bus: EventBus) -> None:
    handled: list[str] = []

    async def handler(envelope: Envelope) -> None:
        handled.append(envelope.id)

    subscription = await bus.subscribe("strict", ["aimass.>"], handler)
    await bus.js.publish("aimass.junk.thing.created", b"\xff\xfe not a proto")
    sent = await bus.publish(TOPIC, succeeded(), subject="j", source="training")

    async def both_settled() -> bool:
        info = await subscription.consumer_info()
        return info.num_ack_pending == 0 and info.delivered.stream_seq == 2

    await eventually(both_settled)
    assert handled == [sent.id]
    info = await subscription.consumer_info()
    assert info.num_redelivered == 0


async def test_topics_filter_what_a_consumer_sees(bus: EventBus) -> None:
    seen: list[str] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(envelope.topic)

    topics = ["aimass.training.job.failed", "aimass.registry.>"]
    await bus.subscribe("filtered", topics, handler)
    for topic in ["aimass.training.job.succeeded", *topics[:1], "aimass.registry.version.created"]:
        await bus.publish(topic, succeeded(), subject="j", source="test")

    await eventually(lambda: len(seen) == 2)
    assert seen == ["aimass.training.job.failed", "aimass.registry.version.created"]


async def test_replay_from_a_point_in_time(bus: EventBus) -> None:
    await bus.publish(TOPIC, succeeded("trainingJobs/old"), subject="old", source="training")
    # The server stamped the first message before it acked it; same host, same clock.
    between = datetime.now(UTC)
    newer = [
        await bus.publish(TOPIC, succeeded(f"trainingJobs/{n}"), subject=str(n), source="t")
        for n in range(2)
    ]
    seen: list[str] = []

    async def handler(envelope: Envelope) -> None:
        seen.append(envelope.id)

    await bus.subscribe("replayer", [TOPIC], handler, start_time=between)

    await eventually(lambda: len(seen) == 2)
    assert seen == [envelope.id for envelope in newer]


def test_replay_needs_a_start_time_for_by_start_time() -> None:
    from aimass.core.events.bus import consumer_config

    with pytest.raises(InvalidArgument, match="start_time"):
        consumer_config("d", [TOPIC], api.DeliverPolicy.BY_START_TIME, None, ConsumerOptions())


@pytest.mark.parametrize(("durable", "topics"), [("a.b", [TOPIC]), ("ok", []), ("ok", TOPIC)])
async def test_subscribe_names_the_bad_field(bus: EventBus, durable: str, topics) -> None:
    async def handler(envelope: Envelope) -> None:
        return None

    with pytest.raises(InvalidArgument):
        await bus.subscribe(durable, topics, handler)
