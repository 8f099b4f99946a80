"""``aimass run pipeline.yaml`` and ``aimass pipelines``: start, follow, rerun, cancel runs.

``run`` sends the spec to the pipeline service, follows the run's Watch stream
(one line per stage change) and prints the summary: dataset, metrics, the
compression table and the endpoint with the smoke test's answer. Exit code 0
when the run succeeded, 1 when it failed (the stage and the reason are
printed; ``aimass pipelines rerun NAME`` resumes from that stage), 2 on a bad
spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Group
from rich.table import Table

from aimass.cli.common import EXIT_FAILED, EXIT_USAGE, channel, console
from aimass.cli.common import fail as _fail
from aimass.core.errors import AimassError
from aimass.core.settings import SettingsError, load_settings
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc

TERMINAL = {pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED}

pipelines_app = typer.Typer(
    help="Pipeline runs: list, show, rerun from the failed stage, cancel.", no_args_is_help=True
)

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", help="host:port of the pipeline service (default: the configured stack's)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _stub(address: str | None) -> pipeline_pb2_grpc.PipelineServiceStub:
    """A stub on a channel that carries the API key (aimass.cli.common)."""
    if address is None:
        # The client config lists the six first services; the pipeline's address comes
        # from the settings, like theirs.
        try:
            address = load_settings().service_address("pipeline")
        except SettingsError as err:
            _fail(str(err), EXIT_USAGE)
    return pipeline_pb2_grpc.PipelineServiceStub(channel("pipeline", address))


def _call(function: Any, request: Any) -> Any:
    try:
        return function(request)
    except grpc.RpcError as err:
        code = EXIT_USAGE if err.code() == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED  # type: ignore[attr-defined]
        _fail(f"{err.code().name}: {err.details()}", code)  # type: ignore[attr-defined]


def _full_name(run: str) -> str:
    return run if run.startswith("pipelineRuns/") else f"pipelineRuns/{run}"


# ---------------------------------------------------------------- run


def run_command(
    spec_file: Annotated[Path, typer.Argument(help="The pipeline YAML file.")],
    run_id: Annotated[str, typer.Option("--id", help="The run's id (default: generated).")] = "",
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start the run and return at once.")
    ] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a pipeline: ingest, train, evaluate, compress, release, deploy, smoke-test."""
    try:
        spec = specs.load_yaml(spec_file)
    except AimassError as err:
        _fail(f"{spec_file}: {err.message}", EXIT_USAGE)
    stub = _stub(address)
    run = _call(
        stub.CreatePipelineRun,
        pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=spec), pipeline_run_id=run_id),
    )
    if not as_json:
        console.print(f"started {run.name}")
    if detach:
        _show(run, as_json)
        return
    _finish(follow(stub, run.name, quiet=as_json), as_json)


