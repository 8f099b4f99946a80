"""A real data service, registry and evaluation service wired together on a migrated SQLite
database, a file:// artifact store and a fresh JetStream server; small ONNX models made here.

Models are logistic/linear layers fitted with torch on the data, then written as ONNX
graphs with the onnx helper API (standardise -> Gemm), dynamic batch axis.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import torch
from google.protobuf import struct_pb2
from onnx import TensorProto, helper, numpy_helper

from aimass.common.v1 import common_pb2
from aimass.data import config as cfg
from aimass.data.examples import write_breast_cancer_csv
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.evaluation.v1 import evaluation_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.fixtures.stack import Stack, serve_stack, stack_settings

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip


def linear_onnx(weights: np.ndarray, bias: np.ndarray, mean: np.ndarray, std: np.ndarray) -> bytes:
    """(x - mean) / std @ weights + bias as an ONNX graph with a dynamic batch axis."""
    d, outputs = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["input", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["scaled"]),
            helper.make_node("Gemm", ["scaled", "weights", "bias"], ["output"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in
         (("mean", mean), ("std", std), ("weights", weights), ("bias", bias))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fit_linear(x: np.ndarray, y: np.ndarray, outputs: int, steps: int, classify: bool) -> bytes:
    """A torch linear layer fitted on standardised x; returned as ONNX."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    features = torch.tensor((x - mean) / std, dtype=torch.float32)
    layer = torch.nn.Linear(x.shape[1], outputs)
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.tensor(y, dtype=torch.long if classify else torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    for _ in range(steps):
        optimiser.zero_grad()
        out = layer(features)
        loss = loss_fn(out, target) if classify else loss_fn(out.squeeze(1), target)
        loss.backward()
        optimiser.step()
    weights = layer.weight.detach().numpy().T
    return linear_onnx(weights, layer.bias.detach().numpy(), mean, std)


@dataclass
class Env:
    stack: Stack
    root: Path
    data: data_pb2_grpc.DataServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    evaluation: evaluation_pb2_grpc.EvaluationServiceStub

    async def ingest(self, dataset_id: str, path: Path, label: str = "", **config: Any) -> str:
        dataset = data_pb2.Dataset(
            config=cfg.from_dict({"data_path": str(path), "label_column": label, **config})
        )
        await self.data.CreateDataset(
            data_pb2.CreateDatasetRequest(dataset=dataset, dataset_id=dataset_id)
        )
        job = await self.data.IngestDataset(
            data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}")
        )
        async for event in self.data.WatchIngestJob(data_pb2.WatchIngestJobRequest(name=job.name)):
            if event.status.state in TERMINAL:
                break
        job = await self.data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
        assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
        return job.dataset_version

    async def register(
        self, model_id: str, onnx_bytes: bytes | None, dataset_version: str, **config: Any
    ) -> str:
        """A new version of ``model_id`` with ``onnx_bytes`` (None: a state_dict only)."""
        with contextlib.suppress(grpc.aio.AioRpcError):  # exists already
            await self.registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(
                    registered_model=registry_pb2.RegisteredModel(), registered_model_id=model_id
                )
            )
        content, kind = (
            (onnx_bytes, "onnx") if onnx_bytes is not None else (b"weights", "state_dict")
        )
        header = registry_pb2.UploadArtifactHeader(
            kind=kind, file_name=f"model.{kind}", sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
        )  # fmt: skip

        async def messages() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            yield registry_pb2.UploadArtifactRequest(header=header)
            yield registry_pb2.UploadArtifactRequest(
                chunk=common_pb2.ByteChunk(offset=0, data=content)
            )

        artifact = await self.registry.UploadArtifact(messages())
        values = struct_pb2.Struct()
        values.update(config)
        version = await self.registry.CreateModelVersion(
            registry_pb2.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=registry_pb2.ModelVersion(
                    artifacts=[artifact], framework="onnx",
                    config=common_pb2.Config(values=values),
                    source=registry_pb2.VersionSource(dataset_version=dataset_version),
                ),
            )
        )  # fmt: skip
        return version.name

    async def wait(self, name: str) -> tuple[pb.Evaluation, list[common_pb2.JobEvent]]:
        events = []
        request = pb.WatchEvaluationRequest(name=name)
        async for event in self.evaluation.WatchEvaluation(request, timeout=120):
            events.append(event)
        return await self.evaluation.GetEvaluation(pb.GetEvaluationRequest(name=name)), events


@pytest.fixture
async def env(tmp_path: Path, nats_url: str, migrated_db_url: str) -> AsyncIterator[Env]:
    db_url = migrated_db_url  # SQLite and the real PostgreSQL
    root = tmp_path / "data"
    root.mkdir()
    settings = stack_settings(tmp_path / "home", db_url, nats_url, data_roots=[root])
    async with serve_stack(settings, ["data", "registry", "evaluation"]) as stack:
        yield Env(
            stack, root,
            data_pb2_grpc.DataServiceStub(stack.channel("data")),
            registry_pb2_grpc.RegistryServiceStub(stack.channel("registry")),
            evaluation_pb2_grpc.EvaluationServiceStub(stack.channel("evaluation")),
        )  # fmt: skip


def breast_cancer(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    path = write_breast_cancer_csv(root)
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    return path, table[:, :-1], table[:, -1].astype(np.int64)
