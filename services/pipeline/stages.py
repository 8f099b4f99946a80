"""What each stage does, through the other services' gRPC APIs only.

A stage has two halves:

- ``launch``: creates the stage's job (ingest, training, evaluation,
  compression, deployment) with an idempotency key made of the run, the
  stage and its attempt, so a redelivered start event gets the job the first
  delivery created. Release and the smoke test are done in the call itself.
- ``check``: reads the job and says whether it succeeded (with what it
  produced, as PipelineSummary fields), failed (with the job's reason), or
  still runs (None).

Errors: a service that is down or overloaded raises :class:`Retry` (the start
event is redelivered later); a refusal (bad spec, missing version,
UNIMPLEMENTED) becomes :class:`StageFailed`, which stops the run naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
from google.protobuf import field_mask_pb2, json_format

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2, compression_pb2_grpc
from aimass.core.clients import ServiceChannels
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation.v1 import evaluation_pb2, evaluation_pb2_grpc
from aimass.pipeline.store import ActiveStage, stage_key
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc
from aimass.serving.endpoint import decode_response, encode_request
from aimass.training.v1 import training_pb2, training_pb2_grpc

# Codes that say "try again later": the start event is redelivered.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    # A create racing a duplicate of itself (same request id): the retry finds the first one.
    grpc.StatusCode.ALREADY_EXISTS,
}
CALL_TIMEOUT_S = 60.0
JOB_STATES = common_pb2.JobState


class Retry(Exception):
    """A service could not answer now; the stage is tried again later."""


class StageFailed(Exception):
    """The stage cannot succeed; ``reason`` names the service and what it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Launched:
    """The stage created ``resource``; events about ``waiting_on`` end it."""

    resource: str
    waiting_on: str


@dataclass(frozen=True)
class Outcome:
    """How a stage ended: its summary fields (proto JSON names), or why it failed."""

    succeeded: bool
    summary: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    resource: str = ""


@contextlib.asynccontextmanager
async def calling(service: str, what: str) -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as err:
        message = f"{service} {what}: {err.code().name}: {err.details()}"
        if err.code() in TRANSIENT:
            raise Retry(message) from err
        raise StageFailed(message) from err


def request_id(active: ActiveStage) -> str:
    """The idempotency key of the job a stage attempt creates (64 characters at most)."""
    key = f"{active.run}/{stage_key(active.stage)}/{active.attempt}"
    return "pipeline-" + hashlib.sha256(key.encode()).hexdigest()[:40]


