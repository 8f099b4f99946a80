"""Schedules fired by the scheduler loop, on a migrated database (SQLite and PostgreSQL: the
``database`` fixture) and a clock the test sets: missed firings run once, several replicas
fire a due schedule once, time zones hold."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
from sqlalchemy import select

from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.errors import InvalidArgument
from aimass.pipeline import schedules as sch
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def ingest_spec() -> pb.PipelineSpec:
    """A spec that ingests (no dataset version to resolve: the scheduler calls nothing)."""
    return specs.from_dict({
        "dataset": {"name": "cancer", "data_path": "cancer.csv", "label_column": "target"},
        "model": {"name": "cancer-mlp", "task": "classification", "mlp": {"hidden_sizes": [8]}},
    })  # fmt: skip


def scheduler(database: Database, clock: Clock) -> sch.Scheduler:
    # Never called: the spec ingests, so no dataset version is looked up.
    unused = sch.NewestDataset(grpc.aio.insecure_channel("127.0.0.1:9"))
    return sch.Scheduler(sch.ScheduleStore(database, clock), unused, lambda: None)


def runs(database: Database) -> list[m.PipelineRun]:
    with database.session(read_only=True) as session:
        return list(session.scalars(select(m.PipelineRun)))


def times(schedule: pb.Schedule) -> list[datetime]:
    return [t.ToDatetime(tzinfo=UTC) for t in schedule.next_run_times]


async def test_replicas_fire_a_missed_schedule_once_then_go_on_from_now(database: Database) -> None:
    clock = Clock(datetime(2026, 1, 1, 0, 0, tzinfo=UTC))
    store = sch.ScheduleStore(database, clock)
    created = store.create(
        "nightly", pb.Schedule(spec=ingest_spec(), cron="0 3 * * *", labels={"team": "ml"}),
        creator="alice", paused=False,
    )  # fmt: skip
    assert times(created) == [datetime(2026, 1, d, 3, 0, tzinfo=UTC) for d in range(1, 6)]
    replicas = [scheduler(database, clock) for _ in range(3)]
    assert await replicas[0].tick() == []  # not due yet
    assert runs(database) == []

    # Down for three nights: one catch-up run, whichever replica wins the compare-and-set.
    clock.now = datetime(2026, 1, 3, 5, 0, tzinfo=UTC)
    started = await asyncio.gather(*(replica.tick() for replica in replicas))
    fired = [name for names in started for name in names]
    assert len(fired) == 1
    (run,) = runs(database)
    assert fired == [f"pipelineRuns/{run.name}"]
    assert run.labels == {"team": "ml", "schedule": "nightly"}
    assert run.creator == "alice"
    assert run.spec["dataset"]["dataset"] == "cancer"
    schedule = store.get("nightly")
    assert schedule.run_count == 1
    assert schedule.last_run == fired[0]
    assert schedule.last_run_time.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    assert times(schedule)[0] == datetime(2026, 1, 4, 3, 0, tzinfo=UTC)
    assert [await replica.tick() for replica in replicas] == [[], [], []]

    clock.now = datetime(2026, 1, 4, 3, 0, 1, tzinfo=UTC)
    assert len(await replicas[2].tick()) == 1
    assert len(runs(database)) == 2


async def test_paused_schedule_does_not_fire_and_resumes_from_now(database: Database) -> None:
    clock = Clock(datetime(2026, 1, 1, 0, 0, tzinfo=UTC))
    store = sch.ScheduleStore(database, clock)
    store.create(
        "hourly", pb.Schedule(spec=ingest_spec(), cron="@hourly"), creator="", paused=False
    )
    paused = store.pause("hourly")
    assert paused.state == pb.SCHEDULE_STATE_PAUSED
    assert list(paused.next_run_times) == []
    clock.now = datetime(2026, 1, 2, 0, 30, tzinfo=UTC)
    assert await scheduler(database, clock).tick() == []
    resumed = store.resume("hourly")
    assert resumed.state == pb.SCHEDULE_STATE_ACTIVE
    # The 24 hours missed while paused are not run: the next firing is the next hour.
    assert times(resumed)[0] == datetime(2026, 1, 2, 1, 0, tzinfo=UTC)
    assert await scheduler(database, clock).tick() == []
    assert runs(database) == []


def test_cron_is_read_in_the_time_zone(database: Database) -> None:
    clock = Clock(datetime(2026, 3, 28, 12, 0, tzinfo=UTC))
    store = sch.ScheduleStore(database, clock)
    created = store.create(
        "paris", pb.Schedule(spec=ingest_spec(), cron="0 3 * * *", time_zone="Europe/Paris"),
        creator="", paused=False,
    )  # fmt: skip
    # 03:00 in Paris is 02:00 UTC in winter and 01:00 UTC after the clocks move (29 March).
    assert times(created)[:3] == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 31, 1, 0, tzinfo=UTC),
    ]
    # Six fields: seconds come last (every 20 seconds here).
    updated = store.update("paris", pb.Schedule(cron="* * * * * */20"), ["cron"])
    assert updated.cron == "* * * * * */20"
    assert times(updated)[:2] == [
        datetime(2026, 3, 28, 12, 0, 20, tzinfo=UTC),
        datetime(2026, 3, 28, 12, 0, 40, tzinfo=UTC),
    ]


@pytest.mark.parametrize(
    ("cron", "zone", "field", "says"),
    [
        ("61 * * * *", "", "schedule.cron", "not a valid cron expression"),
        ("every night", "", "schedule.cron", "must have 5 fields"),
        ("", "", "schedule.cron", "is required"),
        ("0 0 30 2 *", "", "schedule.cron", "never fires"),
        ("0 3 * * *", "../../etc/passwd", "schedule.time_zone", "not an IANA time zone"),
        ("0 3 * * *", "Mars/Olympus", "schedule.time_zone", "not an IANA time zone"),
    ],
)
def test_invalid_schedule_is_refused_naming_the_field(
    cron: str, zone: str, field: str, says: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        sch.validate(pb.Schedule(spec=ingest_spec(), cron=cron, time_zone=zone))
    assert field in str(refused.value)
    assert says in str(refused.value)
