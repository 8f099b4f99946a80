"""The server bootstrap: error mapping, auth hook, tracing, health, graceful drain."""

import asyncio
import socket

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aimass.common.v1 import common_pb2
from aimass.core import errors
from aimass.core.interceptors import Principal, current_principal
from aimass.core.server import GrpcService, create_server
from aimass.core.settings import load_settings
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc

SERVICE = "aimass.registry.v1.RegistryService"


class Servicer(registry_pb2_grpc.RegistryServiceServicer):
    """Each method exercises one path of the interceptor."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def GetRegisteredModel(self, request, context):
        if request.name == "models/slow":
            self.started.set()
            await asyncio.sleep(1.0)
        if request.name == "models/bad":
            raise errors.InvalidArgument("name", "must match models/{model}")
        if request.name == "models/missing":
            raise errors.NotFound("models/missing does not exist")
        if request.name == "models/busy":
            raise errors.ResourceExhausted("queue full", retry_after_s=1.5)
        if request.name == "models/crash":
            raise RuntimeError("secret internals")
        principal = current_principal()
        return registry_pb2.RegisteredModel(name=request.name, owner=principal.subject)

    async def DownloadArtifact(self, request, context):
        yield common_pb2.ByteChunk(offset=0, data=b"abc")
        raise errors.NotFound(f"{request.name} has no artifact of kind {request.kind!r}")


class DenyDelete:
    async def authenticate(self, method, metadata):
        if metadata.get("x-api-key") != "good":
            raise errors.Unauthenticated("missing or unknown API key")
        if method.endswith("DeleteRegisteredModel"):
            raise errors.PermissionDenied(f"role viewer may not call {method}")
        return Principal(subject="ana", role="viewer")


@pytest.fixture
def settings(tmp_path):
    return load_settings(home=tmp_path)


@pytest.fixture
async def served(settings):
    servicer = Servicer()
    running = await create_server(
        "registry",
        [GrpcService(SERVICE, servicer, registry_pb2_grpc.add_RegistryServiceServicer_to_server)],
        settings,
        port=0,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, servicer, registry_pb2_grpc.RegistryServiceStub(channel), channel
    await channel.close()
    await running.stop(0)


async def get(stub, name):
    return await stub.GetRegisteredModel(registry_pb2.GetRegisteredModelRequest(name=name))


async def test_domain_errors_map_to_status_with_details(served):
    _, _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await get(stub, "models/bad")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details() == "name: must match models/{model}"
    status = rpc_status.from_call(bad.value)
    violation = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "name"

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get(stub, "models/missing")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await get(stub, "models/busy")
    retry = error_details_pb2.RetryInfo()
    assert rpc_status.from_call(busy.value).details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500


async def test_unexpected_error_is_internal_without_internals(served, caplog):
    _, _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as crash:
        await get(stub, "models/crash")
    assert crash.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in crash.value.details()
    error_id = crash.value.details().split("error id ")[1].rstrip(")")
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


async def test_unimplemented_method_says_which(served):
    _, _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteAlias(registry_pb2.DeleteAliasRequest(name="models/a/aliases/b"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "RegistryService/DeleteAlias" in err.value.details()


async def test_error_in_a_stream_after_messages(served):
    _, _, stub, _ = served
    call = stub.DownloadArtifact(
        registry_pb2.DownloadArtifactRequest(name="models/a/versions/1", kind="onnx")
    )
    received = []

    async def drain():
        async for chunk in call:
            received.append(chunk.data)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await drain()
    assert received == [b"abc"]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "kind 'onnx'" in err.value.details()


async def test_health_reports_serving_then_not_serving(settings):
    running = await create_server(
        "registry",
        [GrpcService(SERVICE, Servicer(), registry_pb2_grpc.add_RegistryServiceServicer_to_server)],
        settings,
        port=0,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await running.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.stop(0)


async def test_graceful_stop_drains_in_flight_calls(served):
    running, servicer, stub, _ = served
    in_flight = asyncio.create_task(get(stub, "models/slow"))
    await servicer.started.wait()
    await running.stop(5.0)
    reply = await in_flight
    assert reply.name == "models/slow"
    with pytest.raises(grpc.aio.AioRpcError) as after:
        await get(stub, "models/x")
    assert after.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_cancels_calls_that_outlive_the_grace(served):
    running, servicer, stub, _ = served
    in_flight = asyncio.create_task(get(stub, "models/slow"))
    await servicer.started.wait()
    await running.stop(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await in_flight
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_taken_port_is_a_clear_error(settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(
            errors.Unavailable, match=f"registry: cannot listen on 127.0.0.1:{port}"
        ):
            await create_server(
                "registry",
                [
                    GrpcService(
                        SERVICE, Servicer(), registry_pb2_grpc.add_RegistryServiceServicer_to_server
                    )
                ],
                settings,
                port=port,
            )


async def test_auth_hook_decides_and_health_stays_open(settings):
    running = await create_server(
        "registry",
        [GrpcService(SERVICE, Servicer(), registry_pb2_grpc.add_RegistryServiceServicer_to_server)],
        settings,
        port=0,
        auth=DenyDelete(),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await get(stub, "models/a")
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.GetRegisteredModel(
            registry_pb2.GetRegisteredModelRequest(name="models/a"),
            metadata=[("x-api-key", "good")],
        )
        assert reply.owner == "ana"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.DeleteRegisteredModel(
                registry_pb2.DeleteRegisteredModelRequest(name="models/a"),
                metadata=[("x-api-key", "good")],
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    await running.stop(0)


def install_provider(provider):
    # The global provider can be set once per process; tests need their own.
    trace._TRACER_PROVIDER_SET_ONCE._done = False
    trace.set_tracer_provider(provider)


async def test_server_span_continues_the_callers_trace(settings):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_provider(provider)
    running = await create_server(
        "registry",
        [GrpcService(SERVICE, Servicer(), registry_pb2_grpc.add_RegistryServiceServicer_to_server)],
        settings,
        port=0,
    )
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        await registry_pb2_grpc.RegistryServiceStub(channel).GetRegisteredModel(
            registry_pb2.GetRegisteredModelRequest(name="models/traced"),
            metadata=[("traceparent", f"00-{caller_trace}-{caller_span}-01")],
        )
    await running.stop(0)
    provider.shutdown()
    spans = [s for s in exporter.get_finished_spans() if "GetRegisteredModel" in s.name]
    assert len(spans) == 1
    assert f"{spans[0].context.trace_id:032x}" == caller_trace
    assert f"{spans[0].parent.span_id:016x}" == caller_span
    assert spans[0].kind == trace.SpanKind.SERVER
    assert spans[0].attributes["aimass.service"] == "registry"