class Stages:
    """Stubs of every service the pipeline drives, and one launch/check per stage."""

    def __init__(self, channels: ServiceChannels) -> None:
        self.data = data_pb2_grpc.DataServiceStub(channels.get("data"))
        self.training = training_pb2_grpc.TrainingServiceStub(channels.get("training"))
        self.evaluation = evaluation_pb2_grpc.EvaluationServiceStub(channels.get("evaluation"))
        self.compression = compression_pb2_grpc.CompressionServiceStub(channels.get("compression"))
        self.registry = registry_pb2_grpc.RegistryServiceStub(channels.get("registry"))
        self.routing = routing_pb2_grpc.RoutingServiceStub(channels.get("routing"))
        self.prediction = routing_pb2_grpc.PredictionServiceStub(channels.get("routing"))

    async def launch(self, active: ActiveStage) -> Launched | Outcome:
        launchers = {
            pb.STAGE_INGEST: self._launch_ingest,
            pb.STAGE_TRAIN: self._launch_train,
            pb.STAGE_EVALUATE: self._launch_evaluate,
            pb.STAGE_COMPRESS: self._launch_compress,
            pb.STAGE_RELEASE: self._release,
            pb.STAGE_DEPLOY: self._launch_deploy,
            pb.STAGE_SMOKE_TEST: self._smoke_test,
        }
        return await launchers[active.stage](active)

    async def check(self, active: ActiveStage) -> Outcome | None:
        checkers = {
            pb.STAGE_INGEST: self._check_ingest,
            pb.STAGE_TRAIN: self._check_train,
            pb.STAGE_EVALUATE: self._check_evaluate,
            pb.STAGE_COMPRESS: self._check_compress,
            pb.STAGE_DEPLOY: self._check_deploy,
        }
        checker = checkers.get(active.stage)
        if checker is None or not active.resource:
            return None
        return await checker(active)

    # ------------------------------------------------------------ ingest

    async def _launch_ingest(self, active: ActiveStage) -> Launched:
        section = active.spec.dataset
        name = f"datasets/{section.dataset}"
        async with calling("data", f"GetDataset {name}"):
            try:
                await self.data.GetDataset(
                    data_pb2.GetDatasetRequest(name=name), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await self._create_dataset(section)
        async with calling("data", f"IngestDataset {name}"):
            job = await self.data.IngestDataset(
                data_pb2.IngestDatasetRequest(
                    name=name, config=section.config, request_id=request_id(active)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        # aimass.data.version.* events name the version, not the job: they find the run by
        # its dataset, and the check reads the job.
        return Launched(resource=job.name, waiting_on=name)

    async def _create_dataset(self, section: pb.DatasetSection) -> None:
        try:
            await self.data.CreateDataset(
                data_pb2.CreateDatasetRequest(
                    dataset=data_pb2.Dataset(config=section.config), dataset_id=section.dataset
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:  # a retried launch made it
                raise

    async def _check_ingest(self, active: ActiveStage) -> Outcome | None:
        async with calling("data", f"GetIngestJob {active.resource}"):
            job = await self.data.GetIngestJob(
                data_pb2.GetIngestJobRequest(name=active.resource), timeout=CALL_TIMEOUT_S
            )
        ended = _job_outcome("ingest job", active.resource, job.status)
        if ended is None or not ended.succeeded:
            return ended
        async with calling("data", f"GetDatasetVersion {job.dataset_version}"):
            version = await self.data.GetDatasetVersion(
                data_pb2.GetDatasetVersionRequest(name=job.dataset_version),
                timeout=CALL_TIMEOUT_S,
            )
        rows = {
            common_pb2.DatasetSplit.Name(s.split)
            .removeprefix("DATASET_SPLIT_")
            .lower(): s.row_count
            for s in version.splits
        }
        return Outcome(True, {"dataset_version": job.dataset_version, "split_rows": rows})

    # ------------------------------------------------------------ train

    async def _launch_train(self, active: ActiveStage) -> Launched:
        section = active.spec.model
        job = training_pb2.TrainingJob(
            description=f"{active.run}: {section.model}",
            labels={"pipeline-run": active.run},
            model=section.spec,
            training=section.training,
            dataset_version=active.summary.dataset_version,
            target_model=f"models/{section.model}",
            resources=section.resources,
        )
        async with calling("training", "CreateTrainingJob"):
            created = await self.training.CreateTrainingJob(
                training_pb2.CreateTrainingJobRequest(
                    training_job=job, request_id=request_id(active)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        return Launched(resource=created.name, waiting_on=created.name)

    async def _check_train(self, active: ActiveStage) -> Outcome | None:
        async with calling("training", f"GetTrainingJob {active.resource}"):
            job = await self.training.GetTrainingJob(
                training_pb2.GetTrainingJobRequest(name=active.resource), timeout=CALL_TIMEOUT_S
            )
        ended = _job_outcome("training job", active.resource, job.status)
        if ended is None or not ended.succeeded:
            return ended
        if not job.model_version:
            return Outcome(False, reason=f"training job {active.resource} registered no version")
        metrics = {metric.name: metric.value for metric in job.final_metrics}
        return Outcome(True, {"model_version": job.model_version, "training_metrics": metrics})

    # ------------------------------------------------------------ evaluate

    async def _launch_evaluate(self, active: ActiveStage) -> Launched:
        section = active.spec.evaluation
        evaluation = evaluation_pb2.Evaluation(
            model_version=active.summary.model_version,
            dataset_version=active.summary.dataset_version,
            split=common_pb2.DATASET_SPLIT_TEST,
            metric_names=section.metric_names,
            bootstrap_samples=section.bootstrap_samples,
            log_to_registry=True,
            labels={"pipeline-run": active.run},
        )
        async with calling("evaluation", "CreateEvaluation"):
            created = await self.evaluation.CreateEvaluation(
                evaluation_pb2.CreateEvaluationRequest(
                    evaluation=evaluation, request_id=request_id(active)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        return Launched(resource=created.name, waiting_on=created.name)

    async def _check_evaluate(self, active: ActiveStage) -> Outcome | None:
        async with calling("evaluation", f"GetEvaluation {active.resource}"):
            evaluation = await self.evaluation.GetEvaluation(
                evaluation_pb2.GetEvaluationRequest(name=active.resource), timeout=CALL_TIMEOUT_S
            )
        ended = _job_outcome("evaluation", active.resource, evaluation.status)
        if ended is None or not ended.succeeded:
            return ended
        metrics = {metric.name: metric.value for metric in evaluation.metrics}
        return Outcome(True, {"metrics": metrics, "evaluation": evaluation.name})

    # ------------------------------------------------------------ compress

    async def _launch_compress(self, active: ActiveStage) -> Launched:
        job = compression_pb2.CompressionJob(
            parent_version=active.summary.model_version,
            recipe=active.spec.compression.recipe,
            labels={"pipeline-run": active.run},
        )
        async with calling("compression", "CreateCompressionJob"):
            created = await self.compression.CreateCompressionJob(
                compression_pb2.CreateCompressionJobRequest(
                    compression_job=job, request_id=request_id(active)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        return Launched(resource=created.name, waiting_on=created.name)

    async def _check_compress(self, active: ActiveStage) -> Outcome | None:
        async with calling("compression", f"GetCompressionJob {active.resource}"):
            job = await self.compression.GetCompressionJob(
                compression_pb2.GetCompressionJobRequest(name=active.resource),
                timeout=CALL_TIMEOUT_S,
            )
        ended = _job_outcome("compression job", active.resource, job.status)
        if ended is None or not ended.succeeded:
            return ended
        rows = compression_rows(job, active.spec.compression.recipe)
        return Outcome(True, {"compressed_version": job.model_version, "compression": rows})

    # ------------------------------------------------------------ release

    async def _release(self, active: ActiveStage) -> Outcome:
        version = target_version(active.spec.release.target, active.summary)
        alias = f"models/{active.spec.model.model}/aliases/{active.spec.release.alias}"
        number = int(version.rsplit("/", 1)[1])
        async with calling("registry", f"SetAlias {alias}"):
            await self.registry.SetAlias(
                registry_pb2.SetAliasRequest(name=alias, version=number), timeout=CALL_TIMEOUT_S
            )
        summary = {"alias": alias, "released_version": version}
        return Outcome(True, summary, resource=alias)

    # ------------------------------------------------------------ deploy

    async def _launch_deploy(self, active: ActiveStage) -> Launched | Outcome:
        section = active.spec.deploy
        name = f"deployments/{section.deployment}"
        route = routing_pb2.Route(model=self._route_target(active), weight_percent=100)
        deployment = routing_pb2.Deployment(
            routes=[route], labels={"pipeline-run": active.run.replace("/", "-")[:63]}
        )
        async with calling("routing", f"CreateDeployment {name}"):
            try:
                await self.routing.CreateDeployment(
                    routing_pb2.CreateDeploymentRequest(
                        deployment=deployment, deployment_id=section.deployment
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                await self._update_routes(name, route)
        return Launched(resource=name, waiting_on=name)

    def _route_target(self, active: ActiveStage) -> str:
        if active.summary.alias and active.spec.deploy.target == pb.RELEASE_TARGET_UNSPECIFIED:
            return active.summary.alias  # the deployment follows the alias from now on
        return target_version(active.spec.deploy.target, active.summary)

    async def _update_routes(self, name: str, route: routing_pb2.Route) -> None:
        current = await self.routing.GetDeployment(
            routing_pb2.GetDeploymentRequest(name=name), timeout=CALL_TIMEOUT_S
        )
        if [r.model for r in current.routes] == [route.model]:
            return
        await self.routing.UpdateDeployment(
            routing_pb2.UpdateDeploymentRequest(
                deployment=routing_pb2.Deployment(name=name, routes=[route], etag=current.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["routes"]),
            ),
            timeout=CALL_TIMEOUT_S,
        )

    async def _check_deploy(self, active: ActiveStage) -> Outcome | None:
        async with calling("routing", f"GetDeployment {active.resource}"):
            deployment = await self.routing.GetDeployment(
                routing_pb2.GetDeploymentRequest(name=active.resource), timeout=CALL_TIMEOUT_S
            )
        if deployment.state == routing_pb2.DEPLOYMENT_STATE_READY:
            served = deployment.routes[0].resolved_version if deployment.routes else ""
            summary = {"deployment": deployment.name}
            if served and not active.summary.released_version:
                summary["released_version"] = served
            return Outcome(True, summary)
        if deployment.state == routing_pb2.DEPLOYMENT_STATE_FAILED:
            return Outcome(
                False, reason=f"deployment {deployment.name} FAILED: {deployment.state_reason}"
            )
        return None

    # ------------------------------------------------------------ smoke test

    async def _smoke_test(self, active: ActiveStage) -> Outcome:
        deployment = f"deployments/{active.spec.deploy.deployment}"
        async with calling("routing", f"GetDeploymentMetadata {deployment}"):
            metadata = await self.prediction.GetDeploymentMetadata(
                routing_pb2.GetDeploymentMetadataRequest(name=deployment), timeout=CALL_TIMEOUT_S
            )
        if not metadata.inputs:
            raise StageFailed(f"{deployment} reports no input tensor")
        features, label = await self._test_row(active.summary.dataset_version)
        tensor = metadata.inputs[0]
        request = encode_request({tensor.name: features.reshape(1, -1).astype(np.float32)})
        request.deployment = deployment
        request.id = f"{active.run}-smoke-test"
        async with calling("routing", f"Predict {deployment}"):
            response = await self.prediction.Predict(request, timeout=CALL_TIMEOUT_S)
        outputs = decode_response(response)
        if not outputs:
            raise StageFailed(f"Predict on {deployment} answered no output")
        answer = describe_answer(next(iter(outputs.values())), label)
        served = await self._served_by(deployment, response.model_version)
        return Outcome(
            True,
            {"predict_answer": answer, "predict_version": response.model_version,
             "predict_server": served},
            resource=deployment,
        )  # fmt: skip

    async def _served_by(self, deployment: str, version: str) -> str:
        """Where the deployment's route to ``version`` points (its route table)."""
        async with calling("routing", f"GetRouteTable {deployment}"):
            table = await self.routing.GetRouteTable(
                routing_pb2.GetRouteTableRequest(name=f"{deployment}/routeTable"),
                timeout=CALL_TIMEOUT_S,
            )
        for entry in table.entries:
            # The in-process backend has a route entry too, with no address to call.
            if entry.model_version == version and entry.grpc_address:
                return (
                    f"Triton {entry.server} ({entry.grpc_address}), model {entry.triton_model_name}"
                )
        return "routing's in-process ONNX Runtime"

    async def _test_row(self, dataset_version: str) -> tuple[np.ndarray, str]:
        """The first test row's features (float32) and its label as text."""
        async with calling("data", f"GetDatasetVersion {dataset_version}"):
            version = await self.data.GetDatasetVersion(
                data_pb2.GetDatasetVersionRequest(name=dataset_version), timeout=CALL_TIMEOUT_S
            )
        features = [c.name for c in version.schema if c.role == data_pb2.COLUMN_ROLE_FEATURE]
        labels = [c.name for c in version.schema if c.role == data_pb2.COLUMN_ROLE_LABEL]
        request = data_pb2.ReadSplitRequest(
            name=dataset_version, split=common_pb2.DATASET_SPLIT_TEST, row_limit=1,
            columns=[*features, *labels],
        )  # fmt: skip
        async with calling("data", f"ReadSplit {dataset_version}"):
            async for batch in self.data.ReadSplit(request, timeout=CALL_TIMEOUT_S):
                table = pa.ipc.open_stream(batch.arrow_ipc).read_all()
                if table.num_rows:
                    row = table.slice(0, 1).to_pylist()[0]
                    try:
                        values = np.asarray([row[c] for c in features], dtype=np.float32)
                    except (TypeError, ValueError) as err:
                        raise StageFailed(
                            f"the test rows of {dataset_version} are not numeric features: {err}"
                        ) from err
                    return values, str(row[labels[0]]) if labels else ""
        raise StageFailed(f"{dataset_version} has no test rows to send")


def _job_outcome(kind: str, name: str, status: common_pb2.JobStatus) -> Outcome | None:
    if status.state == JOB_STATES.Value("JOB_STATE_SUCCEEDED"):
        return Outcome(True)
    if status.state in (
        JOB_STATES.Value("JOB_STATE_FAILED"),
        JOB_STATES.Value("JOB_STATE_CANCELLED"),
    ):
        state = JOB_STATES.Name(status.state).removeprefix("JOB_STATE_")
        return Outcome(False, reason=f"{kind} {name} {state}: {status.reason or 'no reason given'}")
    return None


def target_version(target: int, summary: pb.PipelineSummary) -> str:
    """The version a release or deploy takes: the compressed child unless told otherwise."""
    if target == pb.RELEASE_TARGET_TRAINED:
        return summary.model_version
    if target == pb.RELEASE_TARGET_COMPRESSED:
        if not summary.compressed_version:
            raise StageFailed("the spec asks for the compressed version, but none was registered")
        return summary.compressed_version
    return summary.compressed_version or summary.model_version


def compression_rows(
    job: compression_pb2.CompressionJob, recipe: compression_pb2.Recipe
) -> list[dict[str, Any]]:
    """The baseline and every step as CompressionRow JSON, with ratios against the baseline."""
    budget = recipe.accuracy_budget.metric or "accuracy"
    base = job.baseline
    rows = []
    for report, status in [(base, "BASELINE"), *((r, _step_status(r)) for r in job.step_reports)]:
        row = pb.CompressionRow(
            step=report.step_name or "baseline",
            status=status,
            size_bytes=report.file_size_bytes,
            throughput_rows_per_second=report.throughput_rows_per_second,
            accuracy=_metric(report.metrics_after, budget)
            or _metric(report.metrics_before, budget),
            reason=report.reason,
        )
        if base.file_size_bytes:
            row.size_ratio = report.file_size_bytes / base.file_size_bytes
        if base.throughput_rows_per_second:
            row.speed_ratio = report.throughput_rows_per_second / base.throughput_rows_per_second
        rows.append(json_format.MessageToDict(row, preserving_proto_field_name=True))
    return rows


def _step_status(report: compression_pb2.StepReport) -> str:
    return compression_pb2.StepStatus.Name(report.status).removeprefix("STEP_STATUS_")


def _metric(metrics: Any, name: str) -> float:
    for metric in metrics:
        if metric.name in (name, f"test_{name}", f"valid_{name}"):
            return float(metric.value)
    return 0.0


def describe_answer(output: np.ndarray, label: str) -> str:
    """ "class 3 (p=0.98), label 3" for a classifier; the value for a regressor."""
    values = np.asarray(output, dtype=np.float64).reshape(-1)
    if values.size > 1:
        shifted = np.exp(values - values.max())
        probs = shifted / shifted.sum() if not np.allclose(values.sum(), 1.0) else values
        answer = f"class {int(values.argmax())} (p={probs.max():.2f})"
    elif values.size == 1:
        answer = f"{values[0]:.4g}"
    else:
        answer = "empty output"
    return f"{answer}, label {label}" if label else answer
