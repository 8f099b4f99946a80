"""One real stack for a whole fuzz module: the FUZZED_SERVICES on a migrated SQLite file, a
file:// artifact store and a JetStream server of their own, seeded with real rows.

The seeds (the digits dataset ingested, a registered model with a version carrying an ONNX
artifact, an alias, a release, an evaluation and a benchmark, a training job and a worker,
a compression job and a disabled policy, an inference server and a deployment, a pipeline
run) give the fuzzer real names to aim at, so random requests reach rows and not only the
name parsers. A fuzzed Delete may remove a seed: ``seeds.ensure()`` checks them before
each RPC's property and seeds a fresh set under new ids when one is gone.

No training worker runs: a training job (a pipeline's training stage) stays QUEUED until
``quiet()`` cancels it; compression jobs run in the compression service itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import onnx
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2, compression_pb2_grpc
from aimass.core.db.migrate import upgrade
from aimass.data import config as cfg
from aimass.data.examples import write_digits_csv
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation.v1 import evaluation_pb2, evaluation_pb2_grpc
from aimass.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc
from aimass.training.v1 import training_pb2, training_pb2_grpc
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import Stack, serve_stack, stack_settings
from tests.fuzz.harness import FUZZED_SERVICES, StateProbe

TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip
JOB_WAIT_S = 60.0
# Jobs an accepted fuzzed request started get this long to end before they are cancelled.
LET_FINISH_S = 3.0
CANCEL_WAIT_S = 30.0
M = TypeVar("M", bound=Message)


def digits_onnx() -> bytes:
    """A linear 64 -> 10 classifier of the digits pixels (random weights are enough here)."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 10)).astype(np.float32)
    bias = np.zeros(10, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "weights", "bias"], ["output"])],
        "digits_linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class FuzzStack:
    """The running services, their state probe and the seeded resource names."""

    stack: Stack
    root: Path
    probe: StateProbe
    names: list[str] = field(default_factory=list)
    # The seeded resources a fuzzed Delete or Cancel may take away, by kind.
    seeds: dict[str, str] = field(default_factory=dict)
    # Valid requests by message type (see protogen.MessageStrategies), of the last seeding.
    examples: dict[str, list[Message]] = field(default_factory=dict)
    generation: int = 0

    @property
    def data(self) -> data_pb2_grpc.DataServiceStub:
        return data_pb2_grpc.DataServiceStub(self.stack.channel("data"))

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.stack.channel("registry"))

    @property
    def evaluation(self) -> evaluation_pb2_grpc.EvaluationServiceStub:
        return evaluation_pb2_grpc.EvaluationServiceStub(self.stack.channel("evaluation"))

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(self.stack.channel("training"))

    @property
    def compression(self) -> compression_pb2_grpc.CompressionServiceStub:
        return compression_pb2_grpc.CompressionServiceStub(self.stack.channel("compression"))

    @property
    def routing(self) -> routing_pb2_grpc.RoutingServiceStub:
        return routing_pb2_grpc.RoutingServiceStub(self.stack.channel("routing"))

    @property
    def pipeline(self) -> pipeline_pb2_grpc.PipelineServiceStub:
        return pipeline_pb2_grpc.PipelineServiceStub(self.stack.channel("pipeline"))

    # --------------------------------------------------------------------- seeds

    async def seed(self) -> None:
        """A complete set of real resources under fresh ids; their names become the pool."""
        self.generation += 1
        self.examples = {}
        suffix = "" if self.generation == 1 else f"-{self.generation}"
        dataset_id, model_id = f"digits{suffix}", f"digits-mlp{suffix}"
        dataset_version, job_name = await self._ingest(dataset_id)
        upload = await self._upload_data(b"a,b\n1,2\n3,4\n")
        artifact = await self._upload_artifact(digits_onnx())
        version = await self._register(model_id, artifact, dataset_version)
        alias = await self.registry.SetAlias(
            registry_pb2.SetAliasRequest(
                name=f"models/{model_id}/aliases/production", version=int(version.rsplit("/")[-1])
            )
        )
        release = await self.registry.CreateRelease(
            registry_pb2.CreateReleaseRequest(
                parent=version, release=registry_pb2.Release(), release_id="r1"
            )
        )
        evaluation = await self.evaluation.CreateEvaluation(
            evaluation_pb2.CreateEvaluationRequest(
                evaluation=evaluation_pb2.Evaluation(
                    model_version=version, dataset_version=dataset_version
                )
            )
        )
        benchmark = await self.evaluation.CreateBenchmark(
            evaluation_pb2.CreateBenchmarkRequest(
                benchmark=evaluation_pb2.Benchmark(
                    model_version=version, batch_sizes=[1], warmup_iterations=1, iterations=3
                )
            )
        )
        await self.quiet(let_finish_s=JOB_WAIT_S)  # seeds end on their own, given time
        self.seeds = {
            "dataset_version": dataset_version, "model_version": version,
            "alias": alias.name, "release": release.name,
            **await self._seed_later_services(model_id, version, dataset_version, suffix),
        }  # fmt: skip
        self.names = [
            f"datasets/{dataset_id}", dataset_version, job_name, upload, "digits.csv",
            f"models/{model_id}", version, alias.name, release.name, evaluation.name,
            benchmark.name, artifact.uri, artifact.sha256, dataset_id, model_id, "production",
            "r1", "onnx", "accuracy", "test", "train", *self.seeds.values(),
            "inferenceServers/onnxruntime", "int8", "far", "digits-endpoint",
        ]  # fmt: skip
        if release.bundle.uri:
            self.names.append(release.bundle.uri)

    def example(self, request: M) -> M:
        """``request``, kept as a valid example of its type for the fuzzer to mutate."""
        self.examples.setdefault(request.DESCRIPTOR.full_name, []).append(request)
        return request

    async def _seed_later_services(
        self, model_id: str, version: str, dataset_version: str, suffix: str
    ) -> dict[str, str]:
        """Training, compression, routing and pipeline rows aimed at the seeded version; the
        training and routing requests that made them (and valid updates and predictions) are
        kept as examples."""
        tpb, cpb, rpb, ppb = training_pb2, compression_pb2, routing_pb2, pipeline_pb2
        model = tpb.ModelSpec(task=common_pb2.TASK_CLASSIFICATION,
                              mlp=tpb.MlpSpec(hidden_sizes=[16]))  # fmt: skip
        training_job = await self.training.CreateTrainingJob(
            self.example(tpb.CreateTrainingJobRequest(training_job=tpb.TrainingJob(
                dataset_version=dataset_version, target_model=f"models/{model_id}", model=model,
                training=tpb.TrainingConfig(epochs=1),
            )))
        )  # fmt: skip
        await self.training.CancelTrainingJob(  # no worker runs here: it would stay QUEUED
            tpb.CancelTrainingJobRequest(name=training_job.name)
        )
        worker = await self.training.RegisterWorker(
            self.example(tpb.RegisterWorkerRequest(name=f"workers/w{suffix or '-1'}", host="fuzz"))
        )
        recipe = cpb.Recipe(steps=[cpb.CompressionStep(quantize_dynamic=cpb.QuantizeDynamic())])
        # No examples of compression or pipeline requests: their accepted variants start
        # jobs that quantize and evaluate (seconds each; a minute on a loaded machine), and an
        # enabled policy would start more after the call was compared.
        compression_job = await self.compression.CreateCompressionJob(
            cpb.CreateCompressionJobRequest(
                compression_job=cpb.CompressionJob(parent_version=version, recipe=recipe)
            )
        )
        # Disabled: an enabled policy would start jobs on every version a fuzzed
        # CreateModelVersion makes, after the call returned and its state was compared.
        policy = await self.compression.CreateCompressionPolicy(
            cpb.CreateCompressionPolicyRequest(
                parent=f"models/{model_id}", compression_policy_id="int8",
                compression_policy=cpb.CompressionPolicy(recipe=recipe, enabled=False),
            )
        )  # fmt: skip
        # A Triton nobody listens on: it turns UNREACHABLE once and stays so.
        server = await self.routing.CreateInferenceServer(
            self.example(rpb.CreateInferenceServerRequest(
                inference_server_id=f"far{suffix}",
                inference_server=rpb.InferenceServer(
                    kind=rpb.SERVER_KIND_TRITON, grpc_address="127.0.0.1:9"
                ),
            ))
        )  # fmt: skip
        self.example(rpb.UpdateInferenceServerRequest(inference_server=server))
        deployment = await self.routing.CreateDeployment(
            self.example(rpb.CreateDeploymentRequest(
                deployment_id=f"digits-endpoint{suffix}",
                deployment=rpb.Deployment(routes=[rpb.Route(model=version, weight_percent=100)]),
            ))
        )  # fmt: skip
        self.example(rpb.UpdateDeploymentRequest(deployment=deployment))
        predict = self.example(rpb.PredictRequest(
            deployment=deployment.name,
            inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=[2, 64])],
            raw_input_contents=[bytes(2 * 64 * 4)],
        ))  # fmt: skip
        self.example(rpb.PredictBatchRequest(requests=[predict, predict]))
        run = await self.pipeline.CreatePipelineRun(
            ppb.CreatePipelineRunRequest(pipeline_run=ppb.PipelineRun(
                spec=ppb.PipelineSpec(
                    dataset=ppb.DatasetSection(
                        dataset=dataset_version.split("/")[1], dataset_version=dataset_version
                    ),
                    model=ppb.ModelSection(model=model_id, model_version=version),
                )
            ))
        )  # fmt: skip
        await self.quiet(let_finish_s=JOB_WAIT_S)  # seeds end on their own, given time
        return {
            "training_job": training_job.name, "worker": worker.name,
            "compression_job": compression_job.name, "policy": policy.name,
            "server": server.name, "deployment": deployment.name, "pipeline_run": run.name,
        }  # fmt: skip

    async def ensure(self) -> None:
        """Seeds again when a fuzzed Delete removed one of the seeded resources."""
        seeds = self.seeds
        checks = [
            self.data.GetDatasetVersion(
                data_pb2.GetDatasetVersionRequest(name=seeds["dataset_version"])
            ),
            self.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=seeds["model_version"])
            ),
            self.registry.GetAlias(registry_pb2.GetAliasRequest(name=seeds["alias"])),
            self.registry.GetRelease(registry_pb2.GetReleaseRequest(name=seeds["release"])),
            self.compression.GetCompressionPolicy(
                compression_pb2.GetCompressionPolicyRequest(name=seeds["policy"])
            ),
            self.routing.GetInferenceServer(
                routing_pb2.GetInferenceServerRequest(name=seeds["server"])
            ),
            self.routing.GetDeployment(routing_pb2.GetDeploymentRequest(name=seeds["deployment"])),
        ]
        try:
            for check in checks:
                await check
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            await self.seed()

    async def _ingest(self, dataset_id: str) -> tuple[str, str]:
        dataset = data_pb2.Dataset(
            config=cfg.from_dict({"data_path": "digits.csv", "label_column": "digit"})
        )
        await self.data.CreateDataset(
            data_pb2.CreateDatasetRequest(dataset=dataset, dataset_id=dataset_id)
        )
        job = await self.data.IngestDataset(
            data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}", force=True)
        )
        request = data_pb2.WatchIngestJobRequest(name=job.name)
        async for event in self.data.WatchIngestJob(request, timeout=JOB_WAIT_S):
            if event.status.state in TERMINAL:
                break
        job = await self.data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
        assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
        return job.dataset_version, job.name

    async def _upload_data(self, content: bytes) -> str:
        header = data_pb2.UploadHeader(
            file_name="small.csv", size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )  # fmt: skip
        chunk = common_pb2.ByteChunk(offset=0, data=content)
        upload = await self.data.UploadData(
            iter(
                [data_pb2.UploadDataRequest(header=header), data_pb2.UploadDataRequest(chunk=chunk)]
            )
        )
        return str(upload.name)

    async def _upload_artifact(self, content: bytes) -> common_pb2.Artifact:
        header = registry_pb2.UploadArtifactHeader(
            kind="onnx", file_name="model.onnx", size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
        )  # fmt: skip
        chunk = common_pb2.ByteChunk(offset=0, data=content)
        return await self.registry.UploadArtifact(
            iter(
                [
                    registry_pb2.UploadArtifactRequest(header=header),
                    registry_pb2.UploadArtifactRequest(chunk=chunk),
                ]
            )
        )

    async def _register(
        self, model_id: str, artifact: common_pb2.Artifact, dataset_version: str
    ) -> str:
        await self.registry.CreateRegisteredModel(
            registry_pb2.CreateRegisteredModelRequest(
                registered_model=registry_pb2.RegisteredModel(), registered_model_id=model_id
            )
        )
        version = await self.registry.CreateModelVersion(
            registry_pb2.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=registry_pb2.ModelVersion(
                    artifacts=[artifact], framework="onnx",
                    source=registry_pb2.VersionSource(dataset_version=dataset_version),
                ),
            )
        )  # fmt: skip
        return str(version.name)

    # ------------------------------------------------------------------ quiet

    async def quiet(self, let_finish_s: float = LET_FINISH_S) -> None:
        """Waits until no job runs and every event left the outbox; cancels what lingers.

        Jobs that accepted fuzzed requests started (a benchmark of 2**31 iterations) get
        LET_FINISH_S, then a Cancel; a job that does not stop after it fails the test.
        Training jobs are cancelled at once: no worker runs here to take them.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + let_finish_s
        while await asyncio.to_thread(self._busy):
            if loop.time() > deadline:
                await self._cancel_unfinished()
                break
            await self._cancel_unfinished(tables=("training_jobs",))
            await asyncio.sleep(0.05)
        deadline = loop.time() + CANCEL_WAIT_S
        while await asyncio.to_thread(self._busy):
            if loop.time() > deadline:
                pytest.fail(
                    f"jobs did not stop after a cancel: {self.probe.unfinished_jobs()}, "
                    f"rows not at rest: {self.probe.unsettled_rows()}"
                )
            await asyncio.sleep(0.1)

    def _busy(self) -> bool:
        return (
            bool(self.probe.unfinished_jobs())
            or bool(self.probe.unsettled_rows())
            or self.probe.unpublished_events() > 0
        )

    async def _cancel_unfinished(self, tables: tuple[str, ...] | None = None) -> None:
        for table, name in await asyncio.to_thread(self.probe.unfinished_jobs):
            if tables is not None and table not in tables:
                continue
            try:
                if table == "ingest_jobs":
                    await self.data.CancelIngestJob(
                        data_pb2.CancelIngestJobRequest(name=f"ingestJobs/{name}")
                    )
                elif table == "evaluations":
                    await self.evaluation.CancelEvaluation(
                        evaluation_pb2.CancelEvaluationRequest(name=f"evaluations/{name}")
                    )
                elif table == "benchmarks":
                    await self.evaluation.CancelBenchmark(
                        evaluation_pb2.CancelBenchmarkRequest(name=f"benchmarks/{name}")
                    )
                elif table == "training_jobs":
                    await self.training.CancelTrainingJob(
                        training_pb2.CancelTrainingJobRequest(name=f"trainingJobs/{name}")
                    )
                elif table == "compression_jobs":
                    await self.compression.CancelCompressionJob(
                        compression_pb2.CancelCompressionJobRequest(name=f"compressionJobs/{name}")
                    )
                elif table == "pipeline_runs":
                    await self.pipeline.CancelPipelineRun(
                        pipeline_pb2.CancelPipelineRunRequest(name=f"pipelineRuns/{name}")
                    )
            except grpc.aio.AioRpcError as err:  # ended meanwhile
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise


@pytest.fixture(scope="module")
def fuzz_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("fuzz-nats")
    server = NatsServer(base / "store")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_stack(
    tmp_path_factory: pytest.TempPathFactory, fuzz_nats: str
) -> AsyncIterator[FuzzStack]:
    """The FUZZED_SERVICES running and seeded (see the module docstring)."""
    home = tmp_path_factory.mktemp("fuzz-home")
    root = home / "data"
    root.mkdir()
    write_digits_csv(root)
    db_url = f"sqlite:///{home / 'aimass.db'}"
    await asyncio.to_thread(upgrade, db_url)
    settings = stack_settings(home, db_url, fuzz_nats, data_roots=[root])
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        async with serve_stack(settings, list(FUZZED_SERVICES)) as stack:
            artifacts = Path(settings.artifact_root.removeprefix("file://"))
            fuzz = FuzzStack(stack, root, StateProbe(engine, artifacts))
            await fuzz.seed()
            yield fuzz
    finally:
        engine.dispose()