def follow(
    stub: pipeline_pb2_grpc.PipelineServiceStub, name: str, *, quiet: bool = False
) -> pb.PipelineRun:
    """Follows a run's Watch stream to its end, printing each stage change."""
    printed: dict[int, int] = {}
    last = None
    try:
        for run in stub.WatchPipelineRun(pb.WatchPipelineRunRequest(name=name)):
            last = run
            if not quiet:
                for stage in run.stages:
                    if printed.get(stage.stage) != stage.state:
                        printed[stage.stage] = stage.state
                        console.print(stage_line(stage), highlight=False)
    except grpc.RpcError as err:
        _fail(f"watching {name}: {err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    assert last is not None
    return last


def _finish(run: pb.PipelineRun, as_json: bool) -> None:
    _show(run, as_json)
    if run.state != pb.RUN_STATE_SUCCEEDED:
        raise typer.Exit(EXIT_FAILED)


def _show(run: pb.PipelineRun, as_json: bool) -> None:
    if as_json:
        typer.echo(
            json.dumps(json_format.MessageToDict(run, preserving_proto_field_name=True), indent=2)
        )
        return
    console.print(summary_view(run))


def stage_line(stage: pb.StageStatus) -> str:
    name = stage_name(stage.stage)
    state = pb.StageState.Name(stage.state).removeprefix("STAGE_STATE_")
    colour = {"SUCCEEDED": "green", "FAILED": "red", "RUNNING": "cyan", "STARTING": "cyan"}
    text = f"  {name:<11} [{colour.get(state, 'dim')}]{state}[/]"
    if stage.resource:
        text += f"  {stage.resource}"
    if stage.reason:
        text += f"  [red]{stage.reason}[/]"
    return text


def stage_name(stage: int) -> str:
    return pb.Stage.Name(stage).removeprefix("STAGE_").lower().replace("_", "-")


# ---------------------------------------------------------------- summary


def summary_view(run: pb.PipelineRun) -> Group:
    """The run's state, its stages and what it produced, as rich renderables."""
    state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_")
    parts: list[Any] = [_stages_table(run)]
    summary = run.summary
    facts = Table(title="summary", show_header=False, title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("dataset", summary.dataset_version),
        ("rows", ", ".join(f"{k} {v}" for k, v in summary.split_rows.items())),
        ("model", summary.model_version),
        *((f"test {k}", f"{v:.4f}") for k, v in sorted(summary.metrics.items())),
        ("compressed", summary.compressed_version),
        ("alias", summary.alias),
        ("released", summary.released_version),
        ("endpoint", summary.deployment),
        ("predict", summary.predict_answer
         and f"{summary.predict_answer} (from {summary.predict_version})"),
        ("served by", summary.predict_server),
    ]  # fmt: skip
    for key, value in rows:
        if value:
            facts.add_row(key, value)
    parts.append(facts)
    if summary.compression:
        parts.append(_compression_table(summary.compression))
    colour = "green" if run.state == pb.RUN_STATE_SUCCEEDED else "red"
    headline = f"[bold]{run.name}[/]: [{colour}]{state}[/]"
    if run.reason:
        headline += f" - {run.reason}"
    if run.state == pb.RUN_STATE_FAILED:
        headline += f"\n`aimass pipelines rerun {run.name}` resumes from the failed stage."
    return Group(*parts, headline)


def _stages_table(run: pb.PipelineRun) -> Table:
    table = Table(title=f"{run.name} (attempt {run.attempt})", title_justify="left")
    for column in ("stage", "state", "resource", "seconds", "reason"):
        table.add_column(column)
    for stage in run.stages:
        seconds = ""
        if stage.HasField("start_time") and stage.HasField("end_time"):
            elapsed = stage.end_time.ToDatetime() - stage.start_time.ToDatetime()
            seconds = f"{elapsed.total_seconds():.1f}"
        table.add_row(
            stage_name(stage.stage),
            pb.StageState.Name(stage.state).removeprefix("STAGE_STATE_"),
            stage.resource,
            seconds,
            stage.reason if len(stage.reason) <= 60 else stage.reason[:57] + "...",
        )
    return table


def _compression_table(rows: Any) -> Table:
    table = Table(title="compression (ratios against the baseline)", title_justify="left")
    table.add_column("step", no_wrap=True)
    for column in ("status", "size", "size ratio", "rows/s at 64", "speed", "accuracy"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.step, row.status, f"{row.size_bytes / 1024:.1f} KiB", f"{row.size_ratio:.2f}",
            f"{row.throughput_rows_per_second:,.0f}", f"{row.speed_ratio:.2f}x",
            f"{row.accuracy:.4f}" if row.accuracy else "",
        )  # fmt: skip
    return table


# ---------------------------------------------------------------- pipelines app


@pipelines_app.command("list")
def list_runs(
    state: Annotated[str, typer.Option(help="Only runs in this state (RUNNING, FAILED...).")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, newest first."""
    request = pb.ListPipelineRunsRequest(filter=f"state={state.upper()}" if state else "")
    response = _call(_stub(address).ListPipelineRuns, request)
    if as_json:
        typer.echo(json.dumps(json_format.MessageToDict(response), indent=2))
        return
    table = Table()
    for column in ("run", "state", "failed stage", "model", "endpoint"):
        table.add_column(column)
    for run in response.pipeline_runs:
        table.add_row(
            run.name, pb.RunState.Name(run.state).removeprefix("RUN_STATE_"),
            stage_name(run.failed_stage) if run.failed_stage else "",
            run.summary.model_version, run.summary.deployment,
        )  # fmt: skip
    console.print(table)


@pipelines_app.command("show")
def show(run: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show a run: its stages and summary."""
    _show(_call(_stub(address).GetPipelineRun, pb.GetPipelineRunRequest(name=_full_name(run))),
          as_json)  # fmt: skip


@pipelines_app.command("rerun")
def rerun(
    run: str,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return at once.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a FAILED or CANCELLED run from the stage that stopped it."""
    stub = _stub(address)
    resumed = _call(stub.RerunPipelineRun, pb.RerunPipelineRunRequest(name=_full_name(run)))
    if detach:
        _show(resumed, as_json)
        return
    _finish(follow(stub, resumed.name, quiet=as_json), as_json)


@pipelines_app.command("cancel")
def cancel(run: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Stop a run after its current stage."""
    _show(
        _call(_stub(address).CancelPipelineRun, pb.CancelPipelineRunRequest(name=_full_name(run))),
        as_json,
    )


# ---------------------------------------------------------------- demo

DEMO_PIPELINES = (
    Path("examples/pipelines/digits.yaml"),
    Path("examples/pipelines/breast_cancer.yaml"),
)


def write_demo_data(data_root: Path) -> None:
    """The CSV files the example pipelines read, from scikit-learn's bundled datasets."""
    from aimass.data.examples import write_breast_cancer_csv, write_digits_csv

    data_root.mkdir(parents=True, exist_ok=True)
    write_digits_csv(data_root)
    write_breast_cancer_csv(data_root)


def run_demo_pipelines(address: str, files: list[Path]) -> bool:
    """Runs each pipeline file on the stack at ``address`` and prints its summary; True if
    every run succeeded."""
    stub = _stub(address)
    succeeded = True
    for path in files:
        try:
            spec = specs.load_yaml(path)
        except AimassError as err:
            _fail(f"{path}: {err.message}", EXIT_USAGE)
        console.rule(f"pipeline {path}")
        run = _call(
            stub.CreatePipelineRun,
            pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=spec)),
        )
        console.print(f"started {run.name}")
        run = follow(stub, run.name)
        console.print(summary_view(run))
        succeeded = succeeded and run.state == pb.RUN_STATE_SUCCEEDED
    return succeeded
