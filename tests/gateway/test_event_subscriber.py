"""The documented way for external programs to follow aimass events (aimass.client.events,
plain nats-py): replay from a point in time, filtered by subject, payload decoded."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aimass.client.events import subscribe
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2 as rpb
from tests.gateway.conftest import key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_subscriber_replays_from_a_point_in_time(secured):
    metadata = key_metadata(secured.admin_key)
    registry = secured.registry()
    start = datetime.now(UTC)
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="followed"), metadata=metadata
    )
    before = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(parent="models/followed", model_version=rpb.ModelVersion()),
        metadata=metadata,
    )
    # The outbox relay publishes after the commit: wait until the first event is in the
    # stream, so start_time falls between the two.
    async for envelope, _ in subscribe(
        secured.settings.nats_url,
        ["aimass.registry.version.created"],
        start_time=start,
        idle_timeout_s=5.0,
    ):
        if envelope.subject == before.name:
            break
    since = datetime.now(UTC)
    after = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(parent="models/followed", model_version=rpb.ModelVersion()),
        metadata=metadata,
    )
    await registry.SetAlias(
        rpb.SetAliasRequest(name="models/followed/aliases/production", version=after.version),
        metadata=metadata,
    )
    seen = []
    async for envelope, payload in subscribe(
        secured.settings.nats_url,
        ["aimass.registry.version.created"],
        start_time=since,
        idle_timeout_s=3.0,
    ):
        seen.append((envelope, payload))
        if envelope.subject == after.name:
            break
    subjects = [envelope.subject for envelope, _ in seen]
    assert after.name in subjects
    assert before.name not in subjects, "events before start_time must not be replayed"
    assert all(e.topic == "aimass.registry.version.created" for e, _ in seen)
    envelope, payload = seen[-1]
    assert isinstance(payload, events_pb2.ModelVersionCreated)
    assert payload.model_version == after.name
    assert envelope.id
