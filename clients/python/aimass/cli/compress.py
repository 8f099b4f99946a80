"""``aimass compress``: compression jobs and their before/after table from a terminal.

    aimass compress run models/digits/versions/3 --step prune-structured:0.5 --step fine-tune \
        --step int8-static [--candidates] [--max-drop 0.01] [--evaluate]
    aimass compress run models/digits/versions/3 --recipe recipe.yaml
    aimass compress show compressionJobs/abc
    aimass compress list [--filter 'state = "SUCCEEDED"']

``run`` follows the job to its end, then prints one row per step (and the
baseline): status, file size, parameters, peak memory, p50/p99 latency at batch 1,
throughput at batch 64 with its ratio to the parent, the metric before and after.
Steps: int8-dynamic, int8-static, fp16, graph-optimize, prune-structured:S,
prune-unstructured:S, low-rank:R, fine-tune, distill:F (F = width factor).
Exit codes: 0 done, 1 refused or failed, 2 bad usage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from aimass.cli.train import worker_app
from aimass.compression.v1 import compression_pb2 as pb
from aimass.compression.v1 import compression_pb2_grpc
from aimass.core.settings import SettingsError, load_settings

EXIT_FAILED = 1
EXIT_USAGE = 2

compress_app = typer.Typer(
    help="Compress model versions: INT8, FP16, pruning, low rank, distillation.",
    no_args_is_help=True,
)
console = Console()

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the compression service (default: the stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _stub(address: str | None) -> compression_pb2_grpc.CompressionServiceStub:
    if address is None:
        try:
            address = load_settings().service_address("compression")
        except SettingsError as err:
            _fail(str(err), EXIT_USAGE)
    return compression_pb2_grpc.CompressionServiceStub(grpc.insecure_channel(address))


def _call(function: Any, request: Message) -> Any:
    try:
        return function(request)
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]


def parse_step(text: str) -> pb.CompressionStep:
    """``prune-structured:0.5`` -> a CompressionStep; exits with usage error when unknown."""
    name, _, value = text.partition(":")
    number = float(value) if value else 0.0
    steps: dict[str, Any] = {
        "int8-dynamic": lambda: pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic()),
        "int8-static": lambda: pb.CompressionStep(quantize_static=pb.QuantizeStatic()),
        "fp16": lambda: pb.CompressionStep(fp16=pb.Fp16()),
        "graph-optimize": lambda: pb.CompressionStep(graph_optimize=pb.GraphOptimize()),
        "prune-structured": lambda: pb.CompressionStep(
            prune_structured=pb.PruneStructured(sparsity=number or 0.5)),
        "prune-unstructured": lambda: pb.CompressionStep(
            prune_unstructured=pb.PruneUnstructured(sparsity=number or 0.5)),
        "low-rank": lambda: pb.CompressionStep(low_rank=pb.LowRank(rank_ratio=number or 0.5)),
        "fine-tune": lambda: pb.CompressionStep(fine_tune=pb.FineTune(epochs=int(number))),
        "distill": lambda: pb.CompressionStep(distill=pb.Distill(scale_factor=number or 0.5)),
    }  # fmt: skip
    if name not in steps:
        _fail(f"--step: unknown step {name!r}; use one of {', '.join(steps)}", EXIT_USAGE)
    return steps[name]()


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def report_table(job: pb.CompressionJob) -> Table:
    """Baseline and one row per step, with ratios against the baseline."""
    table = Table(
        title=f"{job.name}: {job.parent_version} -> {job.model_version or 'nothing registered'}"
    )
    for column in ("step", "status", "file", "x size", "params", "peak mem", "p50 ms", "p99 ms",
                   "rows/s @64", "x speed", "metric before", "after", "reason"):  # fmt: skip
        table.add_column(column)
    base = job.baseline
    for report in [base, *job.step_reports]:
        status = pb.StepStatus.Name(report.status).removeprefix("STEP_STATUS_").lower()
        measured = report.file_size_bytes > 0
        params = report.params.fields.get("parameters")
        before = report.metrics_before[0] if report.metrics_before else None
        after = report.metrics_after[0] if report.metrics_after else None
        mark = " *" if report.step_name == job.chosen_step else ""
        table.add_row(
            report.step_name + mark,
            "baseline" if report is base else status,
            _size(report.file_size_bytes) if measured else "",
            f"{report.file_size_bytes / base.file_size_bytes:.2f}"
            if measured and base.file_size_bytes else "",
            f"{int(params.number_value):,}" if params is not None else "",
            _size(report.peak_memory_bytes) if measured else "",
            f"{report.latency_p50_ms:.3f}" if measured else "",
            f"{report.latency_p99_ms:.3f}" if measured else "",
            f"{report.throughput_rows_per_second:,.0f}" if measured else "",
            f"{report.throughput_rows_per_second / base.throughput_rows_per_second:.2f}"
            if measured and base.throughput_rows_per_second else "",
            f"{before.name} {before.value:.4f}" if before else "",
            f"{after.value:.4f}" if after else "",
            report.reason,
        )  # fmt: skip
    return table


def _print(job: pb.CompressionJob, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True), indent=2)
        )
        return
    console.print(report_table(job))
    if job.triton_check:
        console.print(f"triton check: {job.triton_check}", highlight=False)
    ba = job.before_after
    if ba.metric:
        console.print(
            f"{ba.metric}: {ba.before:.4f} -> {ba.after:.4f} ({(ba.after - ba.before) * 100:+.2f}"
            f" pt), from the {ba.source}",
            highlight=False,
        )
    state = job.status.state
    if job.status.reason:
        console.print(f"{'reason' if state != 3 else 'note'}: {job.status.reason}", highlight=False)


@compress_app.command("run")
def run_command(
    parent: Annotated[str, typer.Argument(help="models/{m}/versions/{v} to compress.")],
    step: Annotated[
        list[str] | None, typer.Option("--step", help="A step (repeat, in order).")
    ] = None,
    recipe_file: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe as YAML or JSON.")
    ] = None,
    candidates: Annotated[
        bool, typer.Option(help="Steps start from the parent; keep the best.")
    ] = False,
    max_drop: Annotated[
        float | None, typer.Option(help="Accuracy budget (0.01 = one point).")
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Evaluate the new version.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a compression job, follow it, print the before/after table."""
    recipe = pb.Recipe()
    if recipe_file is not None:
        try:
            json_format.ParseDict(yaml.safe_load(recipe_file.read_text()), recipe)
        except (OSError, yaml.YAMLError, json_format.ParseError) as err:
            _fail(f"--recipe: {err}", EXIT_USAGE)
    for text in step or []:
        recipe.steps.append(parse_step(text))
    if not recipe.steps:
        _fail("give --step (repeatable) or --recipe", EXIT_USAGE)
    if candidates:
        recipe.mode = pb.RECIPE_MODE_CANDIDATES
    if max_drop is not None:
        recipe.accuracy_budget.max_drop = max_drop
    stub = _stub(address)
    new_job = pb.CompressionJob(parent_version=parent, recipe=recipe, evaluate=evaluate)
    job = _call(stub.CreateCompressionJob, pb.CreateCompressionJobRequest(compression_job=new_job))
    try:
        for event in stub.WatchCompressionJob(pb.WatchCompressionJobRequest(name=job.name)):
            if event.log_line and not as_json:
                console.print(event.log_line, highlight=False)
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    job = _call(stub.GetCompressionJob, pb.GetCompressionJobRequest(name=job.name))
    _print(job, as_json)
    if job.status.state != 3:  # JOB_STATE_SUCCEEDED
        raise typer.Exit(EXIT_FAILED)


@compress_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="compressionJobs/{job}")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a job's before/after table."""
    _print(_call(_stub(address).GetCompressionJob, pb.GetCompressionJobRequest(name=name)), as_json)


@compress_app.command("list")
def list_command(
    filter_text: Annotated[str, typer.Option("--filter", help='e.g. state = "SUCCEEDED"')] = "",
    address: AddressOption = None,
) -> None:
    """List compression jobs, newest first."""
    response = _call(_stub(address).ListCompressionJobs,
                     pb.ListCompressionJobsRequest(filter=filter_text))  # fmt: skip
    table = Table()
    for column in ("job", "state", "parent", "chosen", "new version"):
        table.add_column(column)
    for job in response.compression_jobs:
        state = job.status.state
        table.add_row(job.name, str(state), job.parent_version, job.chosen_step, job.model_version)
    console.print(table)


@worker_app.command(
    "compression", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def compression_worker(ctx: typer.Context) -> None:
    """Pull compression jobs until SIGTERM, beside the service (option: --ack-wait)."""
    from aimass.compression.worker import main

    main(list(ctx.args))
