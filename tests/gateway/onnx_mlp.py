"""A small ONNX MLP (8 -> 16 -> ReLU -> 3, dynamic batch) built with onnx.helper, without
torch, and its upload to the registry: the model the Node Predict test and the gateway
benchmark deploy on the routing service's in-process ONNX Runtime backend."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2 as rpb
from aimass.registry.v1 import registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc

IN_FEATURES = 8
HIDDEN = 16
CLASSES = 3


def mlp_onnx(seed: int = 0) -> bytes:
    """Serialized model with input "input" [batch, 8] FP32 and output "logits" [batch, 3]."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in (
            ("w1", (IN_FEATURES, HIDDEN)),
            ("b1", (HIDDEN,)),
            ("w2", (HIDDEN, CLASSES)),
            ("b2", (CLASSES,)),
        )
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["active"]),
        helper.make_node("Gemm", ["active", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=weights,
    )
    # Opset 17 and IR 8: what every onnxruntime of the last years loads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


async def register_onnx(
    registry: registry_pb2_grpc.RegistryServiceStub,
    model_id: str,
    data: bytes,
    metadata: Sequence[tuple[str, str]] = (),
) -> str:
    """Creates ``models/<model_id>`` and a version with ``data`` as its ONNX artifact."""
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id=model_id), metadata=metadata
    )

    async def chunks() -> AsyncIterator[rpb.UploadArtifactRequest]:
        header = rpb.UploadArtifactHeader(
            kind="onnx",
            file_name="model.onnx",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
        yield rpb.UploadArtifactRequest(header=header)
        yield rpb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(data=data))

    artifact = await registry.UploadArtifact(chunks(), metadata=metadata)
    version = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(
            parent=f"models/{model_id}",
            model_version=rpb.ModelVersion(artifacts=[artifact], framework="onnx"),
        ),
        metadata=metadata,
    )
    return version.name


async def deploy_ready(
    routing: routing_pb2_grpc.RoutingServiceStub,
    deployment_id: str,
    version: str,
    metadata: Sequence[tuple[str, str]] = (),
    timeout_s: float = 60,
) -> str:
    """Deploys ``version`` (all traffic) and waits until the deployment is READY."""
    created = await routing.CreateDeployment(
        routing_pb2.CreateDeploymentRequest(
            deployment=routing_pb2.Deployment(
                routes=[routing_pb2.Route(model=version, weight_percent=100)]
            ),
            deployment_id=deployment_id,
        ),
        metadata=metadata,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        found = await routing.GetDeployment(
            routing_pb2.GetDeploymentRequest(name=created.name), metadata=metadata
        )
        if found.state == routing_pb2.DEPLOYMENT_STATE_READY:
            return found.name
        if time.monotonic() > deadline:
            raise TimeoutError(f"{created.name} stayed {found.state}: {found.state_reason}")
        await asyncio.sleep(0.05)
