"""Every bad input of the issue: refused at Create with the field named, or FAILED with the
reason (and no version registered) while the worker survives to take the next job."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.registry.v1 import registry_pb2
from aimass.training.v1 import training_pb2 as tpb

MLP = {"mlp": {"hidden_sizes": [16]}}
QUICK = {"epochs": 1, "batch_size": 64, "seed": 0}


async def refused(ts, job) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.create(job)
    return caught.value


async def test_create_refuses_bad_requests_and_stores_nothing(training_stack):
    ts = training_stack
    err = await refused(ts, ts.job(MLP, QUICK, dataset_version="datasets/digits/versions/9"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "datasets/digits/versions/9" in err.details()

    err = await refused(ts, ts.job(MLP, QUICK, dataset_version="digits"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.dataset_version" in err.details()

    err = await refused(ts, ts.job({**MLP, "input_size": 30}, QUICK))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.model.input_size" in err.details()
    assert "64 wide" in err.details()

    job = ts.job(MLP, {**QUICK, "optimizer": {"learning_rate": -0.1}})
    err = await refused(ts, job)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.training.optimizer.learning_rate" in err.details()

    job = ts.job(MLP, QUICK)
    job.training.optimizer.type = 42  # an optimizer this API does not know
    err = await refused(ts, job)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.training.optimizer.type" in err.details()

    err = await refused(ts, ts.job(MLP, {"batch_size": 8}))
    assert "set epochs or max_steps" in err.details()

    listed = await ts.training.ListTrainingJobs(tpb.ListTrainingJobsRequest())
    assert list(listed.training_jobs) == []


async def test_dataset_version_not_ready_is_refused_at_create(training_stack):
    ts = training_stack
    # A version caught mid-ingest, written as the data service's store writes it.
    db = Database(ts.settings.database_url)
    try:
        with db.session() as session:
            dataset = session.scalars(select(m.Dataset).where(m.Dataset.name == "digits")).one()
            session.add(m.DatasetVersion(dataset_id=dataset.id, version=2, state="INGESTING"))
    finally:
        db.dispose()
    name = "datasets/digits/versions/2"
    err = await refused(ts, ts.job(MLP, QUICK, dataset_version=name))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{name} is INGESTING, not READY" in err.details()
    assert "training_job.dataset_version" in err.details()
    listed = await ts.training.ListTrainingJobs(tpb.ListTrainingJobsRequest())
    assert list(listed.training_jobs) == []


async def test_validate_only_queues_nothing(training_stack):
    ts = training_stack
    await ts.create(ts.job(MLP, QUICK), validate_only=True)
    listed = await ts.training.ListTrainingJobs(tpb.ListTrainingJobsRequest())
    assert list(listed.training_jobs) == []


async def test_nan_loss_fails_naming_the_step_and_registers_nothing(training_stack):
    ts = training_stack
    config = {"epochs": 2, "batch_size": 64, "optimizer": {"type": "sgd", "learning_rate": 1e30}}
    job = await ts.create(ts.job(MLP, config, target_model="models/never"))
    async with ts.worker():
        done = await ts.wait(job.name)
    assert done.status.state == common_pb2.JOB_STATE_FAILED
    assert "at step" in done.status.reason
    assert "nan" in done.status.reason.lower() or "inf" in done.status.reason.lower()
    assert done.model_version == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.registry.GetRegisteredModel(
            registry_pb2.GetRegisteredModelRequest(name="models/never")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_user_code_that_raises_fails_with_traceback_and_worker_goes_on(training_stack):
    ts = training_stack
    bad = ts.job({"user_code": {"factory": "tests.training.training_user_code:broken"}}, QUICK)
    first = await ts.create(bad)
    second = await ts.create(ts.job(MLP, QUICK))
    async with ts.worker() as worker:
        failed = await ts.wait(first.name)
        good = await ts.wait(second.name)
    assert failed.status.state == common_pb2.JOB_STATE_FAILED
    assert "user_code.factory" in failed.status.reason
    logs = "\n".join(await ts.logs(first.name))
    assert "Traceback" in logs
    assert "user factory exploded on purpose" in logs
    assert "training_user_code.py" in logs
    assert good.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert worker.jobs_done == 2


async def test_cancel_queued_and_running_jobs(training_stack):
    ts = training_stack
    queued = await ts.create(ts.job(MLP, QUICK))
    cancelled = await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=queued.name))
    assert cancelled.status.state == common_pb2.JOB_STATE_CANCELLED
    long = await ts.create(ts.job(MLP, {"epochs": 2000, "batch_size": 8}))
    async with ts.worker():
        async for event in ts.training.WatchTrainingJob(
            tpb.WatchTrainingJobRequest(name=long.name)
        ):
            if event.metrics:
                break
        await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=long.name))
        done = await ts.wait(long.name)
    assert done.status.state == common_pb2.JOB_STATE_CANCELLED
    again = await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=long.name))
    assert again.status.state == common_pb2.JOB_STATE_CANCELLED


async def test_unknown_job_is_not_found(training_stack):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await training_stack.training.GetTrainingJob(
            tpb.GetTrainingJobRequest(name="trainingJobs/nope")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
