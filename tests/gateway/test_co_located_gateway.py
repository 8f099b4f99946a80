"""The REST gateway co-located with the routing service: routing's unary methods are called in
process (aimass.gateway.local), through the wrapper every gRPC call gets, with no network hop.

Registry and routing run in this process with auth on; routing also serves REST (the setting
``co_located_gateway``, as `aimass up` configures it). A second, standalone gateway reaches
routing over gRPC: both must answer alike.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.common.v1 import common_pb2
from aimass.core.auth.bootstrap import ensure_admin_key, read_admin_key
from aimass.core.db.migrate import upgrade
from aimass.core.errors import Unavailable
from aimass.core.server import RunningServer
from aimass.core.service import start_co_located_gateway
from aimass.core.settings import Settings, SettingsError, load_settings
from aimass.embedded.components import plan
from aimass.embedded.layout import StackLayout
from aimass.gateway.app import Gateway
from aimass.gateway.local import LocalContext, LocalUnaryCall
from aimass.gateway.server import load_descriptors, start_gateway
from aimass.registry.v1 import registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc
from tests.fixtures.stack import free_port, serve_stack, stack_settings
from tests.gateway.conftest import INTERNAL_TOKEN, assert_throttled, key_metadata
from tests.gateway.onnx_mlp import CLASSES, IN_FEATURES, deploy_ready, mlp_onnx, register_onnx

pytestmark = pytest.mark.asyncio(loop_scope="module")

PREDICT = "/aimass.routing.v1.PredictionService/Predict"
ROWS = np.arange(2 * IN_FEATURES, dtype=np.float32).reshape(2, IN_FEATURES) / 10


@dataclass
class CoLocated:
    admin_key: str
    deployment: str
    gateway: Gateway
    url: str
    # A standalone gateway in front of the same routing service, over gRPC.
    network_url: str
    http: aiohttp.ClientSession
    routing: grpc.aio.Channel
    registry: grpc.aio.Channel
    settings: Settings
    server: RunningServer

    async def create_key(self, key_id: str, role: int, **fields: float) -> str:
        created = await access_pb2_grpc.AccessServiceStub(self.registry).CreateApiKey(
            access_pb2.CreateApiKeyRequest(
                api_key=access_pb2.ApiKey(role=role, **fields), api_key_id=key_id
            ),
            metadata=key_metadata(self.admin_key),
        )
        return created.secret

    def local_call(self, method: str) -> LocalUnaryCall:
        call = self.gateway.local_calls[method]
        assert isinstance(call, LocalUnaryCall)
        return call


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def co_located(tmp_path_factory, nats_module) -> AsyncIterator[CoLocated]:
    home = tmp_path_factory.mktemp("co-located")
    db_url = f"sqlite:///{home / 'aimass.db'}"
    upgrade(db_url)
    settings = stack_settings(
        home,
        db_url,
        nats_module.url,
        auth={"enabled": True, "internal_token": INTERNAL_TOKEN},
        co_located_gateway="routing",
        ports={"gateway": free_port()},
    )
    ensure_admin_key(home, db_url)
    admin_key = read_admin_key(home)
    assert admin_key
    metadata = key_metadata(admin_key)
    async with serve_stack(settings, ["registry", "routing"]) as stack:
        gateway = await start_co_located_gateway("routing", stack.servers["routing"], settings)
        assert gateway is not None
        network = Gateway(
            settings, load_descriptors(), addresses={"routing": stack.address("routing")}
        )
        runner, network_port = await start_gateway(settings, network, port=0)
        registry = registry_pb2_grpc.RegistryServiceStub(stack.channel("registry"))
        version = await register_onnx(registry, "co-mlp", mlp_onnx(), metadata)
        routing = routing_pb2_grpc.RoutingServiceStub(stack.channel("routing"))
        deployment = await deploy_ready(routing, "co-mlp", version, metadata)
        async with aiohttp.ClientSession() as http:
            try:
                yield CoLocated(
                    admin_key,
                    deployment,
                    gateway,
                    f"http://127.0.0.1:{settings.ports.gateway}",
                    f"http://127.0.0.1:{network_port}",
                    http,
                    stack.channel("routing"),
                    stack.channel("registry"),
                    settings,
                    stack.servers["routing"],
                )
            finally:
                await runner.cleanup()


def predict_body(rows: np.ndarray, shape: list[int] | None = None) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": shape or list(rows.shape)}
    return {"inputs": [tensor], "rawInputContents": [base64.b64encode(rows.tobytes()).decode()]}


def handled(method: str, code: str) -> float:
    service, _, name = method.lstrip("/").partition("/")
    labels = {"grpc_service": service, "grpc_method": name, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def test_rest_predict_is_served_in_process_with_grpcs_outputs(co_located):
    key = {"x-api-key": co_located.admin_key}
    local = co_located.local_call(PREDICT)
    calls_before, counted_before = local.calls, handled(PREDICT, "OK")
    async with co_located.http.post(
        f"{co_located.url}/v1/{co_located.deployment}:predict",
        json=predict_body(ROWS),
        headers=key,
    ) as reply:
        assert reply.status == 200, await reply.text()
        assert reply.headers["x-aimass-rpc"] == PREDICT
        rest = await reply.json()
    stub = routing_pb2_grpc.PredictionServiceStub(co_located.routing)
    direct = await stub.Predict(
        routing_pb2.PredictRequest(
            deployment=co_located.deployment,
            inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=[2, IN_FEATURES])],
            raw_input_contents=[ROWS.tobytes()],
        ),
        metadata=key_metadata(co_located.admin_key),
    )
    rest_logits = np.frombuffer(base64.b64decode(rest["rawOutputContents"][0]), np.float32)
    grpc_logits = np.frombuffer(direct.raw_output_contents[0], np.float32)
    assert rest_logits.shape == (2 * CLASSES,)
    np.testing.assert_array_equal(rest_logits, grpc_logits)
    assert rest["outputs"][0]["name"] == direct.outputs[0].name
    # In process: the local call ran, and no channel to routing was ever opened...
    assert local.calls == calls_before + 1
    assert "routing" not in co_located.gateway._channels
    # ...yet routing's RPC metrics counted it like the gRPC call (one each).
    assert handled(PREDICT, "OK") == counted_before + 2


async def test_unauthenticated_is_401_and_a_role_mismatch_403(co_located):
    http, url = co_located.http, co_located.url
    async with http.post(
        f"{url}/v1/{co_located.deployment}:predict", json=predict_body(ROWS)
    ) as reply:
        assert reply.status == 401
        assert "x-api-key" in (await reply.json())["message"]
    predictor = await co_located.create_key("co-predictor", access_pb2.ROLE_PREDICTOR)
    listed = co_located.local_call("/aimass.routing.v1.RoutingService/ListDeployments")
    before = listed.calls
    async with http.get(f"{url}/v1/deployments", headers={"x-api-key": predictor}) as reply:
        assert reply.status == 403
        body = await reply.json()
        assert body["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "predictor" in body["message"]
    assert listed.calls == before + 1
    viewer = await co_located.create_key("co-viewer", access_pb2.ROLE_VIEWER)
    async with http.get(f"{url}/v1/deployments", headers={"x-api-key": viewer}) as reply:
        assert reply.status == 200, await reply.text()
        names = [d["name"] for d in (await reply.json())["deployments"]]
        assert co_located.deployment in names
    async with http.post(
        f"{url}/v1/{co_located.deployment}:predict",
        json=predict_body(ROWS),
        headers={"x-api-key": viewer},
    ) as reply:
        assert reply.status == 403


async def test_a_bad_tensor_is_400_naming_the_field_as_over_the_network(co_located):
    headers = {"x-api-key": co_located.admin_key}
    answers = []
    for base in (co_located.url, co_located.network_url):
        async with co_located.http.post(
            f"{base}/v1/{co_located.deployment}:predict",
            json=predict_body(ROWS, shape=[3, IN_FEATURES]),
            headers=headers,
        ) as reply:
            answers.append((reply.status, await reply.json()))
    (status, body), network = answers
    assert status == 400
    assert body["details"][0]["@type"].endswith("google.rpc.BadRequest")
    fields = [v["field"] for v in body["details"][0]["fieldViolations"]]
    assert any(field.startswith(("inputs", "raw_input_contents")) for field in fields), body
    # Same status, message and google.rpc details as the network path.
    assert (status, body) == network
    assert handled(PREDICT, "INVALID_ARGUMENT") >= 2


async def test_resource_exhausted_is_429_with_retry_after(co_located):
    slow = await co_located.create_key("co-slow", access_pb2.ROLE_PREDICTOR, rate_limit_per_s=0.2)
    await assert_throttled(
        lambda: co_located.http.post(
            f"{co_located.url}/v1/{co_located.deployment}:predict",
            json=predict_body(ROWS),
            headers={"x-api-key": slow},
        )
    )


async def test_streaming_routes_stay_on_the_network(co_located):
    watch = "/aimass.routing.v1.RoutingService/WatchRouteTable"
    assert watch not in co_located.gateway.local_calls
    assert PREDICT in co_located.gateway.local_calls
    # Registry methods are another process's: not local here.
    assert not any(m.startswith("/aimass.registry.") for m in co_located.gateway.local_calls)


async def test_a_local_context_aborts_like_grpc():
    context = LocalContext((("x-request-id", "r1"),), deadline=None)
    assert context.invocation_metadata() == (("x-request-id", "r1"),)
    assert context.time_remaining() is None
    assert context.peer() == "local"
    with pytest.raises(grpc.aio.AbortError):
        await context.abort(grpc.StatusCode.NOT_FOUND, "gone", (("k", "v"),))
    error = context.error()
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "gone")
    assert list(error.trailing_metadata()) == [("k", "v")]
    with pytest.raises(grpc.aio.UsageError):
        await context.abort(grpc.StatusCode.INTERNAL, "twice")


async def test_a_local_call_past_its_deadline_is_deadline_exceeded():
    async def slow(request: bytes, context: LocalContext) -> bytes:
        await asyncio.sleep(30)
        return request

    call = LocalUnaryCall("/t.S/Slow", grpc.unary_unary_rpc_method_handler(slow))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"x", timeout=0.01)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_taken_gateway_port_fails_naming_it(co_located):
    with pytest.raises(Unavailable) as caught:
        await start_co_located_gateway("routing", co_located.server, co_located.settings)
    assert f":{co_located.settings.ports.gateway}" in caught.value.message
    assert "REST gateway" in caught.value.message
    # The process that does not host the gateway starts none.
    assert (
        await start_co_located_gateway("registry", co_located.server, co_located.settings) is None
    )


async def test_the_setting_names_a_known_service():
    with pytest.raises(SettingsError, match="AIMASS_CO_LOCATED_GATEWAY"):
        load_settings(co_located_gateway="gateway")
    assert load_settings(co_located_gateway="routing").co_located_gateway == "routing"


async def test_aimass_up_serves_the_gateway_from_routing_where_routing_is_installed(tmp_path):
    settings = load_settings(home=tmp_path)
    layout = StackLayout(tmp_path)
    specs = {spec.name: spec for spec in plan(settings, layout, ["registry", "routing"])}
    gateway = specs["gateway"]
    assert gateway.hosted_by == "routing"
    assert gateway.argv == ()
    assert gateway.kind == "http"
    assert gateway.ports == (("gateway", settings.ports.gateway),)
    assert ("AIMASS_CO_LOCATED_GATEWAY", "routing") in specs["routing"].env
    assert all(name != "AIMASS_CO_LOCATED_GATEWAY" for name, _ in specs["registry"].env)
    alone = {spec.name: spec for spec in plan(settings, layout, ["registry"])}["gateway"]
    assert alone.hosted_by == ""
    assert alone.argv[-2:] == ("-m", "aimass.gateway")
