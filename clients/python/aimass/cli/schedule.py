"""``aimass schedule``: pipeline specs run on a cron schedule (create, list, show, pause,
resume, delete).

A schedule runs its pipeline file every time the cron expression fires, on the dataset's
newest data (docs/pipelines.md). Exit codes as every resource command: 0 done, 1 the
service refused or failed, 2 bad usage (a bad file, cron expression or time zone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.table import Table

from aimass.cli.common import EXIT_USAGE, console
from aimass.cli.common import fail as _fail
from aimass.cli.pipeline import AddressOption, JsonOption, _call, _stub
from aimass.core.errors import AimassError
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb

schedule_app = typer.Typer(
    help="Scheduled pipelines: run a pipeline file on a cron schedule.", no_args_is_help=True
)


def _full_name(schedule: str) -> str:
    return schedule if schedule.startswith("schedules/") else f"schedules/{schedule}"


def _state(schedule: pb.Schedule) -> str:
    return pb.ScheduleState.Name(schedule.state).removeprefix("SCHEDULE_STATE_")


def _show(schedule: pb.Schedule, as_json: bool) -> None:
    if as_json:
        data = json_format.MessageToDict(schedule, preserving_proto_field_name=True)
        typer.echo(json.dumps(data, indent=2))
        return
    facts = Table(title=schedule.name, show_header=False, title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("state", _state(schedule)),
        ("cron", schedule.cron),
        ("time zone", schedule.time_zone or "UTC"),
        ("model", schedule.spec.model.model),
        ("dataset", schedule.spec.dataset.dataset),
        ("runs", str(schedule.run_count)),
        ("last run", schedule.last_run),
        ("next runs", "\n".join(t.ToJsonString() for t in schedule.next_run_times)),
    ]
    for key, value in rows:
        if value:
            facts.add_row(key, value)
    console.print(facts)


@schedule_app.command("create")
def create(
    spec_file: Annotated[Path, typer.Argument(help="The pipeline YAML file to run.")],
    cron: Annotated[
        str,
        typer.Option(
            "--cron",
            help="When to run: 5 fields (minute hour day month weekday), 6 with seconds last,"
            " or @daily / @hourly ...",
        ),
    ],
    schedule_id: Annotated[str, typer.Option("--id", help="The schedule's id.")],
    time_zone: Annotated[
        str, typer.Option("--time-zone", help="IANA zone the cron is read in (default UTC).")
    ] = "",
    paused: Annotated[bool, typer.Option("--paused", help="Create it PAUSED.")] = False,
    description: Annotated[str, typer.Option(help="Free text shown to people.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a schedule that runs a pipeline file every time the cron expression fires."""
    try:
        spec = specs.load_yaml(spec_file)
    except AimassError as err:
        _fail(f"{spec_file}: {err.message}", EXIT_USAGE)
    schedule = pb.Schedule(spec=spec, cron=cron, time_zone=time_zone, description=description)
    request = pb.CreateScheduleRequest(schedule=schedule, schedule_id=schedule_id, paused=paused)
    _show(_call(_stub(address).CreateSchedule, request), as_json)


@schedule_app.command("list")
def list_schedules(address: AddressOption = None, as_json: JsonOption = False) -> None:
    """List schedules with their next run time."""
    stub = _stub(address)
    found: list[pb.Schedule] = []
    token = ""
    while True:
        page = _call(stub.ListSchedules, pb.ListSchedulesRequest(page_token=token))
        found.extend(page.schedules)
        token = page.next_page_token
        if not token:
            break
    if as_json:
        data = [json_format.MessageToDict(s, preserving_proto_field_name=True) for s in found]
        typer.echo(json.dumps({"schedules": data}, indent=2))
        return
    table = Table()
    for column in ("schedule", "state", "cron", "time zone", "next run", "runs", "last run"):
        table.add_column(column)
    for schedule in found:
        upcoming = schedule.next_run_times[0].ToJsonString() if schedule.next_run_times else ""
        table.add_row(
            schedule.name, _state(schedule), schedule.cron, schedule.time_zone or "UTC",
            upcoming, str(schedule.run_count), schedule.last_run,
        )  # fmt: skip
    console.print(table)


@schedule_app.command("show")
def show(schedule: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show a schedule and its next run times."""
    request = pb.GetScheduleRequest(name=_full_name(schedule))
    _show(_call(_stub(address).GetSchedule, request), as_json)


@schedule_app.command("pause")
def pause(schedule: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Stop a schedule from firing (runs already started go on)."""
    request = pb.PauseScheduleRequest(name=_full_name(schedule))
    _show(_call(_stub(address).PauseSchedule, request), as_json)


@schedule_app.command("resume")
def resume(schedule: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Fire again from the next cron time (the times missed while paused are not run)."""
    request = pb.ResumeScheduleRequest(name=_full_name(schedule))
    _show(_call(_stub(address).ResumeSchedule, request), as_json)


@schedule_app.command("delete")
def delete(schedule: str, address: AddressOption = None) -> None:
    """Delete a schedule; the runs it started are kept."""
    name = _full_name(schedule)
    _call(_stub(address).DeleteSchedule, pb.DeleteScheduleRequest(name=name))
    console.print(f"deleted {name}")
