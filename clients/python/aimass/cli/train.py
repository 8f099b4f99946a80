"""``aimass train CONFIG``, ``aimass jobs list/show/cancel/logs``, ``aimass worker training``.

A config is a YAML TrainingJob with short enum names:

    dataset_version: datasets/digits/versions/1
    target_model: models/digits-mlp
    model: {mlp: {hidden_sizes: [512, 256]}}
    training: {optimizer: {type: adam, learning_rate: 0.001}, epochs: 30, batch_size: 64}

``aimass train`` submits it and follows the job with a progress bar and the latest
metrics until it ends (``--detach`` returns at once); exit 0 when it SUCCEEDED, 1 otherwise.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aimass.common.v1 import common_pb2
from aimass.core.errors import InvalidArgument
from aimass.core.protodict import message_from_dict
from aimass.core.settings import SettingsError, load_settings
from aimass.training.v1 import training_pb2 as pb
from aimass.training.v1 import training_pb2_grpc

EXIT_FAILED = 1
EXIT_USAGE = 2
TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}

console = Console()
jobs_app = typer.Typer(help="Training jobs: list, show, cancel, logs.", no_args_is_help=True)
worker_app = typer.Typer(help="Workers that pull jobs from the queue.", no_args_is_help=True)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the training service (default: the stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _stub(address: str | None) -> training_pb2_grpc.TrainingServiceStub:
    if address is None:
        try:
            address = load_settings().service_address("training")
        except SettingsError as err:
            _fail(str(err), EXIT_USAGE)
    return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(address))


def _call(function: Any, request: Message) -> Any:
    try:
        return function(request)
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]


def _job_name(job: str) -> str:
    return job if job.startswith("trainingJobs/") else f"trainingJobs/{job}"


def load_job(path: Path) -> pb.TrainingJob:
    """The TrainingJob of a YAML config; InvalidArgument names the bad key."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InvalidArgument(str(path), f"cannot read the config: {err}") from err
    return message_from_dict(data or {}, pb.TrainingJob())


def _state(status: common_pb2.JobStatus) -> str:
    return common_pb2.JobState.Name(status.state).removeprefix("JOB_STATE_")


def _metrics_text(metrics: dict[str, float]) -> str:
    shown = ("loss", "valid_loss", "valid_accuracy", "learning_rate", "samples_per_second")
    parts = [f"{k}={metrics[k]:.4g}" for k in shown if k in metrics]
    return " ".join(parts)


def follow(stub: training_pb2_grpc.TrainingServiceStub, name: str) -> pb.TrainingJob:
    """Shows a progress bar with the latest metrics until the job ends."""
    latest: dict[str, float] = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=None, metrics="queued")
        request = pb.WatchTrainingJobRequest(name=name, include_logs=True)
        for event in stub.WatchTrainingJob(request):
            if event.log_line:
                progress.console.print(f"[dim]{event.log_line}[/dim]", highlight=False)
            if event.metrics:
                latest.update(event.metrics)
            total = event.status.progress.total or None
            progress.update(
                task,
                total=total,
                completed=event.status.progress.completed or event.step or 0,
                metrics=_metrics_text(latest) or _state(event.status).lower(),
            )
            if event.status.state in TERMINAL:
                break
    return _call(stub.GetTrainingJob, pb.GetTrainingJobRequest(name=name))


def train(
    config: Annotated[Path, typer.Argument(help="YAML config of the job.", exists=True)],
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return at once.")] = False,
    address: AddressOption = None,
) -> None:
    """Submit a training job and follow it."""
    try:
        job = load_job(config)
    except InvalidArgument as err:
        _fail(err.message, EXIT_USAGE)
    stub = _stub(address)
    request = pb.CreateTrainingJobRequest(training_job=job, request_id=uuid.uuid4().hex)
    created = _call(stub.CreateTrainingJob, request)
    console.print(f"queued [bold]{created.name}[/bold]")
    if detach:
        return
    done = follow(stub, created.name)
    _print_outcome(done)
    if done.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(EXIT_FAILED)


def _print_outcome(job: pb.TrainingJob) -> None:
    state = _state(job.status)
    colour = "green" if state == "SUCCEEDED" else "red"
    console.print(f"[{colour}]{job.name} {state}[/{colour}] {job.status.reason}", highlight=False)
    for metric in job.final_metrics:
        console.print(f"  {metric.name} = {metric.value:.6g}", highlight=False)
    if job.model_version:
        console.print(f"  registered {job.model_version}")


@jobs_app.command("list")
def list_jobs(
    filter_text: Annotated[str, typer.Option("--filter", help="e.g. 'state = RUNNING'")] = "",
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List training jobs, newest first."""
    stub = _stub(address)
    response = _call(
        stub.ListTrainingJobs, pb.ListTrainingJobsRequest(filter=filter_text, page_size=limit)
    )
    if as_json:
        rows = [json_format.MessageToDict(j) for j in response.training_jobs]
        console.print_json(json.dumps(rows))
        return
    table = Table("job", "state", "dataset", "attempt", "progress", "version")
    for job in response.training_jobs:
        progress = job.status.progress
        table.add_row(
            job.name,
            _state(job.status),
            job.dataset_version,
            str(job.status.attempt),
            f"{progress.completed}/{progress.total} {progress.unit}",
            job.model_version,
        )
    console.print(table)


@jobs_app.command("show")
def show(job: str, address: AddressOption = None) -> None:
    """Show a job as JSON."""
    found = _call(_stub(address).GetTrainingJob, pb.GetTrainingJobRequest(name=_job_name(job)))
    console.print_json(json.dumps(json_format.MessageToDict(found)))


@jobs_app.command("cancel")
def cancel(job: str, address: AddressOption = None) -> None:
    """Cancel a queued or running job."""
    stub = _stub(address)
    done = _call(stub.CancelTrainingJob, pb.CancelTrainingJobRequest(name=_job_name(job)))
    console.print(f"{done.name} {_state(done.status)}")


@jobs_app.command("logs")
def logs(job: str, address: AddressOption = None) -> None:
    """Print the log lines of a job, oldest first."""
    stub = _stub(address)
    token = ""
    while True:
        response = _call(
            stub.ListTrainingJobLogs,
            pb.ListTrainingJobLogsRequest(parent=_job_name(job), page_token=token),
        )
        for entry in response.log_entries:
            console.print(f"[{entry.attempt}/{entry.rank}] {entry.message}", highlight=False)
        if not response.next_page_token or not response.log_entries:
            return
        token = response.next_page_token


@worker_app.command(
    "training", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def training_worker(ctx: typer.Context) -> None:
    """Pull training jobs until SIGTERM (options: --name, --threads, --ack-wait, --max-jobs,
    and what the worker offers: --resource-class, --cpus, --gpus, --gpu-type, --memory-gib,
    --processes, --label KEY=VALUE)."""
    from aimass.training.worker import main

    main(list(ctx.args))
