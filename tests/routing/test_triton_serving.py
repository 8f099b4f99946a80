"""Deployments served by a real Triton (nvidia-pytriton's CPU server, python backend running
ONNX Runtime): load through the model-control API, Predict through the router, bad input,
canary weights, alias rolls without dropped requests, refused loads, memory budget."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import field_mask_pb2

from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2
from aimass.routing.v1 import routing_pb2 as pb
from aimass.serving import Endpoint
from tests.routing.conftest import TritonProcess, output_of, predict_request, reference

pytestmark = pytest.mark.asyncio(loop_scope="module")
USES_TRITON = True
TRITON = "inferenceServers/local-triton"


def batching(max_batch: int = 16, **more) -> pb.ServingConfig:
    return pb.ServingConfig(
        max_batch_size=max_batch,
        dynamic_batching=pb.DynamicBatching(max_queue_delay_microseconds=200),
        instance_kind=pb.INSTANCE_KIND_CPU,
        **more,
    )


async def full_index(triton) -> dict[str, str]:
    """Triton's repository index: entry name -> state."""
    client = triton_aio.InferenceServerClient(triton.grpc_address)
    try:
        index = await client.get_model_repository_index(as_json=True)
    finally:
        await client.close()
    return {m["name"]: m.get("state", "") for m in index.get("models", [])}


def version_of(entry: str) -> str:
    """``digits-v1-1a2b3c4d`` -> ``digits-v1`` (the serving-config hash dropped)."""
    return entry.rsplit("-", 1)[0]


async def triton_index(triton) -> dict[str, str]:
    """Like full_index, keyed by version (one serving config per version in these tests)."""
    return {version_of(name): state for name, state in (await full_index(triton)).items()}


def entry_dir(triton, version: str):
    (found,) = [p for p in triton.repository.iterdir() if version_of(p.name) == version]
    return found


async def test_predict_through_triton_matches_onnx(stack, models, triton):
    version = await stack.register("digits", models["a"][0])
    deployment = await stack.deploy(
        "digits", [(version, 100)], servers=[TRITON], serving_config=batching()
    )
    assert deployment.revision >= 1
    config = (entry_dir(triton, "digits-v1") / "config.pbtxt").read_text()
    assert "dynamic_batching" in config
    assert "max_batch_size: 16" in config
    assert "KIND_CPU" in config
    assert (await triton_index(triton))["digits-v1"] == "READY"

    batch = np.random.default_rng(0).random((5, 8), dtype=np.float32)
    response = await stack.predict("deployments/digits", batch, id="req-1")
    assert response.deployment == "deployments/digits"
    assert response.model_version == version
    assert response.id == "req-1"
    np.testing.assert_allclose(output_of(response), reference(models["a"][1], batch), atol=1e-5)

    health = await stack.prediction.GetDeploymentHealth(
        pb.GetDeploymentHealthRequest(name="deployments/digits")
    )
    assert health.ready
    assert [r.server for r in health.routes] == [TRITON]
    metadata = await stack.prediction.GetDeploymentMetadata(
        pb.GetDeploymentMetadataRequest(name="deployments/digits")
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 8])
    ]
    table = await stack.routing.GetRouteTable(
        pb.GetRouteTableRequest(name="deployments/digits/routeTable")
    )
    assert [(version_of(e.triton_model_name), e.grpc_address, e.weight) for e in table.entries] == [
        ("digits-v1", triton.grpc_address, 100.0)
    ]
    server = await stack.routing.GetInferenceServer(pb.GetInferenceServerRequest(name=TRITON))
    assert server.ready
    assert [version_of(m.triton_model_name) for m in server.loaded_models] == ["digits-v1"]
    assert server.loaded_models[0].deployments == ["deployments/digits"]


