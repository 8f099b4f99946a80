"""A job whose workers all died mid-way ends FAILED with the reason, never stays RUNNING."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.data import worker
from tests.data.conftest import DataService, EventLog, write_csv


async def test_a_job_past_its_attempts_is_failed_not_left_running(
    data: DataService, data_events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no attempts left, the first delivery stands for "every attempt died".
    monkeypatch.setattr(worker, "MAX_ATTEMPTS", 0)
    write_csv(data.root / "d.csv", 30)
    await data.create("d", data_path="d.csv", label_column="label")

    job = await data.ingest("d")

    assert job.status.state == common_pb2.JOB_STATE_FAILED
    assert "stopped 0 times without finishing" in job.status.reason
    assert data.count(m.DatasetVersion) == 0
    await data_events.wait_for(lambda events: bool(events))
    assert [e.topic for e in data_events.envelopes] == ["aimass.data.version.failed"]


async def test_finished_ingests_are_counted_with_their_duration(data: DataService) -> None:
    labels = {"kind": "ingest", "state": "SUCCEEDED"}
    before = REGISTRY.get_sample_value("aimass_jobs_total", labels) or 0.0
    timed = REGISTRY.get_sample_value("aimass_job_duration_seconds_count", labels) or 0.0
    write_csv(data.root / "d.csv", 30)
    await data.create("d", data_path="d.csv", label_column="label")

    job = await data.ingest("d")

    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert REGISTRY.get_sample_value("aimass_jobs_total", labels) == before + 1
    assert REGISTRY.get_sample_value("aimass_job_duration_seconds_count", labels) == timed + 1
