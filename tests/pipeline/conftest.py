"""Real services for pipeline runs: data, registry, evaluation, compression, routing and the
pipeline service on a migrated SQLite database, a file:// artifact store and a fresh JetStream
server. Routing serves in process (onnxruntime): no Triton is configured here.

Where a spec skips the train stage, the model version is trained here with the network
catalogue (aimass.core.nn) and registered the way training registers its results.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import struct_pb2

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.core.db.migrate import upgrade
from aimass.core.splits import decode
from aimass.data.examples import write_breast_cancer_csv
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.fixtures.stack import Stack, free_port, serve_stack, stack_settings

SERVICES = ["data", "registry", "training", "evaluation", "compression", "routing", "pipeline"]
TERMINAL = {pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED}
MLP = {"task": "TASK_CLASSIFICATION", "mlp": {"hidden_sizes": [16]}}


@dataclass
class Env:
    stack: Stack
    root: Path
    tmp: Path
    data: data_pb2_grpc.DataServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    pipeline: pipeline_pb2_grpc.PipelineServiceStub

    @contextlib.asynccontextmanager
    async def training_worker(self) -> AsyncIterator[None]:
        """An in-process training worker pulling the work queue (one torch thread)."""
        from aimass.training.worker import TrainingWorker

        worker = TrainingWorker(self.stack.settings, name="pipeline-test-worker", threads=1)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    def spec(self, **sections: Any) -> pb.PipelineSpec:
        """A breast-cancer spec; ``sections`` replace or add sections (None drops one)."""
        data: dict[str, Any] = {
            "dataset": {
                "name": "cancer", "data_path": str(write_breast_cancer_csv(self.root)),
                "label_column": "target", "splitting": {"train": 70, "valid": 15, "test": 15},
                "seed": 0, "stratify": True,
            },
            "model": {"name": "cancer-mlp", **MLP},
        }  # fmt: skip
        data.update(sections)
        return specs.from_dict({k: v for k, v in data.items() if v is not None})

    async def start(self, spec: pb.PipelineSpec, run_id: str = "") -> pb.PipelineRun:
        return await self.pipeline.CreatePipelineRun(
            pb.CreatePipelineRunRequest(
                pipeline_run=pb.PipelineRun(spec=spec), pipeline_run_id=run_id
            )
        )

    async def wait(self, name: str, timeout_s: float = 150.0) -> tuple[pb.PipelineRun, list[Any]]:
        """Follows the Watch stream to the end; the last run and every state seen."""
        seen = []
        request = pb.WatchPipelineRunRequest(name=name)
        async for run in self.pipeline.WatchPipelineRun(request, timeout=timeout_s):
            seen.append(run)
        return seen[-1], seen

    async def ingest(self, dataset_id: str) -> str:
        """A READY breast-cancer version ingested directly (not by a pipeline)."""
        from aimass.data import config as cfg

        config = cfg.from_dict({
            "data_path": str(write_breast_cancer_csv(self.root)), "label_column": "target",
            "splitting": {"train": 70, "valid": 15, "test": 15}, "seed": 0, "stratify": True,
        })  # fmt: skip
        await self.data.CreateDataset(
            data_pb2.CreateDatasetRequest(
                dataset=data_pb2.Dataset(config=config), dataset_id=dataset_id
            )
        )
        job = await self.data.IngestDataset(
            data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}")
        )
        async for event in self.data.WatchIngestJob(data_pb2.WatchIngestJobRequest(name=job.name)):
            if event.status.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED):
                break
        job = await self.data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
        assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
        return job.dataset_version

    async def train_and_register(
        self, model_id: str, dataset_version: str, epochs: int = 20
    ) -> str:
        """A small MLP trained here and registered as training registers (ONNX, state dict)."""
        dataset = await self.data.GetDatasetVersion(
            data_pb2.GetDatasetVersionRequest(name=dataset_version)
        )
        data = ann.data_signature_from_version(dataset)
        model_spec = ann.spec_from_dict(MLP)
        torch.manual_seed(0)
        torch.set_num_threads(1)
        built = ann.build_model(model_spec, data)
        request = data_pb2.ReadSplitRequest(
            name=dataset_version, split=common_pb2.DATASET_SPLIT_TRAIN
        )
        table = decode([r async for r in self.data.ReadSplit(request)])
        inputs, labels = ann.table_to_tensors(table, built.signature)
        loss_fn = ann.loss_function(built.signature)
        optimizer = torch.optim.Adam(built.module.parameters(), lr=1e-2)
        for _ in range(epochs):
            for start in range(0, labels.shape[0], 64):
                optimizer.zero_grad()
                batch = slice(start, start + 64)
                loss_fn(built.module(*(t[batch] for t in inputs)), labels[batch]).backward()
                optimizer.step()
        built.module.eval()
        path = self.tmp / f"{model_id}.onnx"
        ann.export_onnx(built.module, built.signature, path, sample=tuple(t[:8] for t in inputs))
        buffer = io.BytesIO()
        torch.save(built.module.state_dict(), buffer)
        config = {"model": ann.spec_to_dict(model_spec), "data_signature": data.to_dict(),
                  "signature": built.signature.to_dict(), "task": built.signature.task,
                  "training": {"learning_rate": 1e-2, "batch_size": 64}}  # fmt: skip
        artifacts = {"onnx": path.read_bytes(), "state_dict": buffer.getvalue()}
        return await self._register(model_id, artifacts, dataset_version, config)

    async def _register(
        self, model_id: str, artifacts: dict[str, bytes], dataset_version: str,
        config: dict[str, Any],
    ) -> str:  # fmt: skip
        with contextlib.suppress(grpc.aio.AioRpcError):  # exists already
            await self.registry.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(
                    registered_model=registry_pb2.RegisteredModel(), registered_model_id=model_id
                )
            )
        uploaded = [await self._upload(content, kind) for kind, content in artifacts.items()]
        values = struct_pb2.Struct()
        values.update(config)
        version = await self.registry.CreateModelVersion(
            registry_pb2.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=registry_pb2.ModelVersion(
                    artifacts=uploaded, framework="onnx", config=common_pb2.Config(values=values),
                    source=registry_pb2.VersionSource(dataset_version=dataset_version),
                ),
            )
        )  # fmt: skip
        return version.name

    async def _upload(self, content: bytes, kind: str) -> common_pb2.Artifact:
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


def pipeline_settings(tmp_path: Path, nats_url: str, **overrides: Any) -> Any:
    db_url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(db_url)
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    return stack_settings(
        tmp_path / "home", db_url, nats_url, data_roots=[root],
        ports={"pipeline": free_port(), "metrics": free_port()}, **overrides,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def open_env(
    tmp_path: Path, nats_url: str, services: Sequence[str] = SERVICES
) -> AsyncIterator[Env]:
    settings = pipeline_settings(tmp_path, nats_url)
    async with serve_stack(settings, services) as stack:
        yield Env(
            stack, settings.data_roots[0], tmp_path,
            data_pb2_grpc.DataServiceStub(stack.channel("data")),
            registry_pb2_grpc.RegistryServiceStub(stack.channel("registry")),
            pipeline_pb2_grpc.PipelineServiceStub(stack.channel("pipeline"))
            if "pipeline" in services else None,  # type: ignore[arg-type]
        )  # fmt: skip


@pytest.fixture
async def env(tmp_path: Path, nats_url: str) -> AsyncIterator[Env]:
    async with open_env(tmp_path, nats_url) as opened:
        yield opened


def stages_by_name(run: pb.PipelineRun) -> dict[str, pb.StageStatus]:
    return {pb.Stage.Name(s.stage): s for s in run.stages}