async def test_concurrent_predicts_are_merged_and_each_gets_its_own_rows(stack, models):
    """Many requests at once: the router merges them into fewer Triton calls (see
    aimass.routing.coalesce), and every caller still gets the answer to its own rows and id."""
    version = await stack.register("merged", models["a"][0])
    await stack.deploy("merged", [(version, 100)], servers=[TRITON], serving_config=batching(8))
    rng = np.random.default_rng(7)
    batches = [rng.random((1 + i % 3, 8), dtype=np.float32) for i in range(96)]

    async def one(index: int) -> None:
        response = await stack.predict("deployments/merged", batches[index], id=f"r{index}")
        assert response.id == f"r{index}"
        assert response.deployment == "deployments/merged"
        assert response.model_version == version
        expected = reference(models["a"][1], batches[index])
        np.testing.assert_allclose(output_of(response), expected, atol=1e-5)

    for start in range(0, len(batches), 32):
        await asyncio.gather(*(one(i) for i in range(start, start + 32)))
    (coalescer,) = [
        c for (model, _), c in stack.router.servers[TRITON].coalescers.items() if "merged" in model
    ]
    assert coalescer.requests == len(batches)
    assert coalescer.calls < coalescer.requests  # some calls carried several requests
    scraped = await asyncio.to_thread(
        urllib.request.urlopen, f"http://127.0.0.1:{stack.config.metrics_port}/metrics"
    )
    text = scraped.read().decode()
    assert f'aimass_server_calls_total{{model="{coalescer_model(stack)}"' in text


def coalescer_model(stack) -> str:
    (model,) = [m for m, _ in stack.router.servers[TRITON].coalescers if "merged" in m]
    return model


@pytest.mark.parametrize(
    ("mutate", "field", "code"),
    [
        (
            lambda r: r.inputs[0].__setattr__("datatype", "INT64"),
            "inputs[0].datatype",
            "INVALID_ARGUMENT",
        ),
        (lambda r: r.inputs[0].shape.__setitem__(1, 9), "inputs[0].shape", "INVALID_ARGUMENT"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12),
            "raw_input_contents[0]",
            "INVALID_ARGUMENT",
        ),
        (
            lambda r: r.inputs[0].__setattr__("name", "pixels"),
            "unknown input 'pixels'",
            "INVALID_ARGUMENT",
        ),
        (
            lambda r: r.__setattr__("model_version", "models/other/versions/1"),
            "does not route to",
            "FAILED_PRECONDITION",
        ),
        (
            lambda r: r.__setattr__("deployment", "deployments/nope"),
            "deployments/nope not found",
            "NOT_FOUND",
        ),
    ],
)
async def test_bad_input_is_refused_naming_the_field(stack, mutate, field, code):
    request = predict_request("deployments/digits", np.zeros((2, 8), np.float32))
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.prediction.Predict(request)
    assert caught.value.code().name == code
    assert field in caught.value.details()


async def test_batch_over_max_and_payload_over_limit(stack):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.predict("deployments/digits", np.zeros((17, 8), np.float32))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_size 16" in caught.value.details()
    # The stack's message limit is 4 MiB.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.predict("deployments/digits", np.zeros((140_000, 8), np.float32))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_predict_batch_reports_each_result(stack):
    good = predict_request("", np.ones((1, 8), np.float32))
    bad = predict_request("", np.ones((1, 8), np.float32), name="nope")
    response = await stack.prediction.PredictBatch(
        pb.PredictBatchRequest(deployment="deployments/digits", requests=[good, bad, good])
    )
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["response", "error", "response"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unknown input 'nope'" in response.results[1].error.message


async def test_canary_weights_and_sticky_routing(stack, models):
    v1 = await stack.register("canary", models["a"][0])
    v2 = await stack.register("canary", models["b"][0])
    await stack.deploy("canary", [(v1, 80), (v2, 20)], servers=[TRITON], serving_config=batching())
    batch = np.ones((1, 8), np.float32)
    answers = await asyncio.gather(
        *(stack.predict("deployments/canary", batch) for _ in range(1000))
    )
    share = sum(a.model_version == v2 for a in answers) / len(answers)
    # 1000 draws at p = 0.2: 4 standard deviations is 0.05.
    assert 0.15 <= share <= 0.25
    sticky = {
        (await stack.predict("deployments/canary", batch, routing_key="user-7")).model_version
        for _ in range(20)
    }
    assert len(sticky) == 1
    pinned = await stack.predict("deployments/canary", batch, model_version=v2)
    assert pinned.model_version == v2


async def test_alias_move_rolls_without_dropped_requests(stack, models, triton):
    v1 = await stack.register("rolling", models["a"][0])
    v2 = await stack.register("rolling", models["b"][0])
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(name="models/rolling/aliases/prod", version=1)
    )
    await stack.deploy(
        "rolling",
        [("models/rolling/aliases/prod", 100)],
        servers=[TRITON],
        serving_config=batching(),
    )
    batch = np.ones((2, 8), np.float32)
    seen: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            seen.append((await stack.predict("deployments/rolling", batch)).model_version)

    clients = [asyncio.create_task(traffic()) for _ in range(4)]
    await asyncio.sleep(0.3)
    await stack.registry.SetAlias(
        registry_pb2.SetAliasRequest(name="models/rolling/aliases/prod", version=2)
    )
    for _ in range(400):
        if seen and seen[-1] == v2 and "rolling-v1" not in await triton_index(triton):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)  # any failed request raises here
    assert seen[0] == v1
    assert seen[-1] == v2
    deployment = await stack.routing.GetDeployment(
        pb.GetDeploymentRequest(name="deployments/rolling")
    )
    assert deployment.routes[0].resolved_version == v2
    index = await triton_index(triton)
    assert index.get("rolling-v2") == "READY"
    assert index.get("rolling-v1") != "READY"


