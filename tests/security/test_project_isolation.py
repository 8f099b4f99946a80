"""Per-project scoping across the services, against the secured stack.

Two developer keys scoped to projects ``alpha`` and ``beta`` and the unscoped admin key.
For each kind of resource: what a scoped key creates lands in its project (asking for
another project is PERMISSION_DENIED naming the field), the other project's key gets
NOT_FOUND for it (exactly as for a missing resource) and does not see it listed, the
admin sees everything, and the other project's key cannot reference it from another
service (train on it, deploy it, evaluate it, compress it, run a pipeline on it, monitor
it). A pipeline run's stages act for the run's project, so what they create lands there;
a replayed request id from another project never returns the first project's resource.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio

from aimass.access.v1 import access_pb2
from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as cpb
from aimass.compression.v1 import compression_pb2_grpc
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation.v1 import evaluation_pb2 as epb
from aimass.evaluation.v1 import evaluation_pb2_grpc
from aimass.pipeline.v1 import pipeline_pb2 as ppb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from aimass.registry.v1 import registry_pb2 as rpb
from aimass.registry.v1 import registry_pb2_grpc
from aimass.routing.v1 import routing_pb2 as opb
from aimass.routing.v1 import routing_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from tests.gateway.onnx_mlp import IN_FEATURES, deploy_ready, mlp_onnx, register_onnx
from tests.security.conftest import Secured, key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="package")

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Projects:
    secured: Secured
    alpha: Metadata
    beta: Metadata
    admin: Metadata
    # Made by alpha once: a READY dataset version, a model version, a READY deployment.
    dataset_version: str = ""
    model_version: str = ""
    deployment: str = ""

    def stub(self, stub_type: Any, process: str) -> Any:
        return stub_type(self.secured.channel_of(process))

    @property
    def data(self) -> data_pb2_grpc.DataServiceStub:
        return self.stub(data_pb2_grpc.DataServiceStub, "data")

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return self.stub(registry_pb2_grpc.RegistryServiceStub, "registry")

    @property
    def routing(self) -> routing_pb2_grpc.RoutingServiceStub:
        return self.stub(routing_pb2_grpc.RoutingServiceStub, "routing")

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return self.stub(training_pb2_grpc.TrainingServiceStub, "training")

    @property
    def evaluation(self) -> evaluation_pb2_grpc.EvaluationServiceStub:
        return self.stub(evaluation_pb2_grpc.EvaluationServiceStub, "evaluation")

    @property
    def compression(self) -> compression_pb2_grpc.CompressionServiceStub:
        return self.stub(compression_pb2_grpc.CompressionServiceStub, "compression")

    @property
    def pipeline(self) -> pipeline_pb2_grpc.PipelineServiceStub:
        return self.stub(pipeline_pb2_grpc.PipelineServiceStub, "pipeline")


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def write_csv(secured: Secured, name: str) -> str:
    """Rows of IN_FEATURES features and a 3-class label under the stack's data root."""
    rng = np.random.default_rng(0)
    header = ",".join(f"f{i}" for i in range(IN_FEATURES)) + ",label"
    rows = [",".join(f"{v:.4f}" for v in rng.normal(size=IN_FEATURES)) + f",{i % 3}"
            for i in range(90)]  # fmt: skip
    root = secured.settings.data_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    return name


async def ingest(p: Projects, dataset_id: str, metadata: Metadata) -> str:
    config = data_pb2.DatasetConfig(
        data_path=write_csv(p.secured, f"{dataset_id}.csv"), label_column="label"
    )
    await p.data.CreateDataset(
        data_pb2.CreateDatasetRequest(
            dataset=data_pb2.Dataset(config=config), dataset_id=dataset_id
        ),
        metadata=metadata,
    )
    job = await p.data.IngestDataset(
        data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}"), metadata=metadata
    )
    for _ in range(600):
        job = await p.data.GetIngestJob(
            data_pb2.GetIngestJobRequest(name=job.name), metadata=metadata
        )
        if job.status.state == common_pb2.JOB_STATE_SUCCEEDED:
            return job.dataset_version
        assert job.status.state not in (common_pb2.JOB_STATE_FAILED,), job.status.reason
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{job.name} did not finish")


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def projects(secured: Secured) -> Projects:
    alpha = await secured.create_key("scope-alpha", access_pb2.ROLE_DEVELOPER, project="alpha")
    beta = await secured.create_key("scope-beta", access_pb2.ROLE_DEVELOPER, project="beta")
    p = Projects(secured, key_metadata(alpha), key_metadata(beta), key_metadata(secured.admin_key))
    p.dataset_version = await ingest(p, "alpha-data", p.alpha)
    p.model_version = await register_onnx(p.registry, "alpha-model", mlp_onnx(), p.alpha)
    p.deployment = await deploy_ready(p.routing, "alpha-serving", p.model_version, p.alpha)
    return p


