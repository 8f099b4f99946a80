"""A real data service, registry and compression service on a migrated SQLite database,
a file:// artifact store and a JetStream server; digits parents trained here with the
network catalogue and registered the way training registers them (ONNX + state dict +
config with the model spec, data signature and signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import struct_pb2

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.compression.v1 import compression_pb2_grpc
from aimass.core import nn as ann
from aimass.core.db.migrate import upgrade
from aimass.core.splits import decode
from aimass.data import config as cfg
from aimass.data.examples import write_digits_csv
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from aimass.training.worker import TrainingWorker
from tests.fixtures.stack import Stack, serve_stack, stack_settings
from tests.training.conftest import worker_settings

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip


@dataclass
class Env:
    stack: Stack
    root: Path
    data: data_pb2_grpc.DataServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    compression: compression_pb2_grpc.CompressionServiceStub

    async def ingest(self, dataset_id: str, path: Path, label: str, **config: Any) -> str:
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

    async def split(self, dataset_version: str, split: int) -> Any:
        request = data_pb2.ReadSplitRequest(name=dataset_version, split=split)
        return decode([r async for r in self.data.ReadSplit(request)])

    async def upload(self, content: bytes, kind: str) -> common_pb2.Artifact:
        header = registry_pb2.UploadArtifactHeader(
            kind=kind, file_name=f"model.{kind}", sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
        )  # fmt: skip

        async def messages() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            yield registry_pb2.UploadArtifactRequest(header=header)
            yield registry_pb2.UploadArtifactRequest(
                chunk=common_pb2.ByteChunk(offset=0, data=content)
            )

        return await self.registry.UploadArtifact(messages())

    async def register(
        self, model_id: str, artifacts: dict[str, bytes], dataset_version: str,
        config: dict[str, Any], tags: dict[str, str] | None = None,
    ) -> registry_pb2.ModelVersion:  # fmt: skip
        with contextlib.suppress(grpc.aio.AioRpcError):  # exists already
            await self.registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(
                    registered_model=registry_pb2.RegisteredModel(), registered_model_id=model_id
                )
            )
        uploaded = [await self.upload(content, kind) for kind, content in artifacts.items()]
        values = struct_pb2.Struct()
        values.update(config)
        return await self.registry.CreateModelVersion(
            registry_pb2.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=registry_pb2.ModelVersion(
                    artifacts=uploaded, framework="onnx", config=common_pb2.Config(values=values),
                    source=registry_pb2.VersionSource(dataset_version=dataset_version),
                    tags=tags or {},
                ),
            )
        )  # fmt: skip

    async def train_and_register(
        self, model_id: str, dataset_version: str, spec: dict[str, Any], epochs: int,
        tmp: Path, tags: dict[str, str] | None = None,
    ) -> registry_pb2.ModelVersion:  # fmt: skip
        dataset = await self.data.GetDatasetVersion(
            data_pb2.GetDatasetVersionRequest(name=dataset_version)
        )
        data = ann.data_signature_from_version(dataset)
        model_spec = ann.spec_from_dict(spec)
        torch.manual_seed(0)
        torch.set_num_threads(1)
        built = ann.build_model(model_spec, data)
        table = await self.split(dataset_version, common_pb2.DATASET_SPLIT_TRAIN)
        inputs, labels = ann.table_to_tensors(table, built.signature)
        loss_fn = ann.loss_function(built.signature)
        optimizer = torch.optim.Adam(built.module.parameters(), lr=1e-3)
        for _ in range(epochs):
            order = torch.randperm(labels.shape[0])
            for start in range(0, labels.shape[0], 64):
                index = order[start : start + 64]
                optimizer.zero_grad()
                loss_fn(built.module(*(t[index] for t in inputs)), labels[index]).backward()
                optimizer.step()
        built.module.eval()
        path = tmp / f"{model_id}.onnx"
        ann.export_onnx(built.module, built.signature, path, sample=tuple(t[:8] for t in inputs))
        buffer = io.BytesIO()
        torch.save(built.module.state_dict(), buffer)
        config = {"model": ann.spec_to_dict(model_spec), "data_signature": data.to_dict(),
                  "signature": built.signature.to_dict(), "task": built.signature.task,
                  "training": {"learning_rate": 1e-3, "batch_size": 64}}  # fmt: skip
        artifacts = {"onnx": path.read_bytes(), "state_dict": buffer.getvalue()}
        return await self.register(model_id, artifacts, dataset_version, config, tags)

    async def run_job(self, parent: str, recipe: pb.Recipe, **fields: Any) -> pb.CompressionJob:
        job = await self.compression.CreateCompressionJob(
            pb.CreateCompressionJobRequest(
                compression_job=pb.CompressionJob(parent_version=parent, recipe=recipe, **fields)
            )
        )
        return await self.wait(job.name)

    async def wait(self, name: str) -> pb.CompressionJob:
        request = pb.WatchCompressionJobRequest(name=name)
        async for _ in self.compression.WatchCompressionJob(request, timeout=300):
            pass
        return await self.compression.GetCompressionJob(pb.GetCompressionJobRequest(name=name))


@pytest.fixture
async def env(tmp_path: Path, nats_url: str) -> AsyncIterator[Env]:
    async with open_env(tmp_path, nats_url) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_env(
    tmp_path: Path, nats_url: str, extra: tuple[str, ...] = ()
) -> AsyncIterator[Env]:
    """The stack of :class:`Env`; compression reads its Triton from the environment now."""
    db_url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(db_url)
    root = tmp_path / "data"
    root.mkdir()
    settings = stack_settings(tmp_path / "home", db_url, nats_url, data_roots=[root])
    async with serve_stack(settings, ["data", "registry", *extra, "compression"]) as stack:
        yield Env(
            stack, root,
            data_pb2_grpc.DataServiceStub(stack.channel("data")),
            registry_pb2_grpc.RegistryServiceStub(stack.channel("registry")),
            compression_pb2_grpc.CompressionServiceStub(stack.channel("compression")),
        )  # fmt: skip


async def digits(env: Env, dataset_id: str = "digits", **config: Any) -> str:
    path = write_digits_csv(env.root)
    return await env.ingest(dataset_id, path, "digit", **config)


MLP = {"mlp": {"hidden_sizes": [128, 64]}}


@contextlib.asynccontextmanager
async def open_training_env(tmp_path: Path, nats_url: str) -> AsyncIterator[TrainingEnv]:
    """:class:`Env` with the training service and one in-process training worker: fine_tune
    and distill steps run as training jobs there."""
    async with open_env(tmp_path, nats_url, extra=("training",)) as env:
        worker = TrainingWorker(worker_settings(env.stack.settings), name="compression-w1",
                                threads=1)  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield TrainingEnv(
                env.stack, env.root, env.data, env.registry, env.compression,
                training_pb2_grpc.TrainingServiceStub(env.stack.channel("training")),
            )  # fmt: skip
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


@dataclass
class TrainingEnv(Env):
    training: training_pb2_grpc.TrainingServiceStub

    async def training_job(self, name: str) -> tpb.TrainingJob:
        return await self.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=name))

    async def training_logs(self, name: str) -> list[str]:
        response = await self.training.ListTrainingJobLogs(
            tpb.ListTrainingJobLogsRequest(parent=name)
        )
        return [entry.message for entry in response.log_entries]


@pytest.fixture
async def train_env(tmp_path: Path, nats_url: str) -> AsyncIterator[TrainingEnv]:
    async with open_training_env(tmp_path, nats_url) as opened:
        yield opened
