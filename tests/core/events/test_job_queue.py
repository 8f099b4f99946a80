"""The work queue: each job to one worker, back to the queue when its worker dies."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest
from event_support import Proc

from aimass.core.errors import InvalidArgument
from aimass.core.events import JOBS_STREAM, EventBus
from aimass.events.v1 import events_pb2


def job_payload(name: str) -> events_pb2.TrainingJobFailed:
    # Any message does as a payload; the queue does not look inside.
    return events_pb2.TrainingJobFailed(job=name)


@pytest.fixture
async def second_bus(nats_url: str, bus: EventBus) -> AsyncIterator[EventBus]:
    """Another process's connection (``bus`` first, so the streams exist)."""
    other = await EventBus.connect(nats_url, "test-worker-2")
    yield other
    await other.close()


async def stream_messages(bus: EventBus) -> int:
    return int((await bus.js.stream_info(JOBS_STREAM)).state.messages)


async def test_one_job_goes_to_exactly_one_of_two_workers(
    bus: EventBus, second_bus: EventBus
) -> None:
    first = await bus.job_queue("training", ack_wait_s=30)
    second = await second_bus.job_queue("training", ack_wait_s=30)
    await bus.enqueue_job("training", "trainingJobs/1", job_payload("trainingJobs/1"))

    got = await asyncio.gather(first.pull(timeout_s=1.5), second.pull(timeout_s=1.5))

    jobs = [job for job in got if job is not None]
    assert len(jobs) == 1
    assert jobs[0].name == "trainingJobs/1"
    assert jobs[0].num_delivered == 1
    await jobs[0].ack()
    assert await stream_messages(bus) == 0


async def test_many_jobs_are_shared_without_overlap(bus: EventBus, second_bus: EventBus) -> None:
    names = [f"trainingJobs/{n}" for n in range(20)]
    for name in names:
        await bus.enqueue_job("training", name, job_payload(name))

    async def drain(worker_bus: EventBus) -> list[str]:
        queue = await worker_bus.job_queue("training")
        done = []
        while (job := await queue.pull(timeout_s=1.0)) is not None:
            done.append(job.name)
            await job.ack()
        return done

    first, second = await asyncio.gather(drain(bus), drain(second_bus))

    assert sorted(first + second) == sorted(names)
    assert not set(first) & set(second)
    assert await stream_messages(bus) == 0


async def test_job_of_a_killed_worker_is_redelivered(
    bus: EventBus, nats_url: str, procs: list[Proc]
) -> None:
    doomed = await Proc.spawn("work", "--nats", nats_url, "--kind", "compression")
    procs.append(doomed)
    await doomed.line_starting("ready")
    await bus.enqueue_job("compression", "compressionJobs/7", job_payload("c7"))

    assert await doomed.line_starting("job") == "job compressionJobs/7 1"
    assert await doomed.kill() == -signal.SIGKILL

    queue = await bus.job_queue("compression", ack_wait_s=1.0)
    job = await queue.pull(timeout_s=15.0)
    assert job is not None
    assert (job.name, job.num_delivered) == ("compressionJobs/7", 2)
    await job.ack()


async def test_heartbeats_keep_a_long_job_with_its_worker(
    bus: EventBus, second_bus: EventBus
) -> None:
    worker = await bus.job_queue("evaluation", ack_wait_s=1.0)
    rival = await second_bus.job_queue("evaluation", ack_wait_s=1.0)
    await bus.enqueue_job("evaluation", "evaluations/1", job_payload("e1"))

    job = await worker.pull(timeout_s=2.0)
    assert job is not None
    async with job.keep_alive(interval_s=0.2):
        # Three ack_waits pass while the rival waits: heartbeats keep the job here.
        stolen = await rival.pull(timeout_s=3.0)
    assert stolen is None
    await job.ack()

    info = await worker.consumer_info()
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0
    assert await rival.pull(timeout_s=0.5) is None


async def test_job_is_given_up_after_max_deliver(bus: EventBus) -> None:
    queue = await bus.job_queue("training", ack_wait_s=30, max_deliver=2)
    await bus.enqueue_job("training", "trainingJobs/bad", job_payload("bad"))

    deliveries = []
    while (job := await queue.pull(timeout_s=1.0)) is not None:
        deliveries.append(job.num_delivered)
        await job.nak()

    assert deliveries == [1, 2]


async def test_enqueue_with_the_job_name_as_msg_id_is_idempotent(bus: EventBus) -> None:
    for _ in range(2):
        await bus.enqueue_job(
            "training", "trainingJobs/9", job_payload("j9"), msg_id="trainingJobs/9"
        )
    assert await stream_messages(bus) == 1


@pytest.mark.parametrize("kind", ["", "a.b", "with space", "*"])
async def test_bad_kind_is_rejected(bus: EventBus, kind: str) -> None:
    with pytest.raises(InvalidArgument, match="kind"):
        await bus.enqueue_job(kind, "jobs/1", job_payload("x"))
