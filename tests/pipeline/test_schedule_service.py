"""Schedules through the pipeline service's gRPC API on a real stack (data + pipeline, SQLite,
JetStream): a schedule firing every second starts runs on the dataset's newest READY version,
pausing stops it, a restarted service still has it, and a bad cron registers nothing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from tests.fixtures.stack import serve_stack
from tests.pipeline.conftest import open_env, pipeline_settings

SERVICES = ["data", "registry", "pipeline"]
EVERY_SECOND = "* * * * * *"


def pinned_spec() -> pb.PipelineSpec:
    """A spec pinned to version 1 with a given model version: every stage is skipped, so a run
    ends as soon as it is written and shows which dataset version it was given."""
    return specs.from_dict({
        "dataset": {"name": "cancer", "version": "datasets/cancer/versions/1"},
        "model": {"name": "cancer-mlp", "version": "models/cancer-mlp/versions/1"},
    })  # fmt: skip


async def ingest_again(data: data_pb2_grpc.DataServiceStub, dataset: str) -> str:
    """A second version of the dataset (force: the source is unchanged)."""
    job = await data.IngestDataset(data_pb2.IngestDatasetRequest(name=dataset, force=True))
    while job.status.state not in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED):
        await asyncio.sleep(0.2)
        job = await data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    return job.dataset_version


async def scheduled_runs(
    stub: pipeline_pb2_grpc.PipelineServiceStub, schedule: str
) -> list[pb.PipelineRun]:
    listed = await stub.ListPipelineRuns(pb.ListPipelineRunsRequest(page_size=1000))
    return [run for run in listed.pipeline_runs if run.labels.get("schedule") == schedule]


async def until(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():  # type: ignore[misc]
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.2)


async def test_schedule_fires_pauses_and_survives_a_restart(tmp_path: Path, nats_url: str) -> None:
    async with open_env(tmp_path, nats_url, SERVICES) as env:
        settings = env.stack.settings
        assert await env.ingest("cancer") == "datasets/cancer/versions/1"
        newest = await ingest_again(env.data, "datasets/cancer")
        assert newest == "datasets/cancer/versions/2"
        stub = env.pipeline
        created = await stub.CreateSchedule(
            pb.CreateScheduleRequest(
                schedule=pb.Schedule(spec=pinned_spec(), cron=EVERY_SECOND, labels={"k": "v"}),
                schedule_id="retrain",
            )
        )
        assert created.name == "schedules/retrain"
        assert created.state == pb.SCHEDULE_STATE_ACTIVE
        upcoming = [t.ToDatetime() for t in created.next_run_times]
        assert [(b - a).total_seconds() for a, b in itertools.pairwise(upcoming)] == [1.0] * 4

        async def fired() -> bool:
            return len(await scheduled_runs(stub, "retrain")) >= 2

        await until(fired, "two scheduled runs")
        for run in await scheduled_runs(stub, "retrain"):
            # Pinned to version 1, given the newest READY version when it fired.
            assert run.spec.dataset.dataset_version == newest
            assert run.summary.dataset_version == newest
            assert run.state == pb.RUN_STATE_SUCCEEDED
            assert run.labels["k"] == "v"

        paused = await stub.PauseSchedule(pb.PauseScheduleRequest(name="schedules/retrain"))
        assert paused.state == pb.SCHEDULE_STATE_PAUSED
        assert list(paused.next_run_times) == []
        count = len(await scheduled_runs(stub, "retrain"))
        assert paused.run_count == count
        assert paused.last_run in {run.name for run in await scheduled_runs(stub, "retrain")}
        await asyncio.sleep(2.5)  # two and a half firing times pass while paused
        assert len(await scheduled_runs(stub, "retrain")) == count

    # A new process on the same database: the schedule is there, PAUSED, and resumes.
    async with serve_stack(settings, SERVICES) as stack:
        stub = pipeline_pb2_grpc.PipelineServiceStub(stack.channel("pipeline"))
        kept = await stub.GetSchedule(pb.GetScheduleRequest(name="schedules/retrain"))
        assert kept.state == pb.SCHEDULE_STATE_PAUSED
        assert (kept.cron, kept.run_count, kept.spec) == (EVERY_SECOND, count, pinned_spec())
        await stub.ResumeSchedule(pb.ResumeScheduleRequest(name="schedules/retrain"))

        async def fired_again() -> bool:
            return len(await scheduled_runs(stub, "retrain")) > count

        await until(fired_again, "a run after the restart")
        await stub.DeleteSchedule(pb.DeleteScheduleRequest(name="schedules/retrain"))
        listed = await stub.ListSchedules(pb.ListSchedulesRequest())
        assert list(listed.schedules) == []


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        (pb.Schedule(spec=pinned_spec(), cron="61 * * * *"), "schedule.cron"),
        (pb.Schedule(spec=pinned_spec(), cron="0 3 * *"), "schedule.cron"),
        (pb.Schedule(spec=pinned_spec(), cron="@daily", time_zone="Nowhere/Town"),
         "schedule.time_zone"),
        (pb.Schedule(spec=pb.PipelineSpec(), cron="@daily"), "schedule.spec.dataset.dataset"),
    ],
)  # fmt: skip
async def test_invalid_schedule_registers_nothing(
    tmp_path: Path, nats_url: str, schedule: pb.Schedule, field: str
) -> None:
    settings = pipeline_settings(tmp_path, nats_url)
    async with serve_stack(settings, ["pipeline"]) as stack:
        stub = pipeline_pb2_grpc.PipelineServiceStub(stack.channel("pipeline"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSchedule(
                pb.CreateScheduleRequest(schedule=schedule, schedule_id="nightly")
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or "")
        listed = await stub.ListSchedules(pb.ListSchedulesRequest())
        assert list(listed.schedules) == []
        # An update to a bad cron leaves the schedule as it was.
        good = pb.Schedule(spec=pinned_spec(), cron="@daily")
        await stub.CreateSchedule(pb.CreateScheduleRequest(schedule=good, schedule_id="nightly"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.UpdateSchedule(
                pb.UpdateScheduleRequest(
                    schedule=pb.Schedule(name="schedules/nightly", cron="61 * * * *"),
                    update_mask=field_mask_pb2.FieldMask(paths=["cron"]),
                )
            )
        assert "schedule.cron" in (refused.value.details() or "")
        kept = await stub.GetSchedule(pb.GetScheduleRequest(name="schedules/nightly"))
        assert kept.cron == "@daily"
