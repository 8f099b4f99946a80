"""``aimass eval``: evaluations, comparisons and benchmarks from a terminal.

    aimass eval run models/digits/versions/3 [--dataset datasets/digits/versions/1]
        [--split test] [--metric accuracy --metric f1_macro] [--bootstrap 1000] [--log]
    aimass eval show evaluations/abc
    aimass eval report evaluations/abc [--file report.html] [--out report.html]
    aimass eval compare models/d/versions/2 models/d/versions/3 --dataset datasets/d/versions/1
    aimass eval bench models/d/versions/3 [--batch-size 1 --batch-size 64] [--log]

``run`` follows the job to its end, then prints the metrics table and where the report
went (downloaded to ``./<evaluation id>/report.md`` unless ``--no-download``). Every
command takes ``--json`` and ``--address`` (default: the configured stack's evaluation
service). Exit codes: 0 done, 1 refused or failed (the message says why), 2 bad usage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.table import Table

from aimass.cli.common import EXIT_USAGE, channel, console
from aimass.cli.common import call as _call
from aimass.cli.common import fail as _fail
from aimass.common.v1 import common_pb2
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.evaluation.v1 import evaluation_pb2_grpc

SPLITS = {"train": common_pb2.DATASET_SPLIT_TRAIN, "valid": common_pb2.DATASET_SPLIT_VALID,
          "test": common_pb2.DATASET_SPLIT_TEST}  # fmt: skip

DATASET_HELP = "datasets/{d}/versions/{v}; default: the one the version was trained on."

eval_app = typer.Typer(
    help="Evaluate model versions: metrics, reports, comparisons, benchmarks.",
    no_args_is_help=True,
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the evaluation service (default: the stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stub(address: str | None) -> evaluation_pb2_grpc.EvaluationServiceStub:
    return evaluation_pb2_grpc.EvaluationServiceStub(channel("evaluation", address))


def _split(value: str) -> int:
    if value not in SPLITS:
        _fail(f"--split: must be one of {', '.join(SPLITS)}, got {value!r}", EXIT_USAGE)
    return SPLITS[value]


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def metrics_table(evaluation: pb.Evaluation) -> Table:
    """The metrics of an evaluation, with their intervals when bootstrapped."""
    level = round(evaluation.confidence_level * 100)
    table = Table(title=f"{evaluation.name} ({evaluation.row_count} rows)")
    for column in ("metric", "value", f"{level}% interval"):
        table.add_column(column)
    for metric in evaluation.metrics:
        interval = (
            "" if math.isnan(metric.lower) else f"[{_fmt(metric.lower)}, {_fmt(metric.upper)}]"
        )
        if metric.lower == metric.upper == 0 and evaluation.bootstrap_samples == 0:
            interval = ""
        table.add_row(metric.name, _fmt(metric.value), interval)
    return table


def _download(stub: Any, name: str, file_name: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    request = pb.GetEvaluationReportRequest(name=name, file_name=file_name)
    try:
        with out.open("wb") as handle:
            for chunk in stub.GetEvaluationReport(request):
                handle.write(chunk.data)
    except grpc.RpcError as err:
        out.unlink(missing_ok=True)
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    return out


def _follow(stub: Any, name: str, watch: Any, request: Message) -> None:
    try:
        with console.status(f"{name} queued") as status:
            for event in watch(request):
                state = common_pb2.JobState.Name(event.status.state).removeprefix("JOB_STATE_")
                progress = event.status.progress
                done = (
                    f" {progress.completed}/{progress.total} {progress.unit}"
                    if progress.total
                    else ""
                )
                status.update(f"{name} {state.lower()}{done}")
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]


@eval_app.command("run")
def run(
    model_version: Annotated[str, typer.Argument(help="models/{model}/versions/{version}")],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset", help="datasets/{d}/versions/{v}; default: the one it was trained on."
        ),
    ] = "",
    split: Annotated[str, typer.Option("--split", help="train, valid or test.")] = "test",
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="Metric name; repeat.")
    ] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples.")] = 1000,
    k: Annotated[int, typer.Option("--k", help="Cut-off of ranking metrics.")] = 0,
    log: Annotated[bool, typer.Option("--log", help="Write the metrics to the registry.")] = False,
    download: Annotated[bool, typer.Option(help="Download the reports here.")] = True,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluates a version, waits for it, prints the metrics and the report's path."""
    stub = _stub(address)
    evaluation = pb.Evaluation(
        model_version=model_version, dataset_version=dataset, split=_split(split),
        metric_names=metric or [], bootstrap_samples=bootstrap, k=k, log_to_registry=log,
    )  # fmt: skip
    created = _call(stub.CreateEvaluation, pb.CreateEvaluationRequest(evaluation=evaluation))
    _follow(stub, created.name, stub.WatchEvaluation, pb.WatchEvaluationRequest(name=created.name))
    done = _call(stub.GetEvaluation, pb.GetEvaluationRequest(name=created.name))
    if done.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        _fail(f"{done.name} {common_pb2.JobState.Name(done.status.state)}: {done.status.reason}")
    report_path = f"{done.name}:report.md"
    if download:
        folder = Path(done.name.split("/", 1)[1])
        for artifact in done.report_artifacts:
            _download(stub, done.name, artifact.file_name, folder / artifact.file_name)
        report_path = str(folder / "report.md")
    if as_json:
        value = json_format.MessageToDict(done, preserving_proto_field_name=True)
        typer.echo(json.dumps({**value, "report_path": report_path}, indent=2, sort_keys=True))
        return
    console.print(metrics_table(done))
    console.print(f"report: {report_path}", highlight=False)


