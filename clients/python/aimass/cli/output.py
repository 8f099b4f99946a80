"""Rich rendering of the CLI's results: status tables, RPC answers, errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console, Group
from rich.table import Table

from aimass.embedded.control import ComponentStatus
from aimass.embedded.rpc_check import RpcAnswer
from aimass.embedded.state import StackState

out = Console()
err = Console(stderr=True)

_STATE_STYLE = {"SERVING": "green", "NOT_SERVING": "yellow", "DOWN": "red"}
# Codes that mean a server answered the call: it is up, whatever it thought of the request.
_ANSWERED = {"OK", "UNIMPLEMENTED", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_table(rows: Iterable[ComponentStatus], title: str) -> Group:
    """The components (state, uptime, restarts), then what each service has done (calls,
    server errors, queued and finished jobs): two tables, so each fits 80 columns."""
    rows = list(rows)
    table = Table(title=title, title_justify="left")
    for column in ("component", "pid", "address", "state", "uptime", "restarts"):
        table.add_column(column, justify="right" if column in ("pid", "restarts") else "left")
    for row in rows:
        style = _STATE_STYLE.get(row.state, "")
        table.add_row(
            row.name,
            str(row.pid),
            row.address or "-",
            f"[{style}]{row.state}[/]",
            human_duration(row.uptime_s),
            str(row.restarts),
        )
    served = [row for row in rows if row.metrics is not None]
    if not served:
        return Group(table)
    activity = Table(
        title="served since start (from each service's /metrics)", title_justify="left"
    )
    for column in ("service", "calls", "errors", "queued", "jobs"):
        activity.add_column(column, justify="right" if column in ("calls", "errors") else "left")
    for row in served:
        activity.add_row(row.name, *_essentials(row.metrics))
    return Group(table, activity)


def _essentials(metrics: dict) -> tuple[str, str, str, str]:
    """calls, server errors, queued jobs by kind, finished jobs by outcome ("-" when none)."""
    errors = metrics["server_errors"]
    queued = ", ".join(f"{kind} {n}" for kind, n in sorted(metrics["queued"].items())) or "-"
    jobs = ", ".join(f"{n} {state.lower()}" for state, n in sorted(metrics["jobs"].items()))
    return (
        str(metrics["requests"]),
        f"[red]{errors}[/]" if errors else "0",
        queued,
        jobs or "-",
    )


def started_table(state: StackState) -> Table:
    """The stack as it was when it became ready: every component SERVING by construction."""
    table = Table(title=f"aimass stack in {state.home}", title_justify="left")
    for column in ("component", "pid", "address", "log"):
        table.add_column(column)
    for record in state.components:
        table.add_row(record.name, str(record.pid), record.address, record.log)
    return table


def answered(answer: RpcAnswer) -> bool:
    return answer.code in _ANSWERED


def rpc_table(rows: Sequence[tuple[str, RpcAnswer]]) -> Table:
    table = Table(
        title="one RPC per service",
        title_justify="left",
        caption=(
            "UNIMPLEMENTED is the honest answer for now: each service is up and answers,"
            " and its RPCs arrive with their issue."
        ),
        caption_justify="left",
    )
    for column in ("component", "service", "method", "answer"):
        table.add_column(column)
    for component, answer in rows:
        table.add_row(component, answer.service, answer.method, describe_answer(answer))
    return table


def describe_answer(answer: RpcAnswer) -> str:
    if answer.code == "UNIMPLEMENTED":
        return "[yellow]UNIMPLEMENTED[/] (expected for now)"
    if answered(answer):
        return f"[green]{answer.code}[/] {answer.details}".rstrip()
    return f"[red]{answer.code}[/] {answer.details}".rstrip()
