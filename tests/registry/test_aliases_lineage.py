"""Aliases (atomic moves, history, alias.moved events), lineage and delete guards."""

from __future__ import annotations

import grpc

from aimass.core.db.engine import Database
from aimass.core.db.models import Deployment
from aimass.core.events import unpack
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2 as pb
from tests.registry.conftest import EventLog, Registry
from tests.registry.test_models_versions import expect_code

ALIAS = "models/digits/aliases/production"


async def test_alias_moves_history_and_event(registry: Registry, registry_events: EventLog) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    for _ in range(3):
        await registry.create_version("digits")

    first = await stub.SetAlias(pb.SetAliasRequest(name=ALIAS, version=1))
    assert first.version == 1
    assert first.updated_by == "anonymous"
    moved = await stub.SetAlias(pb.SetAliasRequest(name=ALIAS, version=2, expected_version=1))
    assert moved.version == 2
    # Compare-and-swap against a stale expectation is refused and changes nothing.
    await expect_code(
        stub.SetAlias(pb.SetAliasRequest(name=ALIAS, version=3, expected_version=1)),
        grpc.StatusCode.ABORTED,
        "version 2",
    )
    await expect_code(
        stub.SetAlias(pb.SetAliasRequest(name=ALIAS, version=9)),
        grpc.StatusCode.NOT_FOUND,
        "models/digits/versions/9",
    )
    await expect_code(
        stub.SetAlias(pb.SetAliasRequest(name="models/digits/aliases/Prod", version=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "alias",
    )
    await expect_code(
        stub.SetAlias(pb.SetAliasRequest(name="models/nope/aliases/prod", version=1)),
        grpc.StatusCode.NOT_FOUND,
        "models/nope",
    )
    assert (await stub.GetAlias(pb.GetAliasRequest(name=ALIAS))).version == 2
    version = await stub.GetModelVersion(pb.GetModelVersionRequest(name="models/digits/versions/2"))
    assert list(version.aliases) == ["production"]

    await stub.SetAlias(pb.SetAliasRequest(name="models/digits/aliases/staging", version=3))
    aliases = await stub.ListAliases(pb.ListAliasesRequest(parent="models/digits"))
    assert [(a.name.rsplit("/", 1)[1], a.version) for a in aliases.aliases] == [
        ("production", 2),
        ("staging", 3),
    ]

    # An aliased version cannot be deleted; once the alias is gone it can.
    await expect_code(
        stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="models/digits/versions/3")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "staging",
    )
    await stub.DeleteAlias(pb.DeleteAliasRequest(name="models/digits/aliases/staging"))
    await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name="models/digits/versions/3"))

    history = await stub.ListAliasHistory(pb.ListAliasHistoryRequest(parent="models/digits"))
    assert [(m.alias.rsplit("/", 1)[1], m.old_version, m.new_version) for m in history.moves] == [
        ("production", 0, 1),
        ("production", 1, 2),
        ("staging", 0, 3),
        ("staging", 3, 0),
    ]
    assert all(m.moved_by == "anonymous" and m.move_time.seconds > 0 for m in history.moves)
    page = await stub.ListAliasHistory(
        pb.ListAliasHistoryRequest(parent="models/digits", page_size=3)
    )
    rest = await stub.ListAliasHistory(
        pb.ListAliasHistoryRequest(
            parent="models/digits", page_size=3, page_token=page.next_page_token
        )
    )
    assert len(page.moves) == 3
    assert len(rest.moves) == 1

    topic = "aimass.registry.alias.moved"
    await registry_events.wait_for(lambda events: sum(e.topic == topic for e in events) >= 4)
    moves = [unpack(e, events_pb2.AliasMoved) for e in registry_events.of(topic)]
    assert (ALIAS, 1, 2) in [(m.alias, m.old_version, m.new_version) for m in moves]
    assert {m.moved_by for m in moves} == {"anonymous"}


