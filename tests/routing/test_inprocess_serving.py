"""The routing service without Triton: the in-process ONNX Runtime backend serves the same
API; validation of deployments; shadow traffic; route-table watch; the SDK's fallback to
the router; ``aimass deploy`` / ``aimass predict``."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from typer.testing import CliRunner

from aimass.cli.main import app
from aimass.routing.v1 import routing_pb2 as pb
from aimass.serving import Endpoint
from tests.routing.conftest import output_of, reference

pytestmark = pytest.mark.asyncio(loop_scope="module")
IN_PROCESS = "inferenceServers/in-process"


async def test_in_process_backend_serves_predict(stack, models):
    version = await stack.register("local", models["a"][0])
    deployment = await stack.deploy("local", [(version, 100)])
    assert deployment.state == pb.DEPLOYMENT_STATE_READY
    batch = np.random.default_rng(2).random((4, 8), dtype=np.float32)
    response = await stack.predict("deployments/local", batch)
    assert response.model_version == version
    np.testing.assert_allclose(output_of(response), reference(models["a"][1], batch), atol=1e-5)
    table = await stack.routing.GetRouteTable(
        pb.GetRouteTableRequest(name="deployments/local/routeTable")
    )
    assert [(e.server, e.grpc_address) for e in table.entries] == [(IN_PROCESS, "")]


async def test_sdk_falls_back_to_the_router_without_a_direct_entry(stack, models):
    batch = np.ones((2, 8), np.float32)
    async with Endpoint(stack.routing_address, "local") as endpoint:
        prediction = await endpoint.predict({"input": batch})
    assert prediction.via_router
    np.testing.assert_allclose(
        prediction.outputs["logits"], reference(models["a"][1], batch), atol=1e-5
    )


@pytest.mark.parametrize(
    ("routes", "field", "code"),
    [
        (
            [("models/local/versions/1", 60), ("models/local/versions/1", 30)],
            "add up to 90",
            "INVALID_ARGUMENT",
        ),
        ([("models/local/versions/1", 101)], "weight_percent", "INVALID_ARGUMENT"),
        ([("local:v1", 100)], "routes[0].model", "INVALID_ARGUMENT"),
        ([("models/local/versions/9", 100)], "models/local/versions/9 not found", "NOT_FOUND"),
        ([("models/local/aliases/none", 100)], "routes[0].model", "NOT_FOUND"),
        ([], "deployment.routes", "INVALID_ARGUMENT"),
    ],
)
async def test_bad_deployments_are_refused(stack, routes, field, code):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("bad", routes)
    assert caught.value.code().name == code
    assert field in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.routing.GetDeployment(pb.GetDeploymentRequest(name="deployments/bad"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_versions_with_different_signatures_cannot_share_a_deployment(stack, models):
    wide = await stack.register("wide", models["wide"][0])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("mixed", [("models/local/versions/1", 50), (wide, 50)])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "share one signature" in caught.value.details()


async def test_duplicate_and_bad_ids(stack):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("local", [("models/local/versions/1", 100)])
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("Bad_Id", [("models/local/versions/1", 100)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployment_id" in caught.value.details()


async def test_shadow_gets_copies_and_update_moves_traffic(stack, models):
    v2 = await stack.register("local", models["b"][0])
    current = await stack.routing.GetDeployment(pb.GetDeploymentRequest(name="deployments/local"))
    watch = stack.routing.WatchRouteTable(
        pb.WatchRouteTableRequest(name="deployments/local/routeTable")
    )
    first = await watch.read()
    assert first.revision == current.revision
    updated = await stack.routing.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name="deployments/local",
                shadow=pb.ShadowTarget(model=v2, sample_percent=100),
                etag=current.etag,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["shadow"]),
        )
    )
    assert updated.revision == current.revision + 1
    while True:
        table = await asyncio.wait_for(watch.read(), 10)
        if table.revision == updated.revision and table.shadow_entries:
            break
    assert table.shadow_entries[0].model_version == v2
    await stack.predict("deployments/local", np.ones((1, 8), np.float32))
    # A stale etag is refused.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.routing.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(name="deployments/local", etag=current.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    await stack.routing.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/local"))
    while not (await asyncio.wait_for(watch.read(), 10)).deleted:
        pass
    watch.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.predict("deployments/local", np.ones((1, 8), np.float32))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_endpoint_counts_requests(stack, models):
    import urllib.request

    version = await stack.register("counted", models["a"][0])
    await stack.deploy("counted", [(version, 100)])
    for _ in range(3):
        await stack.predict("deployments/counted", np.ones((1, 8), np.float32))
    url = f"http://127.0.0.1:{stack.config.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    line = next(
        row
        for row in text.splitlines()
        if row.startswith("aimass_predict_requests_total")
        and 'deployment="deployments/counted"' in row
    )
    assert line.endswith(" 3.0")
    assert "aimass_predict_latency_seconds_bucket" in text


async def test_cli_deploy_and_predict(stack, models):
    runner = CliRunner()
    address = ["--address", stack.routing_address]
    version = await stack.register("cli", models["a"][0])

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    result = await asyncio.to_thread(
        invoke, "deploy", "create", "cli", "--route", f"{version}=100", *address, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "DEPLOYMENT_STATE_READY"
    batch = [[0.5] * 8]
    result = await asyncio.to_thread(
        invoke, "predict", "cli", "--input", f"input={json.dumps(batch)}", *address
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["model_version"] == version
    np.testing.assert_allclose(
        answer["outputs"]["logits"],
        reference(models["a"][1], np.asarray(batch, np.float32)),
        atol=1e-5,
    )
    result = await asyncio.to_thread(
        invoke, "deploy", "create", "cli2", "--route", f"{version}=50", *address
    )
    assert result.exit_code == 1
    assert "add up to 50" in result.output
    result = await asyncio.to_thread(invoke, "deploy", "list", *address)
    assert "deployments/cli" in result.output


async def test_opentelemetry_metrics_count_requests(stack, models):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from aimass.routing.metrics import RoutingMetrics

    reader = InMemoryMetricReader()
    router = stack.router
    kept, router.metrics = router.metrics, RoutingMetrics(MeterProvider(metric_readers=[reader]))
    try:
        for _ in range(2):
            await stack.predict("deployments/counted", np.ones((1, 8), np.float32))
    finally:
        router.metrics = kept
    found = {
        metric.name: metric.data.data_points
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    (requests,) = found["aimass.predict.requests"]
    assert requests.value == 2
    assert requests.attributes["deployment"] == "deployments/counted"
    assert requests.attributes["code"] == "OK"
    (duration,) = found["aimass.predict.duration"]
    assert duration.value > 0