async def test_triton_refusing_a_model_fails_the_deployment(stack, triton):
    # The registry's signature is trusted, so only Triton finds out the file is no model.
    signature = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, 8])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 3])],
    )
    broken = await stack.register("broken", b"this is not an onnx model", signature=signature)
    created = await stack.create("broken", [(broken, 100)], servers=[TRITON])
    failed = await stack.wait_state(created.name, "FAILED")
    assert "broken" in failed.state_reason
    table = await stack.routing.GetRouteTable(
        pb.GetRouteTableRequest(name="deployments/broken/routeTable")
    )
    assert not table.entries
    assert (await triton_index(triton)).get("broken-v1") != "READY"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.predict("deployments/broken", np.ones((1, 8), np.float32))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unreadable_onnx_and_version_without_onnx_are_refused(stack):
    garbage = await stack.register("garbage", b"not onnx either")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("garbage", [(garbage, 100)], servers=[TRITON])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be read" in caught.value.details()
    weights_only = await stack.register("weights-only", b"torch state", kind="state_dict")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.create("weights-only", [(weights_only, 100)])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no ONNX artifact" in caught.value.details()
    assert "routes[0].model" in caught.value.details()


async def test_fast_path_calls_triton_directly_with_the_weights(stack, models):
    batch = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    async with Endpoint(stack.routing_address, "digits") as endpoint:
        assert endpoint.route_table is not None
        prediction = await endpoint.predict({"input": batch})
        assert not prediction.via_router
        assert prediction.model_version == "models/digits/versions/1"
        np.testing.assert_allclose(
            prediction.outputs["logits"], reference(models["a"][1], batch), atol=1e-5
        )
        assert endpoint.direct_calls == 1
        assert endpoint.router_calls == 0
    async with Endpoint(stack.routing_address, "canary") as endpoint:
        answers = await asyncio.gather(
            *(endpoint.predict({"input": batch[:1]}) for _ in range(1000))
        )
        share = sum(a.model_version.endswith("/2") for a in answers) / len(answers)
        assert 0.15 <= share <= 0.25
        assert endpoint.router_calls == 0


