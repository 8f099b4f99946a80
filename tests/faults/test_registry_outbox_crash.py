"""The registry process SIGKILLed between the DB commit of a version and the outbox relay's
publish of its event: after a restart every committed version's
``aimass.registry.version.created`` event is in the stream exactly once.

Deterministic without test hooks in the service: NATS is stopped, so the relay cannot
publish what the registry commits; versions are created (acknowledged to the client), the
registry is killed with those rows unpublished, then NATS and the registry come back.
A second case kills the registry at an arbitrary moment under a stream of creates with
NATS up (a publish may be cut between the stream's ack and the row's mark: the stream's
duplicate window must drop the republish).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from aimass.core.db.migrate import upgrade
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.faults.procs import ServiceProcess, report, running, stored_events, wait_until
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import stack_settings

pytestmark = pytest.mark.slow

CREATED = "aimass.registry.version.created"


def sqlite_home(tmp_path: Path) -> tuple[Path, str]:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'aimass.db'}"
    upgrade(url)
    return home, url


def unpublished(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            query = text("SELECT count(*) FROM outbox_events WHERE publish_time IS NULL")
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def committed_versions(db_url: str) -> set[str]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            query = text(
                "SELECT m.name, v.version FROM model_versions v"
                " JOIN registered_models m ON m.id = v.model_id"
            )
            return {f"models/{m}/versions/{v}" for m, v in connection.execute(query)}
    finally:
        engine.dispose()


def create_model(stub: registry_pb2_grpc.RegistryServiceStub, model_id: str) -> None:
    stub.CreateRegisteredModel(
        pb.CreateRegisteredModelRequest(
            registered_model=pb.RegisteredModel(), registered_model_id=model_id
        ),
        timeout=10,
    )


def create_version(stub: registry_pb2_grpc.RegistryServiceStub, model_id: str) -> str:
    reply = stub.CreateModelVersion(
        pb.CreateModelVersionRequest(parent=f"models/{model_id}", model_version=pb.ModelVersion()),
        timeout=10,
    )
    return reply.name


def created_events(nats_url: str) -> Counter[str]:
    """How many version.created events the stream holds, per version name."""
    return Counter(e.subject for e in asyncio.run(stored_events(nats_url, CREATED)))


def test_versions_committed_while_nats_is_down_are_published_once_after_a_crash(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    home, db_url = sqlite_home(tmp_path)
    settings = stack_settings(home, db_url, nats_server.url)
    registry = ServiceProcess.service("registry", settings)
    with running(registry.start()):
        with grpc.insecure_channel(registry.address) as channel:  # type: ignore[arg-type]
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            create_model(stub, "m")
            before = [create_version(stub, "m")]
            wait_until("version 1's event in the stream", lambda: created_events(nats_server.url))
            nats_server.stop(kill=True)
            # Acknowledged to the client, committed with their outbox rows, never published.
            acknowledged = before + [create_version(stub, "m") for _ in range(5)]
        assert unpublished(db_url) >= 5
        registry.kill()

        nats_server.start()
        restarted = time.monotonic()
        registry.start(wait=False)
        serving_s = wait_until("the registry serving again", registry.is_serving, proc=registry)
        published_s = wait_until(
            "every acknowledged version's event in the stream",
            lambda: set(created_events(nats_server.url)) >= set(acknowledged),
            proc=registry,
        )
        recovered_s = time.monotonic() - restarted
        with grpc.insecure_channel(registry.address) as channel:  # type: ignore[arg-type]
            after = create_version(registry_pb2_grpc.RegistryServiceStub(channel), "m")
        wait_until("the new version's event", lambda: after in created_events(nats_server.url))

    counts = created_events(nats_server.url)
    assert counts == Counter({name: 1 for name in [*acknowledged, after]})
    assert acknowledged == [f"models/m/versions/{n}" for n in range(1, 7)]
    assert unpublished(db_url) == 0
    report(
        "registry killed with 5 committed, unpublished events",
        serving_after_restart=serving_s,
        events_published_after_restart=published_s,
        recovery=recovered_s,
    )


def test_registry_killed_under_create_load_loses_and_duplicates_no_event(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    home, db_url = sqlite_home(tmp_path)
    settings = stack_settings(home, db_url, nats_server.url)
    registry = ServiceProcess.service("registry", settings)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load(address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            while not stop.is_set():
                try:
                    acknowledged.append(create_version(stub, "m"))
                except grpc.RpcError:
                    return  # the registry died: unacknowledged from here on

    with running(registry.start()):
        with grpc.insecure_channel(registry.address) as channel:  # type: ignore[arg-type]
            create_model(registry_pb2_grpc.RegistryServiceStub(channel), "m")
        writer = threading.Thread(target=load, args=(registry.address,))
        writer.start()
        wait_until("20 acknowledged versions", lambda: len(acknowledged) >= 20)
        registry.kill()
        killed = time.monotonic()
        stop.set()
        writer.join(30)

        registry.start(wait=False)
        serving_s = wait_until("the registry serving again", registry.is_serving, proc=registry)
        wait_until(
            "every committed version's event in the stream",
            lambda: set(created_events(nats_server.url)) >= committed_versions(db_url),
            proc=registry,
        )
        recovered_s = time.monotonic() - killed

    counts = created_events(nats_server.url)
    committed = committed_versions(db_url)
    # Nothing acknowledged is lost; committed-but-unacknowledged versions are published too.
    assert set(acknowledged) <= committed
    assert set(counts) == committed
    assert [name for name, n in counts.items() if n != 1] == []
    assert unpublished(db_url) == 0
    report(
        f"registry killed under create load ({len(acknowledged)} acknowledged)",
        serving_after_restart=serving_s,
        recovery=recovered_s,
    )