async def test_delete_refused_while_a_deployment_uses_the_version(registry: Registry) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    await registry.create_version("digits")
    await registry.create_version("digits")
    database = Database(registry.settings.database_url)
    try:
        with database.session() as session:
            session.add(
                Deployment(
                    name="digits-prod",
                    routes=[{"model_version": "models/digits/versions/1", "weight": 100}],
                    shadow={"model_version": "models/digits/versions/2", "fraction": 0.1},
                )
            )
    finally:
        database.dispose()
    for number in (1, 2):
        await expect_code(
            stub.DeleteModelVersion(
                pb.DeleteModelVersionRequest(name=f"models/digits/versions/{number}")
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "deployments/digits-prod",
        )
    await expect_code(
        stub.DeleteRegisteredModel(pb.DeleteRegisteredModelRequest(name="models/digits")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "deployments/digits-prod",
    )
    # Both versions are still there.
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/digits"))
    assert [v.version for v in listed.model_versions] == [1, 2]


async def test_lineage_ancestors_and_descendants(registry: Registry) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    await registry.create_model("digits-small")
    root = await registry.create_version(
        "digits",
        source=pb.VersionSource(
            dataset_version="datasets/digits/versions/4", job="trainingJobs/t1"
        ),
    )
    int8 = await registry.create_version(
        "digits",
        source=pb.VersionSource(
            job="compressionJobs/c1", parent_version=root.name, derivation="int8-dynamic"
        ),
    )
    pruned = await registry.create_version(
        "digits", source=pb.VersionSource(parent_version=root.name, derivation="prune-50")
    )
    student = await registry.create_version(
        "digits-small",
        source=pb.VersionSource(
            job="compressionJobs/c2", parent_version=int8.name, derivation="distill"
        ),
    )

    lineage = await stub.GetLineage(pb.GetLineageRequest(name=student.name))
    assert [(n.name, n.kind, n.parent) for n in lineage.ancestors] == [
        ("datasets/digits/versions/4", "dataset_version", ""),
        ("trainingJobs/t1", "training_job", "datasets/digits/versions/4"),
        (root.name, "model_version", "trainingJobs/t1"),
        ("compressionJobs/c1", "compression_job", root.name),
        (int8.name, "model_version", "compressionJobs/c1"),
        ("compressionJobs/c2", "compression_job", int8.name),
        (student.name, "model_version", "compressionJobs/c2"),
    ]
    assert lineage.ancestors[-1].derivation == "distill"

    down = await stub.GetLineage(pb.GetLineageRequest(name=root.name))
    assert [(n.name, n.parent) for n in down.descendants if n.kind == "model_version"] == [
        (int8.name, "compressionJobs/c1"),
        (pruned.name, root.name),
        (student.name, "compressionJobs/c2"),
    ]
    shallow = await stub.GetLineage(pb.GetLineageRequest(name=root.name, depth=1))
    assert student.name not in [n.name for n in shallow.descendants]
    got = await stub.GetModelVersion(pb.GetModelVersionRequest(name=student.name))
    assert got.source.parent_version == int8.name

    # A parent with children keeps its place in the lineage.
    await expect_code(
        stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=int8.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        student.name,
    )
    await expect_code(
        stub.GetLineage(pb.GetLineageRequest(name="models/digits/versions/99")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_search_finds_versions_trained_on_a_dataset_version(registry: Registry) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    await registry.create_model("other")
    used = "datasets/digits/versions/4"
    first = await registry.create_version(
        "digits", source=pb.VersionSource(dataset_version=used, job="trainingJobs/t1")
    )
    await registry.create_version(
        "digits", source=pb.VersionSource(dataset_version="datasets/digits/versions/5")
    )
    elsewhere = await registry.create_version(
        "other", source=pb.VersionSource(dataset_version=used)
    )
    await registry.create_version("other")

    found = await stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter=f'dataset_version = "{used}"')
    )
    assert sorted(v.name for v in found.model_versions) == sorted([first.name, elsewhere.name])
    in_model = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent="models/other", filter=f'dataset_version = "{used}"')
    )
    assert [v.name for v in in_model.model_versions] == [elsewhere.name]
    none = await stub.SearchModelVersions(
        pb.SearchModelVersionsRequest(filter='dataset_version = "datasets/nope/versions/1"')
    )
    assert list(none.model_versions) == []