async def test_failed_server_is_ejected_and_requests_retry_elsewhere(stack, tmp_path):
    second = TritonProcess(tmp_path / "models", tmp_path / "triton.log")
    second.start()
    try:
        await stack.routing.CreateInferenceServer(
            pb.CreateInferenceServerRequest(
                inference_server_id="second",
                inference_server=pb.InferenceServer(
                    grpc_address=second.grpc_address,
                    model_repository_uri=str(second.repository),
                ),
            )
        )
        version = "models/digits/versions/1"
        await stack.deploy(
            "spread",
            [(version, 100)],
            servers=[TRITON, "inferenceServers/second"],
            serving_config=batching(max_retries=1),
        )
        batch = np.ones((1, 8), np.float32)
        async with Endpoint(stack.routing_address, "spread") as endpoint:
            assert len(endpoint.route_table.entries) == 2
            second.stop()
            # Neither path loses a request: each retries on the healthy server.
            for _ in range(20):
                assert (await stack.predict("deployments/spread", batch)).model_version == version
                assert (await endpoint.predict({"input": batch})).model_version == version
            for _ in range(100):
                if len(endpoint.route_table.entries) == 1:
                    break
                await asyncio.sleep(0.05)
            assert [e.server for e in endpoint.route_table.entries] == [TRITON]
        server = await stack.routing.GetInferenceServer(
            pb.GetInferenceServerRequest(name="inferenceServers/second")
        )
        assert server.state == pb.SERVER_STATE_UNREACHABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.routing.DeleteInferenceServer(
                pb.DeleteInferenceServerRequest(name="inferenceServers/second")
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await stack.routing.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/spread"))
        await stack.routing.DeleteInferenceServer(
            pb.DeleteInferenceServerRequest(name="inferenceServers/second")
        )
    finally:
        second.stop()


async def test_memory_budget_unloads_lru_and_loads_on_demand(stack, models, triton):
    server = await stack.routing.GetInferenceServer(pb.GetInferenceServerRequest(name=TRITON))
    one_model = max(m.size_bytes for m in server.loaded_models)
    in_use = server.memory_used_bytes
    await stack.routing.UpdateInferenceServer(
        pb.UpdateInferenceServerRequest(
            inference_server=pb.InferenceServer(
                name=TRITON, memory_budget_bytes=in_use + one_model
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["memory_budget_bytes"]),
        )
    )
    try:
        a = await stack.register("lru-a", models["a"][0])
        b = await stack.register("lru-b", models["b"][0])
        await stack.deploy("lru-a", [(a, 100)], servers=[TRITON], serving_config=batching())
        await stack.deploy("lru-b", [(b, 100)], servers=[TRITON], serving_config=batching())
        index = await triton_index(triton)
        assert index.get("lru-b-v1") == "READY"
        # Loading lru-b went over the budget: the least recently used idle model went out.
        assert sum(state == "READY" for state in index.values()) <= len(server.loaded_models) + 1
        batch = np.ones((1, 8), np.float32)
        answer = await stack.predict("deployments/lru-a", batch)
        assert answer.model_version == a
        assert (await triton_index(triton)).get("lru-a-v1") == "READY"
    finally:
        await stack.routing.UpdateInferenceServer(
            pb.UpdateInferenceServerRequest(
                inference_server=pb.InferenceServer(name=TRITON, memory_budget_bytes=0),
                update_mask=field_mask_pb2.FieldMask(paths=["memory_budget_bytes"]),
            )
        )


async def test_one_version_with_two_serving_configs_gets_two_entries(stack, triton):
    version = "models/digits/versions/1"
    same = await stack.deploy("cfg-same", [(version, 100)], serving_config=batching())
    small = await stack.deploy("cfg-small", [(version, 100)], serving_config=batching(max_batch=4))
    tables = {
        name: await stack.routing.GetRouteTable(
            pb.GetRouteTableRequest(name=f"deployments/{name}/routeTable")
        )
        for name in ("digits", "cfg-same", "cfg-small")
    }
    entry = {name: table.entries[0].triton_model_name for name, table in tables.items()}
    # Equal configs share Triton's entry; a different config gets its own.
    assert entry["cfg-same"] == entry["digits"]
    assert entry["cfg-small"] != entry["digits"]
    index = await full_index(triton)
    assert index[entry["digits"]] == index[entry["cfg-small"]] == "READY"
    config = (triton.repository / entry["cfg-small"] / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config
    batch = np.ones((8, 8), np.float32)
    assert (await stack.predict(same.name, batch)).model_version == version
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.predict(small.name, batch)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("cfg-same", "cfg-small"):
        await stack.routing.DeleteDeployment(pb.DeleteDeploymentRequest(name=f"deployments/{name}"))
    for _ in range(100):
        index = await full_index(triton)
        if index.get(entry["cfg-small"]) != "READY":
            break
        await asyncio.sleep(0.05)
    assert index.get(entry["cfg-small"]) != "READY"
    assert index[entry["digits"]] == "READY"


async def test_trace_spans_router_then_triton_call(stack, tmp_path):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from aimass.core.telemetry import JsonLinesSpanExporter

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    spans_file = tmp_path / "spans.jsonl"
    trace.get_tracer_provider().add_span_processor(
        SimpleSpanProcessor(JsonLinesSpanExporter(spans_file))
    )
    backend = stack.router.servers[TRITON].backend
    real_call, sent = backend.call, []

    async def spy(model, request, timeout_s, metadata=None):
        sent.append(dict(metadata or ()))
        return await real_call(model, request, timeout_s, metadata)

    backend.call = spy
    try:
        answer = await stack.predict("deployments/digits", np.ones((1, 8), np.float32))
    finally:
        del backend.call
    import json

    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    (server,) = [s for s in spans if s["name"].endswith("PredictionService/Predict")]
    (call,) = [s for s in spans if s["name"] == "triton ModelInfer"]
    assert server["kind"] == "SpanKind.SERVER"
    assert call["kind"] == "SpanKind.CLIENT"
    assert call["parent_id"] == server["context"]["span_id"]
    assert call["context"]["trace_id"] == server["context"]["trace_id"]
    assert call["attributes"]["aimass.deployment"] == "deployments/digits"
    assert call["attributes"]["aimass.model_version"] == answer.model_version
    assert call["attributes"]["aimass.inference_server"] == TRITON
    assert version_of(call["attributes"]["triton.model_name"]) == "digits-v1"
    # Triton got the call span's context as W3C metadata.
    trace_id, span_id = call["context"]["trace_id"][2:], call["context"]["span_id"][2:]
    assert sent[-1]["traceparent"].startswith(f"00-{trace_id}-{span_id}-")


async def test_restart_reconciles_triton_with_the_deployments(stack, triton):
    """A routing process starting on the same database and Triton (what a restart does)
    loads what the deployments need and unloads aimass's entries nobody needs."""
    import functools
    import shutil

    from aimass.core.service import start_service
    from aimass.routing.main import build
    from aimass.routing.plan import serving_options
    from aimass.routing.repository import entry_name
    from tests.fixtures.stack import free_port

    listed = await stack.routing.ListDeployments(pb.ListDeploymentsRequest(page_size=100))
    expected = set()
    for deployment in listed.deployments:
        if deployment.state != pb.DEPLOYMENT_STATE_READY:
            continue
        options = serving_options(deployment.serving_config, 1024)
        versions = [r.resolved_version for r in deployment.routes]
        if deployment.shadow.resolved_version:
            versions.append(deployment.shadow.resolved_version)
        expected |= {entry_name(v, options) for v in versions}
    assert len(expected) >= 3
    # Triton drifts from aimass while no router runs: a needed entry unloaded, an
    # entry aimass wrote for a deployment that is gone still loaded.
    before = await full_index(triton)
    missing = min(name for name in expected if before.get(name) == "READY")
    ghost = "ghost-v1-00000000"
    shutil.copytree(triton.repository / missing, triton.repository / ghost)
    config_file = triton.repository / ghost / "config.pbtxt"
    config_file.write_text(config_file.read_text().replace(missing, ghost))
    client = triton_aio.InferenceServerClient(triton.grpc_address)
    try:
        await client.unload_model(missing)
        await client.load_model(ghost)
        assert (await full_index(triton))[ghost] == "READY"
        assert (await full_index(triton))[missing] != "READY"
        config = dataclasses.replace(stack.config, metrics_port=0)
        running, ctx = await start_service(
            "routing",
            functools.partial(build, config=config),
            stack.settings,
            port=free_port(),
        )
        try:
            await asyncio.wait_for(ctx.resources["router"].ready.wait(), 120)
            index = await full_index(triton)
            assert {name for name, state in index.items() if state == "READY"} == expected
            assert not (triton.repository / ghost).exists()
        finally:
            await running.stop(0)
    finally:
        await client.close()
