"""Events of aimass: NATS JetStream bus, job queue, idempotent handlers, transactional outbox.

    bus = await EventBus.connect(settings, "registry")
    await bus.ensure_streams()
    await bus.publish("aimass.registry.version.created", payload, subject=name, source="registry")
    await bus.subscribe("evaluation-on-registry", ["aimass.registry.>"], handler)

Services that change state publish through the outbox (:func:`add_event` in
the same transaction, an :class:`OutboxRelay` task per process), never with a
bare ``publish`` after commit.
"""

from __future__ import annotations

from aimass.core.events.bus import (
    ConsumerOptions,
    EventBus,
    Handler,
    StreamSettings,
    Subscription,
)
from aimass.core.events.envelope import (
    EVENTS_STREAM,
    JOBS_STREAM,
    MSG_ID_HEADER,
    Envelope,
    UndecodableEvent,
    build_envelope,
    decode_envelope,
    unpack,
)
from aimass.core.events.idempotent import IdempotentHandler, idempotent, prune_processed
from aimass.core.events.jobs import Job, JobQueue, job_topic
from aimass.core.events.outbox import OutboxRelay, add_event

__all__ = [
    "EVENTS_STREAM",
    "JOBS_STREAM",
    "MSG_ID_HEADER",
    "ConsumerOptions",
    "Envelope",
    "EventBus",
    "Handler",
    "IdempotentHandler",
    "Job",
    "JobQueue",
    "OutboxRelay",
    "StreamSettings",
    "Subscription",
    "UndecodableEvent",
    "add_event",
    "build_envelope",
    "decode_envelope",
    "idempotent",
    "job_topic",
    "prune_processed",
    "unpack",
]
