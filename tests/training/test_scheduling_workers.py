"""Scheduling with real workers, NATS and the training service: each worker gets only the
jobs it fits, a request no worker can meet is refused at create with nothing stored, a
later high-priority job starts before earlier ones when the worker is busy, and a project
at its quota has its extra job wait until one of its jobs ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.training.v1 import training_pb2 as tpb
from tests.fixtures.stack import serve_stack, stack_settings
from tests.training.conftest import TrainingStack, write_digits

GIB = 1 << 30
MLP = {"mlp": {"hidden_sizes": [16]}}
QUICK = {"epochs": 1, "batch_size": 128, "seed": 0}
# Runs until cancelled: holds its worker (or its project's quota) for as long as a test needs.
HOLD = {"epochs": 100000, "batch_size": 128, "seed": 0, "checkpoint_interval_steps": 0}


@pytest.fixture
async def quota_stack(sqlite_db_url, nats_url, tmp_path) -> AsyncIterator[TrainingStack]:
    """The training stack with a quota of one concurrent job for project "vision"."""
    root = tmp_path / "data"
    root.mkdir()
    write_digits(root / "digits.csv")
    settings = stack_settings(
        tmp_path / "home",
        sqlite_db_url,
        nats_url,
        data_roots=[root],
        training={"quotas": {"vision": 1}},
    )
    async with serve_stack(settings, ["data", "registry", "training"]) as stack:
        ts = TrainingStack(stack, settings, digits="")
        ts.digits = await ts.ingest("digits", "digits.csv")
        yield ts


async def _until(check, what: str, timeout_s: float = 60.0):
    """Polls ``check`` (async, returns a truthy value when done) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def _workers_idle(ts: TrainingStack, names: set[str]) -> None:
    async def idle() -> bool:
        response = await ts.training.ListWorkers(tpb.ListWorkersRequest())
        ready = {w.name for w in response.workers if w.state == tpb.WORKER_STATE_IDLE}
        return names <= ready

    await _until(idle, f"workers {sorted(names)} to register")


async def _get(ts: TrainingStack, name: str) -> tpb.TrainingJob:
    return await ts.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=name))


async def _running(ts: TrainingStack, name: str) -> None:
    async def started() -> bool:
        return (await _get(ts, name)).status.state == common_pb2.JOB_STATE_RUNNING

    await _until(started, f"{name} to run")


async def _waiting(ts: TrainingStack, name: str, reason: str) -> tpb.TrainingJob:
    """The job once the scheduler has looked at it and left it QUEUED for ``reason``."""

    async def waits() -> tpb.TrainingJob | None:
        job = await _get(ts, name)
        assert job.status.state == common_pb2.JOB_STATE_QUEUED, job.status
        return job if job.status.reason == reason else None

    return await _until(waits, f"{name} to wait: {reason}")


async def _ran_on(ts: TrainingStack, name: str) -> set[str]:
    response = await ts.training.ListTrainingJobLogs(tpb.ListTrainingJobLogsRequest(parent=name))
    return {entry.worker for entry in response.log_entries if entry.worker}


async def _count_jobs(ts: TrainingStack) -> int:
    response = await ts.training.ListTrainingJobs(tpb.ListTrainingJobsRequest(page_size=1000))
    return len(response.training_jobs)


def _succeeded(job: tpb.TrainingJob) -> None:
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason


