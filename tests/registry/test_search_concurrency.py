"""Search by tag, metric threshold and alias; 8 concurrent creators; version events."""

from __future__ import annotations

import asyncio

import grpc

from aimass.common.v1 import common_pb2
from aimass.core.events import unpack
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.registry.conftest import EventLog, Registry
from tests.registry.test_models_versions import expect_code

ACCURACY = {("digits", 1): 0.91, ("digits", 2): 0.96, ("digits", 3): 0.99, ("speech", 1): 0.95}


async def _populate(registry: Registry) -> None:
    for model in ("digits", "speech"):
        await registry.create_model(model)
    for (model, _number), accuracy in ACCURACY.items():
        await registry.create_version(
            model,
            metrics=[common_pb2.Metric(name="accuracy", value=accuracy, source="evaluation")],
            tags={"stage": "candidate" if accuracy >= 0.95 else "dev"},
        )
    await registry.stub.SetAlias(
        pb.SetAliasRequest(name="models/digits/aliases/production", version=2)
    )


async def _search(
    registry: Registry, filter: str, order_by: str = "", page_size: int = 0
) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = await registry.stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token
            )
        )
        names += [v.name for v in page.model_versions]
        token = page.next_page_token
        if not token:
            return names


async def test_search_by_metric_tag_alias_with_order_and_pages(registry: Registry) -> None:
    await _populate(registry)
    best_first = await _search(registry, "metrics.accuracy >= 0.95", "metrics.accuracy desc", 1)
    assert best_first == [
        "models/digits/versions/3",
        "models/digits/versions/2",
        "models/speech/versions/1",
    ]
    assert await _search(
        registry,
        'metrics.accuracy >= 0.95 AND tags.stage = "candidate" AND model = "digits"',
        "version asc",
    ) == ["models/digits/versions/2", "models/digits/versions/3"]
    assert await _search(registry, 'alias = "production"') == ["models/digits/versions/2"]
    assert await _search(registry, 'tags.stage != "candidate"') == ["models/digits/versions/1"]
    # Newest first by default, across pages of 2.
    everything = await _search(registry, "", page_size=2)
    assert len(everything) == 4
    assert len(set(everything)) == 4
    assert everything[-1] == "models/digits/versions/1"

    listed = await registry.stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent="models/digits", filter="metrics.accuracy < 0.99")
    )
    assert [v.version for v in listed.model_versions] == [1, 2]

    details = await expect_code(
        registry.stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(filter="metrics.accuracy >= high")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter",
        "position 20",
    )
    assert "number" in details
    await expect_code(
        registry.stub.SearchModelVersions(pb.SearchModelVersionsRequest(filter="owner = 'x'")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter",
    )
    await expect_code(
        registry.stub.SearchModelVersions(pb.SearchModelVersionsRequest(order_by="size desc")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "order_by",
    )
    first = await registry.stub.SearchModelVersions(pb.SearchModelVersionsRequest(page_size=1))
    await expect_code(
        registry.stub.SearchModelVersions(
            pb.SearchModelVersionsRequest(
                page_size=1, page_token=first.next_page_token, filter='model = "digits"'
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


async def test_eight_concurrent_creators_get_distinct_gapless_numbers(registry: Registry) -> None:
    await registry.create_model("digits")
    address = f"127.0.0.1:{registry.running.port}"
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    try:
        stubs = [registry_pb2_grpc.RegistryServiceStub(c) for c in channels]
        results = await asyncio.gather(
            *(
                stub.CreateModelVersion(
                    pb.CreateModelVersionRequest(
                        parent="models/digits",
                        model_version=pb.ModelVersion(description=f"creator {i}"),
                    )
                )
                for i, stub in enumerate(stubs)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    assert sorted(v.version for v in results) == list(range(1, 9))
    assert sorted(v.description for v in results) == [f"creator {i}" for i in range(8)]
    listed = await registry.stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent="models/digits", page_size=3)
    )
    numbers = [v.version for v in listed.model_versions]
    token = listed.next_page_token
    while token:
        page = await registry.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/digits", page_size=3, page_token=token)
        )
        numbers += [v.version for v in page.model_versions]
        token = page.next_page_token
    assert numbers == list(range(1, 9))
    model = await registry.stub.GetRegisteredModel(
        pb.GetRegisteredModelRequest(name="models/digits")
    )
    assert model.latest_version == 8


async def test_version_created_and_deleted_events(
    registry: Registry, registry_events: EventLog
) -> None:
    await registry.create_model("digits")
    parent = await registry.create_version("digits")
    child = await registry.create_version(
        "digits", source=pb.VersionSource(parent_version=parent.name, derivation="fp16")
    )
    await registry.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=child.name))
    created_topic = "aimass.registry.version.created"
    deleted_topic = "aimass.registry.version.deleted"
    await registry_events.wait_for(
        lambda events: (
            sum(e.topic == created_topic for e in events) >= 2
            and any(e.topic == deleted_topic for e in events)
        )
    )
    created = [unpack(e, events_pb2.ModelVersionCreated) for e in registry_events.of(created_topic)]
    assert [(c.model_version, c.parent_version) for c in created] == [
        (parent.name, ""),
        (child.name, parent.name),
    ]
    deleted = [unpack(e, events_pb2.ModelVersionDeleted) for e in registry_events.of(deleted_topic)]
    assert [d.model_version for d in deleted] == [child.name]
    assert all(e.source == "registry" and e.id for e in registry_events.envelopes)