# ---------------------------------------------------------------------------- data


async def test_datasets_belong_to_the_creators_project(projects: Projects) -> None:
    p = projects
    dataset = await p.data.GetDataset(
        data_pb2.GetDatasetRequest(name="datasets/alpha-data"), metadata=p.alpha
    )
    assert dataset.project == "alpha"
    err = await refused(
        p.data.CreateDataset(
            data_pb2.CreateDatasetRequest(
                dataset=data_pb2.Dataset(project="beta", config=dataset.config),
                dataset_id="alpha-into-beta",
            ),
            metadata=p.alpha,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "dataset.project" in err.details()
    admin_view = await p.data.GetDataset(
        data_pb2.GetDatasetRequest(name="datasets/alpha-data"), metadata=p.admin
    )
    assert admin_view.project == "alpha"


async def test_another_projects_dataset_is_not_found_and_not_listed(projects: Projects) -> None:
    p = projects
    missing = await refused(
        p.data.GetDataset(data_pb2.GetDatasetRequest(name="datasets/no-such"), metadata=p.beta)
    )
    hidden = await refused(
        p.data.GetDataset(data_pb2.GetDatasetRequest(name="datasets/alpha-data"), metadata=p.beta)
    )
    assert hidden.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    for call in (
        p.data.GetDatasetVersion(
            data_pb2.GetDatasetVersionRequest(name=p.dataset_version), metadata=p.beta
        ),
        p.data.ListDatasetVersions(
            data_pb2.ListDatasetVersionsRequest(parent="datasets/alpha-data"), metadata=p.beta
        ),
        p.data.IngestDataset(
            data_pb2.IngestDatasetRequest(name="datasets/alpha-data"), metadata=p.beta
        ),
        p.data.DeleteDataset(
            data_pb2.DeleteDatasetRequest(name="datasets/alpha-data", force=True),
            metadata=p.beta,
        ),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND

    def names(response: data_pb2.ListDatasetsResponse) -> set[str]:
        return {d.name for d in response.datasets}

    listed = data_pb2.ListDatasetsRequest(page_size=1000)
    assert "datasets/alpha-data" not in names(await p.data.ListDatasets(listed, metadata=p.beta))
    assert "datasets/alpha-data" in names(await p.data.ListDatasets(listed, metadata=p.alpha))
    assert "datasets/alpha-data" in names(await p.data.ListDatasets(listed, metadata=p.admin))
    jobs = await p.data.ListIngestJobs(
        data_pb2.ListIngestJobsRequest(page_size=1000), metadata=p.beta
    )
    assert all("alpha" not in j.dataset_version for j in jobs.ingest_jobs)


# ------------------------------------------------------------------------ training


def training_job(dataset_version: str, **fields: Any) -> tpb.TrainingJob:
    job = tpb.TrainingJob(dataset_version=dataset_version, **fields)
    job.model.mlp.hidden_sizes.append(8)
    job.training.epochs = 1
    job.training.batch_size = 16
    return job


async def test_training_jobs_are_scoped_and_cannot_use_another_projects_data(
    projects: Projects,
) -> None:
    p = projects
    created = await p.training.CreateTrainingJob(
        tpb.CreateTrainingJobRequest(training_job=training_job(p.dataset_version)),
        metadata=p.alpha,
    )
    assert created.project == "alpha"
    err = await refused(
        p.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(
                training_job=training_job(p.dataset_version, project="beta"), validate_only=True
            ),
            metadata=p.alpha,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "training_job.project" in err.details()
    # beta cannot train on alpha's dataset version: the data service does not show it.
    err = await refused(
        p.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(
                training_job=training_job(p.dataset_version), validate_only=True
            ),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "dataset_version" in err.details()
    get = tpb.GetTrainingJobRequest(name=created.name)
    assert await code_of(p.training.GetTrainingJob(get, metadata=p.beta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    cancel = tpb.CancelTrainingJobRequest(name=created.name)
    assert await code_of(p.training.CancelTrainingJob(cancel, metadata=p.beta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    listed = tpb.ListTrainingJobsRequest(page_size=1000)
    beta_jobs = await p.training.ListTrainingJobs(listed, metadata=p.beta)
    admin_jobs = await p.training.ListTrainingJobs(listed, metadata=p.admin)
    assert created.name not in {j.name for j in beta_jobs.training_jobs}
    assert created.name in {j.name for j in admin_jobs.training_jobs}
    await p.training.CancelTrainingJob(cancel, metadata=p.alpha)


# ------------------------------------------------------------------------ registry


async def test_model_versions_and_aliases_are_hidden_from_another_project(
    projects: Projects,
) -> None:
    p = projects
    await p.registry.SetAlias(
        rpb.SetAliasRequest(name="models/alpha-model/aliases/live", version=1), metadata=p.alpha
    )
    for call in (
        p.registry.GetModelVersion(
            rpb.GetModelVersionRequest(name=p.model_version), metadata=p.beta
        ),
        p.registry.GetAlias(
            rpb.GetAliasRequest(name="models/alpha-model/aliases/live"), metadata=p.beta
        ),
        p.registry.SetAlias(
            rpb.SetAliasRequest(name="models/alpha-model/aliases/mine", version=1),
            metadata=p.beta,
        ),
        p.registry.ListAliases(
            rpb.ListAliasesRequest(parent="models/alpha-model"), metadata=p.beta
        ),
        p.registry.GetLineage(rpb.GetLineageRequest(name=p.model_version), metadata=p.beta),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    search = rpb.SearchModelVersionsRequest(filter='model = "alpha-model"')
    beta_found = await p.registry.SearchModelVersions(search, metadata=p.beta)
    alpha_found = await p.registry.SearchModelVersions(search, metadata=p.alpha)
    admin_found = await p.registry.SearchModelVersions(search, metadata=p.admin)
    assert [v.name for v in beta_found.model_versions] == []
    assert [v.name for v in alpha_found.model_versions] == [p.model_version]
    assert [v.name for v in admin_found.model_versions] == [p.model_version]


# ------------------------------------------------------------------------- routing


async def test_deployments_are_scoped_and_cannot_serve_another_projects_model(
    projects: Projects,
) -> None:
    p = projects
    deployment = await p.routing.GetDeployment(
        opb.GetDeploymentRequest(name=p.deployment), metadata=p.alpha
    )
    assert deployment.project == "alpha"
    get = opb.GetDeploymentRequest(name=p.deployment)
    assert await code_of(p.routing.GetDeployment(get, metadata=p.beta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    predictions = p.stub(routing_pb2_grpc.PredictionServiceStub, "routing")
    predict = opb.PredictRequest(deployment=p.deployment)
    assert await code_of(predictions.Predict(predict, metadata=p.beta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    listed = opb.ListDeploymentsRequest(page_size=1000)
    beta_names = {
        d.name for d in (await p.routing.ListDeployments(listed, metadata=p.beta)).deployments
    }
    admin_names = {
        d.name for d in (await p.routing.ListDeployments(listed, metadata=p.admin)).deployments
    }
    assert p.deployment not in beta_names
    assert p.deployment in admin_names
    # beta cannot deploy alpha's model version, although routing has it cached already.
    err = await refused(
        p.routing.CreateDeployment(
            opb.CreateDeploymentRequest(
                deployment_id="beta-steals",
                deployment=opb.Deployment(
                    routes=[opb.Route(model=p.model_version, weight_percent=100)]
                ),
            ),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert p.model_version in err.details()
    err = await refused(
        p.routing.CreateDeployment(
            opb.CreateDeploymentRequest(
                deployment_id="alpha-into-beta",
                deployment=opb.Deployment(
                    project="beta", routes=[opb.Route(model=p.model_version, weight_percent=100)]
                ),
            ),
            metadata=p.alpha,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "deployment.project" in err.details()


# ---------------------------------------------------------- evaluation, compression


async def test_evaluations_are_scoped_and_cannot_use_another_projects_model(
    projects: Projects,
) -> None:
    p = projects
    created = await p.evaluation.CreateEvaluation(
        epb.CreateEvaluationRequest(
            evaluation=epb.Evaluation(
                model_version=p.model_version, dataset_version=p.dataset_version
            )
        ),
        metadata=p.alpha,
    )
    assert created.project == "alpha"
    get = epb.GetEvaluationRequest(name=created.name)
    assert await code_of(p.evaluation.GetEvaluation(get, metadata=p.beta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await code_of(p.evaluation.GetEvaluation(get, metadata=p.alpha)) == grpc.StatusCode.OK
    listed = epb.ListEvaluationsRequest(page_size=1000)
    beta_names = {
        e.name for e in (await p.evaluation.ListEvaluations(listed, metadata=p.beta)).evaluations
    }
    admin_names = {
        e.name for e in (await p.evaluation.ListEvaluations(listed, metadata=p.admin)).evaluations
    }
    assert created.name not in beta_names
    assert created.name in admin_names
    err = await refused(
        p.evaluation.CreateEvaluation(
            epb.CreateEvaluationRequest(
                evaluation=epb.Evaluation(
                    model_version=p.model_version, dataset_version=p.dataset_version
                )
            ),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_compression_cannot_use_another_projects_model(projects: Projects) -> None:
    p = projects
    job = cpb.CompressionJob(parent_version=p.model_version)
    job.recipe.steps.add().fp16.SetInParent()
    err = await refused(
        p.compression.CreateCompressionJob(
            cpb.CreateCompressionJobRequest(compression_job=job), metadata=p.beta
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "alpha-model" in err.details()


async def test_a_target_model_of_another_project_is_not_found(projects: Projects) -> None:
    p = projects
    job = training_job(p.dataset_version, target_model="models/alpha-model")
    err = await refused(
        p.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(training_job=job, validate_only=True), metadata=p.beta
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "training_job.target_model" in err.details()
    accepted = await p.training.CreateTrainingJob(
        tpb.CreateTrainingJobRequest(training_job=job, validate_only=True), metadata=p.alpha
    )
    assert accepted.project == "alpha"
    # An unscoped caller naming another project for the job is told whose model it is.
    job.project = "beta"
    err = await refused(
        p.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(training_job=job, validate_only=True), metadata=p.admin
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "training_job.target_model" in err.details()


# ------------------------------------------------------------------ request ids


async def test_a_request_id_replayed_by_another_project_is_not_found(projects: Projects) -> None:
    p = projects
    evaluation = epb.Evaluation(model_version=p.model_version, dataset_version=p.dataset_version)
    first = await p.evaluation.CreateEvaluation(
        epb.CreateEvaluationRequest(evaluation=evaluation, request_id="replay-evaluation"),
        metadata=p.alpha,
    )
    again = await p.evaluation.CreateEvaluation(
        epb.CreateEvaluationRequest(evaluation=evaluation, request_id="replay-evaluation"),
        metadata=p.alpha,
    )
    assert again.name == first.name
    err = await refused(
        p.evaluation.CreateEvaluation(
            epb.CreateEvaluationRequest(evaluation=evaluation, request_id="replay-evaluation"),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "request_id" in err.details()
    assert first.name not in err.details()

    job = await p.training.CreateTrainingJob(
        tpb.CreateTrainingJobRequest(
            training_job=training_job(p.dataset_version), request_id="replay-training"
        ),
        metadata=p.alpha,
    )
    err = await refused(
        p.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(
                training_job=training_job(p.dataset_version), request_id="replay-training"
            ),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert job.name not in err.details()
    await p.training.CancelTrainingJob(
        tpb.CancelTrainingJobRequest(name=job.name), metadata=p.alpha
    )

    run = ppb.PipelineRun(spec=pinned_spec(p))
    created = await p.pipeline.CreatePipelineRun(
        ppb.CreatePipelineRunRequest(pipeline_run=run, request_id="replay-run"), metadata=p.alpha
    )
    err = await refused(
        p.pipeline.CreatePipelineRun(
            ppb.CreatePipelineRunRequest(pipeline_run=run, request_id="replay-run"),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert created.name not in err.details()


# ------------------------------------------------------------------------ pipeline

FINISHED = (ppb.RUN_STATE_SUCCEEDED, ppb.RUN_STATE_FAILED, ppb.RUN_STATE_CANCELLED)


def pinned_spec(p: Projects, **sections: Any) -> ppb.PipelineSpec:
    """alpha's dataset version and model version, pinned: ingest and training skipped."""
    return ppb.PipelineSpec(
        dataset=ppb.DatasetSection(dataset="alpha-data", dataset_version=p.dataset_version),
        model=ppb.ModelSection(model="alpha-model", model_version=p.model_version),
        **sections,
    )


async def finished_run(p: Projects, name: str, metadata: Metadata) -> ppb.PipelineRun:
    for _ in range(1800):
        run = await p.pipeline.GetPipelineRun(
            ppb.GetPipelineRunRequest(name=name), metadata=metadata
        )
        if run.state in FINISHED:
            return run
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{name} did not finish")


async def test_a_scoped_run_creates_its_stages_resources_in_its_project(
    projects: Projects,
) -> None:
    p = projects
    spec = pinned_spec(
        p,
        evaluation=ppb.EvaluationSection(metric_names=["accuracy"]),
        release=ppb.ReleaseSection(alias="pipeline-live"),
        deploy=ppb.DeploySection(deployment="alpha-pipeline"),
    )
    created = await p.pipeline.CreatePipelineRun(
        ppb.CreatePipelineRunRequest(pipeline_run=ppb.PipelineRun(spec=spec)), metadata=p.alpha
    )
    assert created.project == "alpha"
    run = await finished_run(p, created.name, p.alpha)
    assert run.state == ppb.RUN_STATE_SUCCEEDED, run.reason
    evaluation = await p.evaluation.GetEvaluation(
        epb.GetEvaluationRequest(name=run.summary.evaluation), metadata=p.alpha
    )
    deployment = await p.routing.GetDeployment(
        opb.GetDeploymentRequest(name=run.summary.deployment), metadata=p.alpha
    )
    assert (evaluation.project, deployment.project) == ("alpha", "alpha")
    for call in (
        p.evaluation.GetEvaluation(
            epb.GetEvaluationRequest(name=run.summary.evaluation), metadata=p.beta
        ),
        p.routing.GetDeployment(
            opb.GetDeploymentRequest(name=run.summary.deployment), metadata=p.beta
        ),
        p.pipeline.GetPipelineRun(ppb.GetPipelineRunRequest(name=run.name), metadata=p.beta),
        p.pipeline.CancelPipelineRun(ppb.CancelPipelineRunRequest(name=run.name), metadata=p.beta),
        p.pipeline.RerunPipelineRun(ppb.RerunPipelineRunRequest(name=run.name), metadata=p.beta),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    listed = ppb.ListPipelineRunsRequest(page_size=1000)
    beta_runs = await p.pipeline.ListPipelineRuns(listed, metadata=p.beta)
    admin_runs = await p.pipeline.ListPipelineRuns(listed, metadata=p.admin)
    assert run.name not in {r.name for r in beta_runs.pipeline_runs}
    assert run.name in {r.name for r in admin_runs.pipeline_runs}
    err = await refused(
        p.pipeline.CreatePipelineRun(
            ppb.CreatePipelineRunRequest(
                pipeline_run=ppb.PipelineRun(spec=spec, project="beta"), validate_only=True
            ),
            metadata=p.alpha,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "pipeline_run.project" in err.details()


async def test_a_scoped_run_cannot_reach_another_projects_resources(
    projects: Projects,
) -> None:
    """beta's runs name alpha's versions: the stages, acting for beta, are told NOT_FOUND
    (with the internal token alone they would have evaluated and deployed alpha's model)."""
    p = projects
    specs = {
        ppb.STAGE_EVALUATE: pinned_spec(p, evaluation=ppb.EvaluationSection()),
        ppb.STAGE_RELEASE: pinned_spec(p, release=ppb.ReleaseSection(alias="beta-took-it")),
        ppb.STAGE_DEPLOY: pinned_spec(
            p,
            deploy=ppb.DeploySection(
                deployment="beta-pipeline",
                target=ppb.RELEASE_TARGET_TRAINED,
                skip_smoke_test=True,
            ),
        ),
    }
    for stage, spec in specs.items():
        created = await p.pipeline.CreatePipelineRun(
            ppb.CreatePipelineRunRequest(pipeline_run=ppb.PipelineRun(spec=spec)),
            metadata=p.beta,
        )
        assert created.project == "beta"
        run = await finished_run(p, created.name, p.beta)
        assert run.state == ppb.RUN_STATE_FAILED
        assert run.failed_stage == stage, run.reason
        assert "NOT_FOUND" in run.reason
    assert (
        await code_of(
            p.routing.GetDeployment(
                opb.GetDeploymentRequest(name="deployments/beta-pipeline"), metadata=p.admin
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )


async def test_schedules_are_scoped_and_fire_runs_in_their_project(projects: Projects) -> None:
    p = projects
    schedule = await p.pipeline.CreateSchedule(
        ppb.CreateScheduleRequest(
            schedule=ppb.Schedule(spec=pinned_spec(p), cron="* * * * * *"),
            schedule_id="alpha-every-second",
        ),
        metadata=p.alpha,
    )
    assert schedule.project == "alpha"
    for _ in range(300):
        schedule = await p.pipeline.GetSchedule(
            ppb.GetScheduleRequest(name=schedule.name), metadata=p.alpha
        )
        if schedule.last_run:
            break
        await asyncio.sleep(0.1)
    await p.pipeline.PauseSchedule(ppb.PauseScheduleRequest(name=schedule.name), metadata=p.alpha)
    assert schedule.last_run, "the schedule never fired"
    fired = await finished_run(p, schedule.last_run, p.alpha)
    assert fired.project == "alpha"
    # The newest dataset version was resolved acting for alpha: alpha's own.
    assert fired.spec.dataset.dataset_version == p.dataset_version
    assert (
        await code_of(
            p.pipeline.GetPipelineRun(ppb.GetPipelineRunRequest(name=fired.name), metadata=p.beta)
        )
        == grpc.StatusCode.NOT_FOUND
    )
    for call in (
        p.pipeline.GetSchedule(ppb.GetScheduleRequest(name=schedule.name), metadata=p.beta),
        p.pipeline.ResumeSchedule(ppb.ResumeScheduleRequest(name=schedule.name), metadata=p.beta),
        p.pipeline.DeleteSchedule(ppb.DeleteScheduleRequest(name=schedule.name), metadata=p.beta),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    listed = ppb.ListSchedulesRequest(page_size=1000)
    beta_names = {
        s.name for s in (await p.pipeline.ListSchedules(listed, metadata=p.beta)).schedules
    }
    admin_names = {
        s.name for s in (await p.pipeline.ListSchedules(listed, metadata=p.admin)).schedules
    }
    assert schedule.name not in beta_names
    assert schedule.name in admin_names
    err = await refused(
        p.pipeline.CreateSchedule(
            ppb.CreateScheduleRequest(
                schedule=ppb.Schedule(spec=pinned_spec(p), cron="@daily", project="beta"),
                schedule_id="alpha-into-beta",
            ),
            metadata=p.alpha,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "schedule.project" in err.details()


# ------------------------------------------------------------------------ monitors


async def test_monitors_take_their_deployments_project(projects: Projects) -> None:
    p = projects
    monitor = await p.evaluation.CreateMonitor(
        epb.CreateMonitorRequest(
            monitor=epb.Monitor(deployment=p.deployment), monitor_id="alpha-watch"
        ),
        metadata=p.alpha,
    )
    assert monitor.project == "alpha"
    err = await refused(
        p.evaluation.CreateMonitor(
            epb.CreateMonitorRequest(
                monitor=epb.Monitor(deployment=p.deployment), monitor_id="beta-watch"
            ),
            metadata=p.beta,
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "monitor.deployment" in err.details()
    for call in (
        p.evaluation.GetMonitor(epb.GetMonitorRequest(name=monitor.name), metadata=p.beta),
        p.evaluation.RunMonitor(epb.RunMonitorRequest(name=monitor.name), metadata=p.beta),
        p.evaluation.ListAlerts(epb.ListAlertsRequest(parent=monitor.name), metadata=p.beta),
        p.evaluation.DeleteMonitor(epb.DeleteMonitorRequest(name=monitor.name), metadata=p.beta),
    ):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    listed = epb.ListMonitorsRequest(page_size=1000)
    beta_names = {
        m.name for m in (await p.evaluation.ListMonitors(listed, metadata=p.beta)).monitors
    }
    admin_names = {
        m.name for m in (await p.evaluation.ListMonitors(listed, metadata=p.admin)).monitors
    }
    assert monitor.name not in beta_names
    assert monitor.name in admin_names
