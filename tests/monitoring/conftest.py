"""data + registry + routing (in-process ONNX Runtime) + evaluation on a real NATS and database.

The model is a logistic layer fitted with torch on the breast cancer data and written
as an ONNX graph (standardise -> Gemm), registered with the dataset version it was
fitted on, so a monitor finds the training split through the registry's lineage.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import duration_pb2
from onnx import TensorProto, helper, numpy_helper

from aimass.common.v1 import common_pb2
from aimass.data import config as cfg
from aimass.data.examples import write_breast_cancer_csv
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation.v1 import evaluation_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2 as rpb
from aimass.routing.v1 import routing_pb2_grpc
from tests.fixtures.stack import Stack, free_port, serve_stack, stack_settings

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip


def logistic_onnx(x: np.ndarray, y: np.ndarray) -> bytes:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    features = torch.tensor((x - mean) / std, dtype=torch.float32)
    layer = torch.nn.Linear(x.shape[1], 2)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.tensor(y, dtype=torch.long)
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(layer(features), target).backward()
        optimiser.step()
    weights, bias = layer.weight.detach().numpy().T, layer.bias.detach().numpy()
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["input", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["scaled"]),
            helper.make_node("Gemm", ["scaled", "weights", "bias"], ["logits"]),
        ],
        "logistic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", x.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in
         (("mean", mean), ("std", std), ("weights", weights), ("bias", bias))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class MonitoringEnv:
    stack: Stack
    data: data_pb2_grpc.DataServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    routing: routing_pb2_grpc.RoutingServiceStub
    prediction: routing_pb2_grpc.PredictionServiceStub
    evaluation: evaluation_pb2_grpc.EvaluationServiceStub
    features: np.ndarray
    version: str
    dataset_version: str

    async def deploy(self, deployment_id: str, sample_rate: float) -> rpb.Deployment:
        logging = rpb.PredictionLogging(
            sample_rate=sample_rate, flush_interval=duration_pb2.Duration(nanos=200_000_000)
        )
        created = await self.routing.CreateDeployment(
            rpb.CreateDeploymentRequest(
                deployment_id=deployment_id,
                deployment=rpb.Deployment(
                    routes=[rpb.Route(model=self.version, weight_percent=100)],
                    serving_config=rpb.ServingConfig(prediction_logging=logging),
                ),
            )
        )
        for _ in range(300):
            current = await self.routing.GetDeployment(rpb.GetDeploymentRequest(name=created.name))
            if current.state == rpb.DEPLOYMENT_STATE_READY:
                return current
            assert current.state != rpb.DEPLOYMENT_STATE_FAILED, current.state_reason
            await asyncio.sleep(0.1)
        raise AssertionError(f"{created.name} never turned READY")

    async def predict(self, deployment: str, batch: np.ndarray) -> rpb.PredictResponse:
        request = rpb.PredictRequest(
            deployment=deployment,
            inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=list(batch.shape))],
            raw_input_contents=[batch.astype(np.float32).tobytes()],
        )
        return await self.prediction.Predict(request, metadata=(("x-request-id", "test-req"),))


async def ingest(data: data_pb2_grpc.DataServiceStub, root: Path) -> str:
    path = write_breast_cancer_csv(root)
    dataset = data_pb2.Dataset(
        config=cfg.from_dict({"data_path": str(path), "label_column": "target"})
    )
    await data.CreateDataset(data_pb2.CreateDatasetRequest(dataset=dataset, dataset_id="cancer"))
    job = await data.IngestDataset(data_pb2.IngestDatasetRequest(name="datasets/cancer"))
    async for event in data.WatchIngestJob(data_pb2.WatchIngestJobRequest(name=job.name)):
        if event.status.state in TERMINAL:
            break
    job = await data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    return job.dataset_version


async def register(
    registry: registry_pb2_grpc.RegistryServiceStub, content: bytes, dataset_version: str
) -> str:
    await registry.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(
            registered_model=registry_pb2.RegisteredModel(), registered_model_id="cancer"
        )
    )
    header = registry_pb2.UploadArtifactHeader(
        kind="onnx", file_name="model.onnx", sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
    )  # fmt: skip

    async def messages() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(header=header)
        yield registry_pb2.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=content))

    artifact = await registry.UploadArtifact(messages())
    version = await registry.CreateModelVersion(
        registry_pb2.CreateModelVersionRequest(
            parent="models/cancer",
            model_version=registry_pb2.ModelVersion(
                artifacts=[artifact], framework="onnx",
                source=registry_pb2.VersionSource(dataset_version=dataset_version),
            ),
        )
    )  # fmt: skip
    return version.name


@pytest.fixture
async def monitoring(
    tmp_path: Path, nats_url: str, migrated_db_url: str
) -> AsyncIterator[MonitoringEnv]:
    root = tmp_path / "data"
    root.mkdir()
    settings = stack_settings(
        tmp_path / "home", migrated_db_url, nats_url, data_roots=[root],
        ports={"metrics": free_port()},
    )  # fmt: skip
    names = ["data", "registry", "routing", "evaluation"]
    async with serve_stack(settings, names) as stack:
        data = data_pb2_grpc.DataServiceStub(stack.channel("data"))
        dataset_version = await ingest(data, root)
        table = np.loadtxt(root / "breast_cancer.csv", delimiter=",", skiprows=1)
        features, labels = table[:, :-1], table[:, -1].astype(np.int64)
        registry = registry_pb2_grpc.RegistryServiceStub(stack.channel("registry"))
        version = await register(registry, logistic_onnx(features, labels), dataset_version)
        await stack.contexts["routing"].resources["router"].ready.wait()
        yield MonitoringEnv(
            stack, data, registry,
            routing_pb2_grpc.RoutingServiceStub(stack.channel("routing")),
            routing_pb2_grpc.PredictionServiceStub(stack.channel("routing")),
            evaluation_pb2_grpc.EvaluationServiceStub(stack.channel("evaluation")),
            features, version, dataset_version,
        )  # fmt: skip