async def test_workers_of_two_classes_get_only_the_jobs_they_fit(training_stack):
    ts = training_stack
    small = tpb.Resources(cpus=1, memory_bytes=2 * GIB, labels={"pool": "a"})
    large = tpb.Resources(cpus=8, memory_bytes=16 * GIB, labels={"pool": "b"})
    async with (
        ts.worker(name="small-1", resources=small, resource_class="small"),
        ts.worker(name="large-1", resources=large, resource_class="large"),
    ):
        await _workers_idle(ts, {"workers/small-1", "workers/large-1"})
        listed = await ts.training.ListWorkers(tpb.ListWorkersRequest())
        offers = {w.name: (w.resource_class, w.resources) for w in listed.workers}
        assert offers["workers/small-1"] == ("small", small)
        assert offers["workers/large-1"] == ("large", large)

        # A request no registered worker can meet is refused, naming the field.
        before = await _count_jobs(ts)
        unmeetable = [
            (tpb.Resources(gpus=1), "gpus"),
            (tpb.Resources(cpus=16), "cpus"),
            (tpb.Resources(memory_bytes=32 * GIB), "memory_bytes"),
            (tpb.Resources(labels={"pool": "c"}), "labels.pool"),
            (tpb.Resources(hosts=3), "hosts"),
        ]
        for resources, field in unmeetable:
            for validate_only in (False, True):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await ts.create(
                        ts.job(MLP, QUICK, resources=resources), validate_only=validate_only
                    )
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert f"training_job.resources.{field}:" in caught.value.details()
        assert await _count_jobs(ts) == before

        requests = {
            "cpus-4": tpb.Resources(cpus=4),
            "pool-a": tpb.Resources(labels={"pool": "a"}),
            "pool-b": tpb.Resources(labels={"pool": "b"}),
            "any": tpb.Resources(),
        }
        created = {
            key: await ts.create(ts.job(MLP, QUICK, resources=resources))
            for key, resources in requests.items()
        }
        for job in created.values():
            _succeeded(await ts.wait(job.name))
        ran_on = {key: await _ran_on(ts, job.name) for key, job in created.items()}
    assert ran_on["cpus-4"] == {"workers/large-1"}
    assert ran_on["pool-a"] == {"workers/small-1"}
    assert ran_on["pool-b"] == {"workers/large-1"}
    assert len(ran_on["any"]) == 1


async def test_high_priority_job_starts_first_when_the_worker_is_busy(training_stack):
    ts = training_stack
    async with ts.worker(name="only"):
        await _workers_idle(ts, {"workers/only"})
        blocker = await ts.create(ts.job(MLP, HOLD))
        await _running(ts, blocker.name)
        normal = [(await ts.create(ts.job(MLP, QUICK))).name for _ in range(2)]
        urgent = (await ts.create(ts.job(MLP, QUICK, priority=50))).name
        for name in [*normal, urgent]:
            await _waiting(ts, name, "waiting for a free worker that fits")

        await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=blocker.name))
        done = {name: await ts.wait(name) for name in [urgent, *normal]}
    for job in done.values():
        _succeeded(job)
    starts = [done[name].status.start_time.ToDatetime() for name in [urgent, *normal]]
    assert starts == sorted(starts), "the urgent job, then the others in creation order"
    ended = await _get(ts, blocker.name)
    assert ended.status.state == common_pb2.JOB_STATE_CANCELLED


async def test_project_at_its_quota_waits_for_one_of_its_jobs_to_end(quota_stack):
    ts = quota_stack
    async with ts.worker(name="q1"), ts.worker(name="q2"):
        await _workers_idle(ts, {"workers/q1", "workers/q2"})
        first = await ts.create(ts.job(MLP, HOLD, project="vision"))
        await _running(ts, first.name)
        second = (await ts.create(ts.job(MLP, QUICK, project="vision"))).name
        other = (await ts.create(ts.job(MLP, QUICK, project="nlp"))).name

        # Another project uses the free worker; vision's second job waits for its quota.
        _succeeded(await ts.wait(other))
        await _waiting(ts, second, "waiting: project 'vision' runs 1 of its 1 concurrent jobs")

        await ts.training.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=first.name))
        cancelled = await ts.wait(first.name)
        done = await ts.wait(second)
    assert cancelled.status.state == common_pb2.JOB_STATE_CANCELLED
    _succeeded(done)
    assert done.status.start_time.ToDatetime() >= cancelled.status.end_time.ToDatetime()