@eval_app.command("show")
def show(name: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Prints an evaluation's state and metrics."""
    done = _call(_stub(address).GetEvaluation, pb.GetEvaluationRequest(name=name))
    if as_json:
        typer.echo(json.dumps(json_format.MessageToDict(done, preserving_proto_field_name=True),
                              indent=2, sort_keys=True))  # fmt: skip
        return
    state = common_pb2.JobState.Name(done.status.state).removeprefix("JOB_STATE_")
    console.print(f"{done.name}: {state.lower()} {done.status.reason}", highlight=False)
    if done.metrics:
        console.print(metrics_table(done))


@eval_app.command("report")
def report(
    name: str,
    file: Annotated[
        str, typer.Option("--file", help="report.md, report.html, roc.png...")
    ] = "report.md",
    out: Annotated[Path | None, typer.Option("--out", help="Where to write it.")] = None,
    address: AddressOption = None,
) -> None:
    """Downloads one report file of a finished evaluation."""
    path = _download(_stub(address), name, file, out or Path(file))
    console.print(f"report: {path}", highlight=False)


@eval_app.command("compare")
def compare(
    version_a: str,
    version_b: str,
    dataset: Annotated[str, typer.Option("--dataset", help="datasets/{d}/versions/{v}")],
    split: Annotated[str, typer.Option("--split")] = "test",
    metric: Annotated[list[str] | None, typer.Option("--metric")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compares two versions on the same rows: B - A per metric with interval and p-value."""
    request = pb.CompareVersionsRequest(
        version_a=version_a, version_b=version_b, dataset_version=dataset, split=_split(split),
        metric_names=metric or [], bootstrap_samples=bootstrap, seed=seed,
    )  # fmt: skip
    response = _call(_stub(address).CompareVersions, request)
    if as_json:
        typer.echo(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True),
                              indent=2, sort_keys=True))  # fmt: skip
        return
    level = round(response.confidence_level * 100)
    table = Table(title=f"B - A on {response.row_count} rows")
    for column in ("metric", "A", "B", "B - A", f"{level}% interval", "p-value", "test"):
        table.add_column(column)
    for c in response.comparisons:
        table.add_row(
            c.metric,
            _fmt(c.value_a),
            _fmt(c.value_b),
            _fmt(c.difference),
            f"[{_fmt(c.lower)}, {_fmt(c.upper)}]",
            f"{c.p_value:.4g}",
            c.test,
        )
    console.print(table)


@eval_app.command("bench")
def bench(
    model_version: str,
    batch_size: Annotated[list[int] | None, typer.Option("--batch-size")] = None,
    cuda: Annotated[bool, typer.Option("--cuda", help="ONNX Runtime's CUDA provider.")] = False,
    iterations: Annotated[int, typer.Option("--iterations")] = 0,
    log: Annotated[bool, typer.Option("--log", help="Write the figures to the registry.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Benchmarks a version's ONNX file at batch sizes and prints latency and throughput."""
    stub = _stub(address)
    benchmark = pb.Benchmark(
        model_version=model_version, batch_sizes=batch_size or [1, 8, 64], iterations=iterations,
        provider=pb.PROVIDER_CUDA if cuda else pb.PROVIDER_CPU, log_to_registry=log,
    )  # fmt: skip
    created = _call(stub.CreateBenchmark, pb.CreateBenchmarkRequest(benchmark=benchmark))
    _follow(stub, created.name, stub.WatchBenchmark, pb.WatchBenchmarkRequest(name=created.name))
    done = _call(stub.GetBenchmark, pb.GetBenchmarkRequest(name=created.name))
    if done.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        _fail(f"{done.name} {common_pb2.JobState.Name(done.status.state)}: {done.status.reason}")
    if as_json:
        typer.echo(json.dumps(json_format.MessageToDict(done, preserving_proto_field_name=True),
                              indent=2, sort_keys=True))  # fmt: skip
        return
    table = Table(title=f"{done.name} on {done.device}, peak {done.peak_memory_bytes >> 20} MiB")
    for column in ("batch", "p50 ms", "p90 ms", "p99 ms", "rows/s"):
        table.add_column(column)
    for r in done.results:
        table.add_row(
            str(r.batch_size),
            f"{r.latency_p50_ms:.3f}",
            f"{r.latency_p90_ms:.3f}",
            f"{r.latency_p99_ms:.3f}",
            f"{r.throughput_rows_per_second:,.0f}",
        )
    console.print(table)
