"""``aimass monitor``: drift and health monitors of deployments, and the alerts they fire.

    aimass monitor create ID --deployment D [--interval 5m] [--window 1h] [--bins 10]
        [--rule input-drift:feature_psi:0.25[:500]] [--paused]
    aimass monitor list [--deployment D]
    aimass monitor show ID          the monitor, its last report and firing rules
    aimass monitor run ID           run it now and print the report
    aimass monitor pause ID | resume ID | delete ID
    aimass monitor alerts [ID]      alerts fired, newest first (every monitor's without ID)

A rule is ``NAME:METRIC:THRESHOLD`` with an optional ``:MIN_ROWS`` (it fires when the value
is above the threshold); METRIC is one of
feature_psi, feature_ks, prediction_psi, error_rate, latency_p99_ms, latency_p50_ms.
Durations are seconds or a number with s, m, h or d. Every command takes ``--json`` and
``--address`` (default: the configured stack's evaluation service). Exit codes: 0 done,
1 refused or failed, 2 bad usage (a bad rule, duration or field).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import duration_pb2, field_mask_pb2, json_format
from google.protobuf.message import Message
from rich.table import Table

from aimass.cli.common import EXIT_FAILED, EXIT_USAGE, channel, console
from aimass.cli.common import fail as _fail
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.evaluation.v1 import evaluation_pb2_grpc

monitor_app = typer.Typer(
    help="Drift and health monitors of deployments, and their alerts.", no_args_is_help=True
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the evaluation service (default: the stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

RULE = re.compile(r"^(?P<name>[^:]+):(?P<metric>[a-z0-9_]+):(?P<threshold>[^:]+)(:(?P<rows>\d+))?$")
DURATION = re.compile(r"^(?P<value>\d+(\.\d+)?)(?P<unit>[smhd]?)$")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# How many features the show/run view lists, worst PSI first.
TOP_FEATURES = 10


def _stub(address: str | None) -> evaluation_pb2_grpc.EvaluationServiceStub:
    return evaluation_pb2_grpc.EvaluationServiceStub(channel("evaluation", address))


def _call(function: Any, request: Message) -> Any:
    """``function(request)``; a gRPC error ends the command (2 for INVALID_ARGUMENT)."""
    try:
        return function(request)
    except grpc.RpcError as err:
        code = EXIT_USAGE if err.code() == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED  # type: ignore[attr-defined]
        _fail(f"{err.code().name}: {err.details()}", code)  # type: ignore[attr-defined]


def _name(monitor: str) -> str:
    return monitor if monitor.startswith("monitors/") else f"monitors/{monitor}"


def _deployment(deployment: str) -> str:
    return deployment if deployment.startswith("deployments/") else f"deployments/{deployment}"


def _metric_label(metric: int) -> str:
    return pb.MonitorMetric.Name(metric).removeprefix("MONITOR_METRIC_").lower()


def parse_rule(text: str) -> pb.AlertRule:
    """``NAME:METRIC:THRESHOLD[:MIN_ROWS]`` as an AlertRule; exit 2 naming --rule otherwise."""
    found = RULE.match(text.strip())
    metrics = [_metric_label(v) for v in pb.MonitorMetric.values() if v]
    if found is None:
        _fail(f"--rule: expected NAME:METRIC:THRESHOLD[:MIN_ROWS], got {text!r}", EXIT_USAGE)
    metric = f"MONITOR_METRIC_{found['metric'].upper()}"
    if found["metric"] not in metrics:
        _fail(f"--rule {text!r}: metric must be one of {', '.join(metrics)}", EXIT_USAGE)
    try:
        threshold = float(found["threshold"])
    except ValueError:
        _fail(f"--rule {text!r}: threshold {found['threshold']!r} is not a number", EXIT_USAGE)
    return pb.AlertRule(
        name=found["name"], metric=pb.MonitorMetric.Value(metric), threshold=threshold,
        min_rows=int(found["rows"] or 0),
    )  # fmt: skip


def parse_duration(text: str, option: str) -> duration_pb2.Duration:
    found = DURATION.match(text.strip())
    if found is None:
        _fail(f"{option}: expected seconds or a number with s, m, h or d, got {text!r}", EXIT_USAGE)
    seconds = float(found["value"]) * UNIT_SECONDS[found["unit"]]
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _print_json(message: Message | list[Message], key: str = "") -> None:
    if isinstance(message, list):
        data: Any = {key: [json_format.MessageToDict(m, preserving_proto_field_name=True)
                           for m in message]}  # fmt: skip
    else:
        data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    typer.echo(json.dumps(data, indent=2))


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def report_view(report: pb.MonitorReport) -> list[Table]:
    """The report's window, its rules and its most drifted features."""
    facts = Table(title="report", show_header=False, title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("run", report.run_time.ToJsonString() if report.HasField("run_time") else ""),
        ("rows / calls", f"{report.rows} / {report.calls} ({report.failed_calls} failed)"),
        ("latency p50 / p99", f"{_fmt(report.latency_p50_ms)} / {_fmt(report.latency_p99_ms)} ms"),
        ("model", report.model_version),
        ("reference", f"{report.reference_dataset_version} ({report.reference_rows} rows)"),
        ("prediction psi", _fmt(report.prediction_psi)),
    ]
    for key, value in rows:
        facts.add_row(key, value)
    rules = Table(title="rules", title_justify="left")
    for column in ("rule", "metric", "value", "threshold", "firing", "detail"):
        rules.add_column(column)
    for rule in report.rules:
        rules.add_row(
            rule.rule, _metric_label(rule.metric), _fmt(rule.value), _fmt(rule.threshold),
            "[red]yes[/]" if rule.firing else "no", rule.detail,
        )  # fmt: skip
    features = Table(title=f"features (worst {TOP_FEATURES} by PSI)", title_justify="left")
    for column in ("feature", "psi", "ks", "ks p-value"):
        features.add_column(column)
    for drift in sorted(report.features, key=lambda f: -f.psi)[:TOP_FEATURES]:
        features.add_row(drift.feature, _fmt(drift.psi), _fmt(drift.ks), _fmt(drift.ks_p_value))
    return [facts, rules, features]


