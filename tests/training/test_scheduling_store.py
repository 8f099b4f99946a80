"""The admission pass on the database (SQLite and PostgreSQL): queued jobs are published on
the class subject of the worker they were matched with, by priority, within project quotas;
released jobs hold their worker until claimed; stale workers get nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from aimass.core.db.base import utcnow
from aimass.core.db.models import TrainingJob, Worker
from aimass.core.db.outbox import OutboxEvent
from aimass.core.errors import InvalidArgument
from aimass.core.events.envelope import decode_envelope
from aimass.core.protodict import message_to_dict
from aimass.training.scheduling import SchedulingConfig
from aimass.training.store import TrainingStore
from aimass.training.v1 import training_pb2 as tpb

GIB = 1 << 30
CPU = tpb.Resources(cpus=4, memory_bytes=8 * GIB)
GPU = tpb.Resources(cpus=16, memory_bytes=64 * GIB, gpus=2, gpu_type="L4")
CONFIG = SchedulingConfig(quotas={"vision": 1}, worker_stale_s=30)


def _register(store: TrainingStore, name: str, klass: str, offer: tpb.Resources) -> None:
    capabilities = {"resources": message_to_dict(offer), "resource_class": klass}
    store.register_worker(name, "host", 1, capabilities, "IDLE", "")


def _create(store: TrainingStore, description: str, **fields) -> str:
    job = tpb.TrainingJob(
        description=description, dataset_version="datasets/d/versions/1", **fields
    )
    job.model.mlp.hidden_sizes.append(8)
    job.training.epochs = 1
    return store.create(job, request_id="", creator="").name


def _published(store: TrainingStore) -> dict[str, str]:
    """Job name -> the work-queue subject it was published on."""
    with store.db.session(read_only=True) as session:
        rows = session.scalars(
            select(OutboxEvent).where(OutboxEvent.topic.like("aimassjobs.training%"))
        )
        return {decode_envelope(row.envelope).subject: row.topic for row in rows}


def _reason(store: TrainingStore, name: str) -> str:
    return store.get(name).status.reason


def test_schedule_by_class_priority_and_quota(database):
    store = TrainingStore(database)
    _register(store, "cpu-1", "cpu", CPU)
    _register(store, "gpu-1", "gpu", GPU)
    _register(store, "stale", "cpu", CPU)
    with database.session() as session:  # a worker not heard from for a minute
        stale = session.scalars(select(Worker).where(Worker.name == "stale")).one()
        stale.heartbeat_time = utcnow() - timedelta(seconds=60)

    needs_gpu = _create(store, "gpu", project="vision", resources=tpb.Resources(gpus=1))
    normal = _create(store, "normal")
    urgent = _create(store, "urgent", priority=10)
    over_quota = _create(store, "vision 2", project="vision")
    assert _published(store) == {}  # created jobs wait for the scheduler

    assert store.schedule(CONFIG) == 2
    assert _published(store) == {
        urgent: "aimassjobs.training.cpu",  # first, on the smallest worker that fits
        needs_gpu: "aimassjobs.training.gpu",
    }
    assert _reason(store, normal) == "waiting for a free worker that fits"
    assert _reason(store, over_quota) == (
        "waiting: project 'vision' runs 1 of its 1 concurrent jobs"
    )
    # Released jobs hold their workers until claimed: a second pass releases nothing.
    assert store.schedule(CONFIG) == 0

    store.claim(urgent, "cpu-1")
    assert store.schedule(CONFIG) == 0  # cpu-1 is busy now
    store.finish(urgent, "SUCCEEDED", metrics={})
    assert store.schedule(CONFIG) == 1
    assert _published(store)[normal] == "aimassjobs.training.cpu"
    assert _reason(store, normal) == ""

    store.claim(needs_gpu, "gpu-1")
    store.finish(needs_gpu, "FAILED", reason="boom")
    assert store.schedule(CONFIG) == 1  # the project is under its quota again
    assert _published(store)[over_quota] == "aimassjobs.training.gpu"


def test_cancelled_queued_job_is_never_published_and_hosts_get_one_task_each(database):
    store = TrainingStore(database)
    cancelled = _create(store, "cancelled")
    store.cancel(cancelled)
    spread = _create(store, "two hosts", resources=tpb.Resources(hosts=2))
    _register(store, "a", "cpu", CPU)
    assert store.schedule(CONFIG) == 0  # one worker cannot host two ranks
    assert _reason(store, spread) == "waiting for a free worker that fits"
    _register(store, "b", "cpu", CPU)
    assert store.schedule(CONFIG) == 1
    with database.session(read_only=True) as session:
        topics = sorted(
            row.topic
            for row in session.scalars(select(OutboxEvent))
            if row.topic.startswith("aimassjobs.")
        )
        row = session.scalars(select(TrainingJob).where(TrainingJob.display_name == "two hosts"))
        assert sorted(row.one().options["release"]["workers"]) == ["a", "b"]
    assert topics == ["aimassjobs.training.cpu", "aimassjobs.training.cpu"]
    assert cancelled not in _published(store)


def test_worker_offers_count_live_workers_with_a_class(database):
    store = TrainingStore(database)
    _register(store, "cpu-1", "cpu", CPU)
    store.register_worker("legacy", "host", 1, {"threads": 1}, "IDLE", "")
    _register(store, "gone", "gpu", GPU)
    store.register_worker("gone", "host", 1, {}, "GONE", "")
    # An offer that cannot be used is refused at registration, naming the field...
    with pytest.raises(InvalidArgument) as caught:
        _register(store, "bad-class", "not.a.token", CPU)
    assert caught.value.violations[0].field == "capabilities.resource_class"
    with pytest.raises(InvalidArgument) as caught:
        store.register_worker(
            "bad-offer", "h", 1, {"resource_class": "x", "resources": {"cores": 4}}, "IDLE", ""
        )
    assert caught.value.violations[0].field.startswith("capabilities.resources")
    # ... and one already stored is ignored rather than stopping every scheduling pass.
    with database.session() as session:
        capabilities = {"resource_class": "not.a.token", "resources": {"cpus": 64}}
        session.add(
            Worker(
                name="stored-bad",
                kind="training",
                capabilities=capabilities,
                state="IDLE",
                heartbeat_time=utcnow(),
            )
        )
    offers = store.worker_offers(30)
    assert [(name, offer.cpus) for name, offer in offers] == [("workers/cpu-1", 4.0)]
    queued = _create(store, "queued")
    assert store.schedule(CONFIG) == 1
    assert _published(store) == {queued: "aimassjobs.training.cpu"}


def test_list_in_the_order_the_scheduler_admits(database):
    store = TrainingStore(database)
    low = _create(store, "low", priority=-1)
    first = _create(store, "first")
    urgent = _create(store, "urgent", priority=10)
    second = _create(store, "second")
    jobs, _ = store.list("", 0, "", "priority desc")
    assert [j.name for j in jobs] == [urgent, first, second, low]
    # Pages continue the same order.
    page, token = store.list("", 2, "", "priority  DESC")
    rest, _ = store.list("", 2, token, "priority desc")
    assert [j.name for j in page + rest] == [urgent, first, second, low]
    with pytest.raises(InvalidArgument, match="order_by"):
        store.list("", 0, "", "priority")
