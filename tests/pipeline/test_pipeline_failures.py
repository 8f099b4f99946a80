"""A failed stage stops the run naming the stage and the reason; a rerun resumes from it."""

from __future__ import annotations

from aimass.pipeline.v1 import pipeline_pb2 as pb
from tests.pipeline.conftest import Env, stages_by_name


async def test_failed_job_event_names_stage_and_reason(env: Env) -> None:
    # The data service fails the ingest (unknown label column) and says so in its event.
    spec = env.spec(model={"name": "cancer-mlp", "version": "models/cancer-mlp/versions/1"})
    spec.dataset.config.label_column = "no-such-column"
    run, _ = await env.wait((await env.start(spec)).name)
    assert run.state == pb.RUN_STATE_FAILED
    assert run.failed_stage == pb.STAGE_INGEST
    assert run.reason.startswith("ingest failed: ingest job ingestJobs/")
    assert "no-such-column" in run.reason
    stages = stages_by_name(run)
    assert stages["STAGE_INGEST"].state == pb.STAGE_STATE_FAILED
    assert stages["STAGE_EVALUATE"].state == pb.STAGE_STATE_SKIPPED
    assert stages["STAGE_TRAIN"].state == pb.STAGE_STATE_SKIPPED


async def test_rerun_resumes_from_the_failed_stage(env: Env) -> None:
    # The version to evaluate does not exist yet: evaluate fails, ingest keeps its result.
    spec = env.spec(
        model={"name": "late", "version": "models/late/versions/1"},
        evaluation={"metrics": ["accuracy"]},
    )
    run, _ = await env.wait((await env.start(spec, "late-run")).name)
    assert run.state == pb.RUN_STATE_FAILED
    assert run.failed_stage == pb.STAGE_EVALUATE
    assert "evaluation CreateEvaluation: NOT_FOUND" in run.reason
    assert "models/late" in run.reason
    ingest = stages_by_name(run)["STAGE_INGEST"]
    assert ingest.state == pb.STAGE_STATE_SUCCEEDED
    # A rerun of a failed run only: a running or finished one is refused.
    await env.train_and_register("late", run.summary.dataset_version, epochs=5)
    rerun = await env.pipeline.RerunPipelineRun(pb.RerunPipelineRunRequest(name=run.name))
    assert rerun.attempt == 2
    run, _ = await env.wait(run.name)
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.reason
    stages = stages_by_name(run)
    assert stages["STAGE_EVALUATE"].attempt == 2
    assert stages["STAGE_EVALUATE"].state == pb.STAGE_STATE_SUCCEEDED
    # The ingest was not run again: same job, first attempt.
    assert stages["STAGE_INGEST"].resource == ingest.resource
    assert stages["STAGE_INGEST"].attempt == 1
    assert run.summary.metrics["accuracy"] > 0.8
    assert run.reason == ""


async def test_rerun_of_a_succeeded_run_is_refused(env: Env) -> None:
    import grpc
    import pytest

    version = await env.train_and_register("quick", await env.ingest("quick-data"), epochs=1)
    spec = env.spec(
        dataset={"name": "quick-data", "version": "datasets/quick-data/versions/1"},
        model={"name": "quick", "version": version},
    )
    run = await env.start(spec)
    run, _ = await env.wait(run.name)
    assert run.state == pb.RUN_STATE_SUCCEEDED  # every stage skipped: nothing to do
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.pipeline.RerunPipelineRun(pb.RerunPipelineRunRequest(name=run.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCEEDED" in caught.value.details()