def _show(monitor: pb.Monitor, as_json: bool) -> None:
    if as_json:
        _print_json(monitor)
        return
    facts = Table(title=monitor.name, show_header=False, title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("deployment", monitor.deployment)
    facts.add_row("paused", "yes" if monitor.paused else "no")
    facts.add_row("interval / window", f"{monitor.interval.seconds}s / {monitor.window.seconds}s")
    facts.add_row("rules", ", ".join(_rule_text(r) for r in monitor.rules))
    facts.add_row("firing", ", ".join(monitor.firing_rules) or "none")
    if monitor.HasField("next_run_time"):
        facts.add_row("next run", monitor.next_run_time.ToJsonString())
    console.print(facts)
    if monitor.HasField("last_report"):
        for table in report_view(monitor.last_report):
            console.print(table)


def _rule_text(rule: pb.AlertRule) -> str:
    text = f"{rule.name}:{_metric_label(rule.metric)}:{rule.threshold:g}"
    return text + (f":{rule.min_rows}" if rule.min_rows else "")


@monitor_app.command("create")
def create(
    monitor_id: Annotated[str, typer.Argument(help="The monitor's id.")],
    deployment: Annotated[str, typer.Option("--deployment", help="The deployment watched.")],
    rules: Annotated[
        list[str] | None,
        typer.Option("--rule", help="NAME:METRIC:THRESHOLD[:MIN_ROWS]; repeatable."),
    ] = None,
    interval: Annotated[str, typer.Option(help="Time between runs (default 5m).")] = "",
    window: Annotated[str, typer.Option(help="How far back calls are compared (1h).")] = "",
    bins: Annotated[int, typer.Option(help="PSI histogram bins (default 10).")] = 0,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused.")] = False,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a monitor of a deployment's captured predictions."""
    monitor = pb.Monitor(
        deployment=_deployment(deployment), description=description, bins=bins, paused=paused,
        rules=[parse_rule(rule) for rule in rules or []],
    )  # fmt: skip
    if interval:
        monitor.interval.CopyFrom(parse_duration(interval, "--interval"))
    if window:
        monitor.window.CopyFrom(parse_duration(window, "--window"))
    request = pb.CreateMonitorRequest(monitor=monitor, monitor_id=monitor_id)
    _show(_call(_stub(address).CreateMonitor, request), as_json)


@monitor_app.command("list")
def list_monitors(
    deployment: Annotated[str, typer.Option(help="Only this deployment's monitors.")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List monitors."""
    stub = _stub(address)
    wanted = f'deployment = "{_deployment(deployment)}"' if deployment else ""
    found: list[pb.Monitor] = []
    token = ""
    while True:
        page = _call(stub.ListMonitors, pb.ListMonitorsRequest(filter=wanted, page_token=token))
        found.extend(page.monitors)
        token = page.next_page_token
        if not token:
            break
    if as_json:
        _print_json(found, "monitors")
        return
    table = Table()
    for column in ("monitor", "deployment", "paused", "rules", "firing", "last rows"):
        table.add_column(column)
    for monitor in found:
        table.add_row(
            monitor.name, monitor.deployment, "yes" if monitor.paused else "no",
            str(len(monitor.rules)), ", ".join(monitor.firing_rules),
            str(monitor.last_report.rows) if monitor.HasField("last_report") else "",
        )  # fmt: skip
    console.print(table)


@monitor_app.command("show")
def show(monitor: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show a monitor, its last report and the rules firing."""
    _show(_call(_stub(address).GetMonitor, pb.GetMonitorRequest(name=_name(monitor))), as_json)


@monitor_app.command("run")
def run(monitor: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Run a monitor now and print its report (rules crossing their threshold fire alerts)."""
    report = _call(_stub(address).RunMonitor, pb.RunMonitorRequest(name=_name(monitor)))
    if as_json:
        _print_json(report)
        return
    for table in report_view(report):
        console.print(table)


def _set_paused(monitor: str, paused: bool, address: str | None, as_json: bool) -> None:
    request = pb.UpdateMonitorRequest(
        monitor=pb.Monitor(name=_name(monitor), paused=paused),
        update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
    )
    _show(_call(_stub(address).UpdateMonitor, request), as_json)


@monitor_app.command("pause")
def pause(monitor: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Stop the schedule running a monitor (``run`` still runs it)."""
    _set_paused(monitor, True, address, as_json)


@monitor_app.command("resume")
def resume(monitor: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Let the schedule run a paused monitor again."""
    _set_paused(monitor, False, address, as_json)


@monitor_app.command("delete")
def delete(monitor: str, address: AddressOption = None) -> None:
    """Delete a monitor and its alerts."""
    name = _name(monitor)
    _call(_stub(address).DeleteMonitor, pb.DeleteMonitorRequest(name=name))
    console.print(f"deleted {name}")


@monitor_app.command("alerts")
def alerts(
    monitor: Annotated[str, typer.Argument(help="The monitor; every monitor's without.")] = "-",
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 50,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the alerts monitors fired, newest first."""
    request = pb.ListAlertsRequest(parent=_name(monitor), page_size=limit)
    found = list(_call(_stub(address).ListAlerts, request).alerts)
    if as_json:
        _print_json(found, "alerts")
        return
    table = Table()
    for column in ("alert", "rule", "metric", "value", "threshold", "feature", "fired"):
        table.add_column(column)
    for alert in found:
        table.add_row(
            alert.name, alert.rule, _metric_label(alert.metric), _fmt(alert.value),
            _fmt(alert.threshold), alert.feature, alert.fire_time.ToJsonString(),
        )  # fmt: skip
    console.print(table)
