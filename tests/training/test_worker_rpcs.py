"""The internal RPCs workers write through (the service is the only writer of its tables):
claim, batched progress with checkpoints (superseded ones leave the artifact store),
a stale attempt refused, completion once, and the worker registry."""

from __future__ import annotations

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import open_artifact_store
from aimass.training.v1 import training_pb2 as tpb

MLP = {"mlp": {"hidden_sizes": [16]}}
CONFIG = {"epochs": 1, "batch_size": 64, "seed": 0, "keep_checkpoints": 2}
WORKER = "workers/w-test"


def checkpoint(step: int, stored) -> tpb.ProgressRecord:
    artifact = common_pb2.Artifact(
        kind="checkpoint", uri=stored.uri, sha256=stored.sha256, size_bytes=stored.size
    )
    return tpb.ProgressRecord(
        checkpoint=tpb.Checkpoint(step=step, epoch=1, artifact=artifact, metrics={"loss": 1.0})
    )


def metrics(step: int) -> tpb.ProgressRecord:
    return tpb.ProgressRecord(
        metrics=tpb.StepMetrics(step=step, epoch=1, metrics={"loss": 2.0 / step}, total_steps=40)
    )


async def test_claim_report_complete_and_superseded_checkpoints_deleted(training_stack_any_db):
    ts = training_stack_any_db
    store = open_artifact_store(ts.settings.artifact_root, ts.settings.s3)
    job = await ts.create(ts.job(MLP, CONFIG))
    claimed = await ts.training.ClaimTrainingJob(
        tpb.ClaimTrainingJobRequest(name=job.name, worker=WORKER)
    )
    assert claimed.status.state == common_pb2.JOB_STATE_RUNNING
    assert claimed.status.attempt == 1
    assert list(claimed.workers) == [WORKER]

    stored = [await store.put_bytes(f"checkpoint {i}".encode()) for i in range(4)]
    records = [metrics(1), metrics(2)]
    records += [checkpoint(10 * (i + 1), s) for i, s in enumerate(stored)]
    log = tpb.LogEntry(attempt=1, worker=WORKER, message="hello", stream=tpb.LOG_STREAM_STDOUT)
    records.append(tpb.ProgressRecord(log_entry=log))
    response = await ts.training.ReportTrainingJobProgress(
        tpb.ReportTrainingJobProgressRequest(
            name=job.name, worker=WORKER, attempt=1, records=records
        )
    )
    assert not response.cancel_requested
    running = await ts.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name))
    assert [c.step for c in running.checkpoints] == [30, 40]
    assert running.status.progress.completed == 40
    # keep_checkpoints = 2: the two oldest are gone from the artifact store.
    assert [await store.exists(s.uri) for s in stored] == [False, False, True, True]
    assert await ts.logs(job.name) == ["hello"]

    # The job is redelivered elsewhere: the first attempt may no longer write.
    again = await ts.training.ClaimTrainingJob(
        tpb.ClaimTrainingJobRequest(name=job.name, worker="workers/w-other")
    )
    assert again.status.attempt == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.training.ReportTrainingJobProgress(
            tpb.ReportTrainingJobProgressRequest(name=job.name, worker=WORKER, attempt=1)
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "superseded by attempt 2" in caught.value.details()

    await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=job.name))
    heartbeat = await ts.training.ReportTrainingJobProgress(
        tpb.ReportTrainingJobProgressRequest(name=job.name, attempt=2)
    )
    assert heartbeat.cancel_requested
    done = await ts.training.CompleteTrainingJob(
        tpb.CompleteTrainingJobRequest(
            name=job.name, attempt=2, state=common_pb2.JOB_STATE_CANCELLED, reason="asked"
        )
    )
    assert done.training_job.status.state == common_pb2.JOB_STATE_CANCELLED
    assert not done.HasField("search_parent")
    twice = await ts.training.CompleteTrainingJob(
        tpb.CompleteTrainingJobRequest(name=job.name, state=common_pb2.JOB_STATE_FAILED)
    )
    assert twice.training_job.status.state == common_pb2.JOB_STATE_CANCELLED


async def test_bad_reports_are_refused_and_workers_are_listed(training_stack):
    ts = training_stack
    job = await ts.create(ts.job(MLP, CONFIG))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.training.ReportTrainingJobProgress(
            tpb.ReportTrainingJobProgressRequest(name=job.name, records=[tpb.ProgressRecord()])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[0]" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.training.CompleteTrainingJob(
            tpb.CompleteTrainingJobRequest(name=job.name, state=common_pb2.JOB_STATE_RUNNING)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ts.training.ClaimTrainingJob(tpb.ClaimTrainingJobRequest(name=job.name, worker="w"))
    assert "workers/{worker}" in caught.value.details()

    await ts.training.RegisterWorker(
        tpb.RegisterWorkerRequest(name=WORKER, host="h1", pid=7, state=tpb.WORKER_STATE_IDLE)
    )
    await ts.training.ClaimTrainingJob(tpb.ClaimTrainingJobRequest(name=job.name, worker=WORKER))
    listed = await ts.training.ListWorkers(tpb.ListWorkersRequest())
    [worker] = listed.workers
    assert (worker.name, worker.host, worker.state) == (WORKER, "h1", tpb.WORKER_STATE_BUSY)
    assert worker.current_job == job.name
    await ts.training.CompleteTrainingJob(
        tpb.CompleteTrainingJobRequest(name=job.name, state=common_pb2.JOB_STATE_FAILED)
    )
    listed = await ts.training.ListWorkers(tpb.ListWorkersRequest())
    assert listed.workers[0].state == tpb.WORKER_STATE_IDLE
