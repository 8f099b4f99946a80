"""PostgreSQL drops the registry's connections mid-request (``pg_terminate_backend`` on
every backend of its database, over and over, while clients write and read).

Each request either succeeds or fails cleanly with UNAVAILABLE / ABORTED (never INTERNAL,
never a stack trace in the message); once the terminations stop, the next requests
succeed (pre-ping replaces the dead pooled connections); every acknowledged version is
stored, version numbers have no gap, and every stored version's event is published once.
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
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from aimass.core.db.migrate import upgrade
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.faults.procs import (
    ServiceProcess,
    report,
    running,
    stored_events,
    terminate_backends,
    wait_until,
)
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import stack_settings

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CREATED = "aimass.registry.version.created"
CLEAN_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
CLIENTS = 4
TERMINATIONS = 15
TERMINATION_INTERVAL_S = 0.2


def stored_versions(db_url: str) -> list[int]:
    engine = create_engine(make_url(db_url).set(query={}), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = text(
                "SELECT v.version FROM model_versions v JOIN registered_models m"
                " ON m.id = v.model_id WHERE m.name = 'm' ORDER BY v.version"
            )
            return [row[0] for row in connection.execute(query)]
    finally:
        engine.dispose()


class Load:
    """Client threads writing versions and reading them back, recording every outcome."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.acknowledged: list[str] = []
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            while not self.stop.is_set():
                self._one(stub, write=index % 2 == 0)

    def _one(self, stub: registry_pb2_grpc.RegistryServiceStub, *, write: bool) -> None:
        try:
            if write:
                reply = stub.CreateModelVersion(
                    pb.CreateModelVersionRequest(
                        parent="models/m", model_version=pb.ModelVersion()
                    ),
                    timeout=30,
                )
                with self.lock:
                    self.acknowledged.append(reply.name)
            else:
                stub.ListModelVersions(pb.ListModelVersionsRequest(parent="models/m"), timeout=30)
                stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/m"), timeout=30)
            outcome = "OK"
        except grpc.RpcError as err:
            outcome = err.code().name
            details = err.details() or ""
            if err.code() not in CLEAN_FAILURES or "Traceback" in details:
                with self.lock:
                    self.bad.append(f"{outcome}: {details}")
        with self.lock:
            self.outcomes[outcome] += 1


def first_calls_s(address: str) -> float:
    """Seconds a write then a read take right after the drops: both must succeed at once
    (pre-ping hands them live connections; no client retry)."""
    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        stub.CreateModelVersion(
            pb.CreateModelVersionRequest(parent="models/m", model_version=pb.ModelVersion()),
            timeout=10,
        )
        stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/m"), timeout=10)
    return time.monotonic() - start


def test_requests_survive_dropped_database_connections(
    tmp_path: Path, nats_server: NatsServer, pg_database_url: str
) -> None:
    upgrade(pg_database_url)
    settings = stack_settings(tmp_path / "home", pg_database_url, nats_server.url)
    registry = ServiceProcess.service("registry", settings)
    with running(registry.start()):
        address = settings.service_address("registry")
        with grpc.insecure_channel(address) as channel:
            registry_pb2_grpc.RegistryServiceStub(channel).CreateRegisteredModel(
                pb.CreateRegisteredModelRequest(
                    registered_model=pb.RegisteredModel(), registered_model_id="m"
                ),
                timeout=10,
            )
        killed = 0
        with Load(address) as load:
            wait_until("the load running", lambda: load.outcomes["OK"] >= 10)
            for _ in range(TERMINATIONS):
                killed += terminate_backends(pg_database_url)
                time.sleep(TERMINATION_INTERVAL_S)
        # First call after the storm: pre-ping must hand it a live connection.
        recovery_s = first_calls_s(address)
        assert registry.alive(), registry.log_tail()
        stored = stored_versions(pg_database_url)
        wait_until(
            "every stored version's event in the stream",
            lambda: len(asyncio.run(stored_events(nats_server.url, CREATED))) >= len(stored),
        )
        events = Counter(e.subject for e in asyncio.run(stored_events(nats_server.url, CREATED)))

    assert load.bad == [], load.bad[:5]
    assert killed > 0
    assert stored == list(range(1, len(stored) + 1))
    assert {f"models/m/versions/{v}" for v in stored} >= set(load.acknowledged)
    assert events == Counter({f"models/m/versions/{v}": 1 for v in stored})
    report(
        f"PostgreSQL backends terminated {TERMINATIONS}x under load ({killed} connections)",
        outcomes=dict(load.outcomes).__repr__().replace(" ", ""),
        first_write_and_read_after_last_drop=recovery_s,
    )
