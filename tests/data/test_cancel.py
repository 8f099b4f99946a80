"""CancelIngestJob on a queued and on a running job: CANCELLED, and nothing half-made left."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.data import ingest
from aimass.data.v1 import data_pb2 as pb
from tests.data.conftest import DataService, EventLog, write_csv

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def endless_prepare(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Makes the conversion step run until stopped, reporting progress as a real one does;
    the event is set once it started (the version is allocated by then)."""
    started = threading.Event()

    def prepare(
        source: Path, fmt: str, config: Any, work: Path, progress: Callable[[int, int], None]
    ) -> None:
        started.set()
        rows = 0
        while True:  # ends when progress raises Stopped
            rows += 1
            progress(-1, rows)
            time.sleep(0.02)

    monkeypatch.setattr(ingest, "_prepare", prepare)
    return started


async def wait_started(started: threading.Event) -> None:
    assert await asyncio.to_thread(started.wait, 30), "the ingest never started converting"


async def test_cancel_a_running_job(
    data: DataService, data_events: EventLog, endless_prepare: threading.Event
) -> None:
    write_csv(data.root / "d.csv", 30)
    await data.create("d", data_path="d.csv", label_column="label")
    job = await data.stub.IngestDataset(pb.IngestDatasetRequest(name="datasets/d"))
    await wait_started(endless_prepare)
    assert data.count(m.DatasetVersion) == 1  # allocated, INGESTING

    cancelled = await data.stub.CancelIngestJob(pb.CancelIngestJobRequest(name=job.name))

    assert cancelled.status.state == common_pb2.JOB_STATE_CANCELLED
    assert cancelled.status.reason == "cancelled on request"
    assert data.count(m.DatasetVersion) == 0
    assert data.stored_files() == []
    events = [e async for e in data.stub.WatchIngestJob(pb.WatchIngestJobRequest(name=job.name))]
    states = [e.status.state for e in events]
    assert common_pb2.JOB_STATE_CANCELLING in states
    assert states[-1] == common_pb2.JOB_STATE_CANCELLED
    await data_events.wait_for(lambda es: any(e.topic == "aimass.data.version.failed" for e in es))
    again = await data.stub.CancelIngestJob(pb.CancelIngestJobRequest(name=job.name))
    assert again.status.state == common_pb2.JOB_STATE_CANCELLED


async def test_cancel_a_queued_job_before_a_worker_takes_it(
    data: DataService, endless_prepare: threading.Event
) -> None:
    write_csv(data.root / "d.csv", 30)
    await data.create("d", data_path="d.csv", label_column="label")
    await data.create("e", data_path="d.csv", label_column="label")
    running = await data.stub.IngestDataset(pb.IngestDatasetRequest(name="datasets/d"))
    await wait_started(endless_prepare)
    # One ingest at a time per replica: this one waits in the queue.
    queued = await data.stub.IngestDataset(pb.IngestDatasetRequest(name="datasets/e"))
    got = await data.stub.GetIngestJob(pb.GetIngestJobRequest(name=queued.name))
    assert got.status.state == common_pb2.JOB_STATE_QUEUED

    cancelled = await data.stub.CancelIngestJob(pb.CancelIngestJobRequest(name=queued.name))
    assert cancelled.status.state == common_pb2.JOB_STATE_CANCELLED

    await data.stub.CancelIngestJob(pb.CancelIngestJobRequest(name=running.name))
    # The worker then pulls the cancelled job and leaves it as it is.
    await asyncio.sleep(0.5)
    after = await data.stub.GetIngestJob(pb.GetIngestJobRequest(name=queued.name))
    assert after.status.state == common_pb2.JOB_STATE_CANCELLED
    assert not after.status.HasField("start_time")
    assert data.count(m.DatasetVersion) == 0
    assert data.stored_files() == []
