"""Streams are created idempotently and brought in line when their config changes."""

from __future__ import annotations

import pytest
from nats.js import api

from aimass.core.errors import FailedPrecondition
from aimass.core.events import EVENTS_STREAM, JOBS_STREAM, EventBus, StreamSettings
from aimass.core.events.bus import changed_stream_fields


@pytest.fixture
async def raw_bus(nats_url: str):
    """A bus whose streams the test creates itself."""
    connected = await EventBus.connect(nats_url, "test-streams")
    yield connected
    await connected.close()


async def test_streams_are_created_once_then_left_alone(raw_bus: EventBus) -> None:
    assert await raw_bus.ensure_streams() == {EVENTS_STREAM: "created", JOBS_STREAM: "created"}
    assert await raw_bus.ensure_streams() == {
        EVENTS_STREAM: "unchanged",
        JOBS_STREAM: "unchanged",
    }

    events = (await raw_bus.js.stream_info(EVENTS_STREAM)).config
    jobs = (await raw_bus.js.stream_info(JOBS_STREAM)).config
    assert events.subjects == ["aimass.>"]
    assert events.retention == api.RetentionPolicy.LIMITS
    assert events.storage == api.StorageType.FILE
    assert events.duplicate_window == 120.0
    assert jobs.subjects == ["aimassjobs.>"]
    assert jobs.retention == api.RetentionPolicy.WORK_QUEUE


async def test_changed_config_updates_only_that_stream(raw_bus: EventBus) -> None:
    await raw_bus.ensure_streams()
    changed = StreamSettings(events_max_age_s=3600.0)

    # duplicate_window must not exceed max_age; both streams share the window.
    assert await raw_bus.ensure_streams(changed) == {
        EVENTS_STREAM: "updated",
        JOBS_STREAM: "unchanged",
    }
    assert (await raw_bus.js.stream_info(EVENTS_STREAM)).config.max_age == 3600.0
    assert await raw_bus.ensure_streams(changed) == {
        EVENTS_STREAM: "unchanged",
        JOBS_STREAM: "unchanged",
    }


async def test_stream_edited_by_hand_is_restored(raw_bus: EventBus) -> None:
    await raw_bus.ensure_streams()
    config = (await raw_bus.js.stream_info(EVENTS_STREAM)).config
    await raw_bus.js.update_stream(config.evolve(duplicate_window=5.0))

    assert (await raw_bus.ensure_streams())[EVENTS_STREAM] == "updated"
    assert (await raw_bus.js.stream_info(EVENTS_STREAM)).config.duplicate_window == 120.0


async def test_unchangeable_field_fails_with_the_field_named(raw_bus: EventBus) -> None:
    await raw_bus.ensure_streams()
    in_memory = StreamSettings(storage=api.StorageType.MEMORY)

    with pytest.raises(FailedPrecondition, match="storage"):
        await raw_bus.ensure_streams(in_memory)


async def test_overlapping_foreign_stream_fails_with_the_reason(raw_bus: EventBus) -> None:
    await raw_bus.js.add_stream(name="SQUATTER", subjects=["aimass.data.>"])

    with pytest.raises(FailedPrecondition, match=f"stream {EVENTS_STREAM}: cannot create"):
        await raw_bus.ensure_streams()


def test_changed_fields_ignore_subject_order_and_float_noise() -> None:
    desired = api.StreamConfig(name="S", subjects=["a.>", "b.>"], max_age=1.0)
    current = api.StreamConfig(name="S", subjects=["b.>", "a.>"], max_age=1.0000000001)
    assert changed_stream_fields(current, desired) == []
    assert changed_stream_fields(current.evolve(max_bytes=10), desired) == ["max_bytes"]
