"""The routing store on SQLite and PostgreSQL: servers, deployments, etags, events, filters."""

from __future__ import annotations

import pytest

from aimass.core.db.engine import Database
from aimass.core.db.models import OutboxEvent
from aimass.core.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from aimass.routing.store import RoutingStore
from aimass.routing.v1 import routing_pb2 as pb


def test_servers_and_deployments_round_trip(database: Database):
    store = RoutingStore(database)
    server = store.create_server(
        "gpu-1", pb.InferenceServer(grpc_address="10.0.0.1:8001", memory_budget_bytes=1000)
    )
    assert server.name == "inferenceServers/gpu-1"
    assert server.memory_budget_bytes == 1000
    with pytest.raises(AlreadyExists):
        store.create_server("gpu-1", pb.InferenceServer(grpc_address="x:1"))
    deployment = pb.Deployment(
        routes=[
            pb.Route(
                model="models/m/aliases/prod",
                weight_percent=90,
                resolved_version="models/m/versions/2",
            ),
            pb.Route(
                model="models/m/versions/3",
                weight_percent=10,
                resolved_version="models/m/versions/3",
            ),
        ],
        servers=["inferenceServers/gpu-1"],
        serving_config=pb.ServingConfig(max_batch_size=8),
        labels={"team": "vision"},
    )
    created = store.create_deployment("digits", deployment)
    assert created.state == pb.DEPLOYMENT_STATE_CREATING
    assert created.revision == 1
    assert [r.resolved_version for r in created.routes] == [
        "models/m/versions/2",
        "models/m/versions/3",
    ]
    with pytest.raises(Aborted):
        store.update_deployment("digits", created, "stale-etag", "UPDATING")
    updated = store.update_deployment("digits", created, created.etag, "UPDATING")
    assert updated.revision == 2
    assert updated.etag != created.etag
    ready = store.set_deployment_state("digits", "READY", "")
    assert ready is not None
    assert ready.state == pb.DEPLOYMENT_STATE_READY
    page, token = store.list_deployments(10, "", "state = READY")
    assert [d.name for d in page] == ["deployments/digits"]
    assert token == ""
    assert store.list_deployments(10, "", "state = FAILED")[0] == []
    with pytest.raises(InvalidArgument, match="filter"):
        store.list_deployments(10, "", "color = red")
    with pytest.raises(FailedPrecondition, match="deployments/digits"):
        store.delete_server("gpu-1", "", force=False)
    store.delete_deployment("digits", "")
    with pytest.raises(NotFound):
        store.get_deployment("digits")
    store.delete_server("gpu-1", "", force=False)
    with database.session(read_only=True) as session:
        topics = [e.topic for e in session.query(OutboxEvent).order_by(OutboxEvent.seq)]
    assert topics == ["aimass.routing.deployment.updated"] * 4
