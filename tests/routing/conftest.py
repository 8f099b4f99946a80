"""Real components for the routing tests: a Triton server of the nvidia-pytriton wheel
(tests/fixtures/triton.py, shared with compression), NATS, a migrated SQLite database, the
registry and the routing service, shared by the tests of a module, and small ONNX models."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import pytest_asyncio

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.core.service import start_service
from aimass.core.settings import Settings
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.config import RoutingConfig
from aimass.routing.main import build
from aimass.routing.repository import Backend
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import free_port, serve_service, stack_settings
from tests.fixtures.triton import TritonProcess, triton

__all__ = ["TritonProcess", "triton"]

IN_FEATURES = 8
CLASSES = 3


def make_onnx(seed: int, in_features: int = IN_FEATURES) -> tuple[bytes, object]:
    """A small MLP exported to ONNX with a dynamic batch axis, and the torch module."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES)
    ).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(2, in_features),),
        buffer,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    return buffer.getvalue(), model


@pytest.fixture(scope="session")
def models() -> dict[str, tuple[bytes, object]]:
    return {"a": make_onnx(0), "b": make_onnx(1), "wide": make_onnx(2, in_features=12)}


def reference(model: object, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()  # type: ignore[operator]


@dataclass
class RoutingStack:
    settings: Settings
    config: RoutingConfig
    registry: registry_pb2_grpc.RegistryServiceStub
    routing: routing_pb2_grpc.RoutingServiceStub
    prediction: routing_pb2_grpc.PredictionServiceStub
    routing_address: str
    channels: list[grpc.aio.Channel]
    # The in-process routing service's Router (None when it runs as its own process).
    router: object = None

    async def register(self, model_id: str, data: bytes, kind: str = "onnx", signature=None) -> str:
        """A new version of ``model_id`` (created when missing) with ``data`` as its artifact."""
        try:
            await self.registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(
                    registered_model=registry_pb2.RegisteredModel(), registered_model_id=model_id
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

        async def chunks() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            header = registry_pb2.UploadArtifactHeader(
                kind=kind,
                file_name=f"model.{kind}",
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )
            yield registry_pb2.UploadArtifactRequest(header=header)
            yield registry_pb2.UploadArtifactRequest(chunk=common_pb2.ByteChunk(data=data))

        artifact = await self.registry.UploadArtifact(chunks())
        version = await self.registry.CreateModelVersion(
            registry_pb2.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=registry_pb2.ModelVersion(
                    artifacts=[artifact], framework="onnx", signature=signature
                ),
            )
        )
        return version.name

    async def create(
        self, deployment_id: str, routes: list[tuple[str, int]], **fields
    ) -> pb.Deployment:
        deployment = pb.Deployment(
            routes=[pb.Route(model=m, weight_percent=w) for m, w in routes], **fields
        )
        return await self.routing.CreateDeployment(
            pb.CreateDeploymentRequest(deployment=deployment, deployment_id=deployment_id)
        )

    async def wait_state(self, name: str, *states: str, timeout_s: float = 60) -> pb.Deployment:
        wanted = {pb.DeploymentState.Value(f"DEPLOYMENT_STATE_{s}") for s in states}
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.routing.GetDeployment(pb.GetDeploymentRequest(name=name))
            if found.state in wanted:
                return found
            assert time.monotonic() < deadline, f"{name} stayed {found.state}: {found.state_reason}"
            await asyncio.sleep(0.05)

    async def deploy(
        self, deployment_id: str, routes: list[tuple[str, int]], **fields
    ) -> pb.Deployment:
        created = await self.create(deployment_id, routes, **fields)
        return await self.wait_state(created.name, "READY")

    async def predict(self, deployment: str, batch: np.ndarray, **fields) -> pb.PredictResponse:
        request = predict_request(deployment, batch, **fields)
        return await self.prediction.Predict(request)


def predict_request(
    deployment: str, batch: np.ndarray, name: str = "input", **fields
) -> pb.PredictRequest:
    return pb.PredictRequest(
        deployment=deployment,
        inputs=[common_pb2.InferTensor(name=name, datatype="FP32", shape=list(batch.shape))],
        raw_input_contents=[batch.astype(np.float32).tobytes()],
        **fields,
    )


def output_of(response: pb.PredictResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        tuple(response.outputs[0].shape)
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[RoutingStack]:
    """registry + routing on SQLite and a fresh NATS; Triton when the module asks for it."""
    base = tmp_path_factory.mktemp("routing")
    nats = NatsServer(base / "nats")
    nats.start()
    db_url = f"sqlite:///{base / 'aimass.db'}"
    upgrade(db_url)
    settings = stack_settings(base / "home", db_url, nats.url, max_message_mb=4)
    uses_triton = getattr(request.module, "USES_TRITON", False)
    triton: TritonProcess | None = request.getfixturevalue("triton") if uses_triton else None
    config = RoutingConfig(
        triton_grpc=triton.grpc_address if triton else "",
        triton_repository=str(triton.repository) if triton else "",
        triton_backend=Backend.PYTHON,
        metrics_port=free_port(),
        health_interval_s=0.3,
        cache_dir=base / "cache",
        drain_timeout_s=5.0,
    )
    async with serve_service("registry", settings):
        running, ctx = await start_service(
            "routing",
            functools.partial(build, config=config),
            settings,
            port=settings.ports.routing,
        )
        await ctx.resources["router"].ready.wait()
        channels = [
            grpc.aio.insecure_channel(settings.service_address(n)) for n in ("registry", "routing")
        ]
        try:
            yield RoutingStack(
                settings=settings,
                config=config,
                registry=registry_pb2_grpc.RegistryServiceStub(channels[0]),
                routing=routing_pb2_grpc.RoutingServiceStub(channels[1]),
                prediction=routing_pb2_grpc.PredictionServiceStub(channels[1]),
                routing_address=settings.service_address("routing"),
                channels=channels,
                router=ctx.resources["router"],
            )
        finally:
            for channel in channels:
                await channel.close()
            await running.stop(0)
    nats.stop()
    shutil.rmtree(base / "nats", ignore_errors=True)
