"""Service-to-service channels (aimass.core.clients.open_channel) send the caller's
credential on every kind of call: grpc.aio files an interceptor under one call kind only,
so streaming calls (the routing service downloading an ONNX file from the registry) once
went out without it and were refused when auth is on."""

from __future__ import annotations

import grpc
import pytest

from aimass.core.clients import open_channel
from aimass.core.settings import load_settings
from aimass.registry.v1 import registry_pb2 as rpb
from aimass.registry.v1 import registry_pb2_grpc


class _RecordMetadata(grpc.GenericRpcHandler):
    """Records each call's metadata and serves nothing (the call fails UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> None:
        self.seen[details.method.rsplit("/", 1)[-1]] = dict(details.invocation_metadata)


@pytest.mark.asyncio
async def test_every_call_kind_carries_the_credential():
    recorder = _RecordMetadata()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([recorder])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}", load_settings(), lambda: {"x-api-key": "k1"})
    stub = registry_pb2_grpc.RegistryServiceStub(channel)

    async def upload():
        yield rpb.UploadArtifactRequest()

    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetModelVersion(rpb.GetModelVersionRequest(name="models/m/versions/1"))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stub.DownloadArtifact(rpb.DownloadArtifactRequest(name="x")):
                pass
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.UploadArtifact(upload())
    finally:
        await channel.close()
        await server.stop(0)
    assert set(recorder.seen) == {"GetModelVersion", "DownloadArtifact", "UploadArtifact"}
    for method, metadata in recorder.seen.items():
        assert metadata.get("x-api-key") == "k1", (method, metadata)
