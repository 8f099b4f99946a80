"""The ``aimass`` command: run the embedded stack and the database schema from a terminal.

Exit codes scripts can trust:

    0   done (status: every component SERVING)
    1   failed (a component did not start, a port is taken, not everything SERVING)
    2   bad usage or settings (the message names the option or AIMASS_* variable)
    3   no stack is running from this home (status)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.logging import RichHandler

from aimass.cli import output
from aimass.cli.evaluate import eval_app
from aimass.cli.models import models_app
from aimass.cli.train import jobs_app, train, worker_app
from aimass.core.errors import AimassError
from aimass.core.settings import Settings, SettingsError, load_settings
from aimass.embedded.components import stack_settings
from aimass.embedded.control import (
    StackStatus,
    StopReport,
    stack_status,
    start_detached,
    stop_stack,
)
from aimass.embedded.errors import NoStackRunning, StackError
from aimass.embedded.layout import SUPERVISOR, StackLayout
from aimass.embedded.probes import SERVING
from aimass.embedded.rpc_check import RpcAnswer, call_one_rpc_per_service
from aimass.embedded.runner import run_supervisor
from aimass.embedded.state import StackState

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_STACK = 3

app = typer.Typer(
    name="aimass",
    help="aimass: data, training, evaluation, compression, registry and serving of ML models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(
    help="The metadata database's schema (alembic migrations).", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.command("train")(train)
app.add_typer(jobs_app, name="jobs")
app.add_typer(worker_app, name="worker")
app.add_typer(eval_app, name="eval")

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Data folder of the stack (default: $AIMASS_HOME, else ./.aimass)."
    ),
]
OffsetOption = Annotated[
    int, typer.Option("--port-offset", help="Shift every configured port by N (two stacks).")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=1.0, help="Seconds to wait for every component.")
]


# ---- settings and errors -------------------------------------------------------------------


def _use_home(home: Path | None) -> None:
    """--home wins over AIMASS_HOME, here and in every process the stack starts."""
    if home is not None:
        os.environ["AIMASS_HOME"] = str(home.expanduser().absolute())


def _settings(home: Path | None, port_offset: int = 0) -> Settings:
    _use_home(home)
    try:
        return stack_settings(None, port_offset)
    except SettingsError as err:
        _fail(str(err), EXIT_USAGE)
    except StackError as err:
        _fail(err.message, err.exit_code)


def _home(home: Path | None) -> Path:
    _use_home(home)
    try:
        return load_settings().home
    except SettingsError as err:
        _fail(str(err), EXIT_USAGE)


def _fail(message: str, code: int) -> NoReturn:
    output.err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ---- up / down / status ---------------------------------------------------------------------


@app.command()
def up(
    home: HomeOption = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; return once SERVING.")
    ] = False,
    port_offset: OffsetOption = 0,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Start nats-server and every service, wait until all are SERVING, keep them up."""
    settings = _settings(home, port_offset)
    if detach:
        state = _start_detached(settings.home, port_offset, timeout)
        output.out.print(output.started_table(state))
        _print_admin_key(settings)
        layout = StackLayout(settings.home)
        output.out.print(
            f"stack running in the background; logs in {layout.logs_dir}"
            f" (supervisor: {layout.log_of(SUPERVISOR)}); `aimass down` stops it."
        )
        return
    _run_foreground(settings, timeout)


def _print_admin_key(settings: Settings) -> None:
    """Creates the stack's admin API key on its first start; says where it is (never the key)."""
    from aimass.core.auth.bootstrap import ensure_admin_key

    path, created = ensure_admin_key(settings.home, settings.database_url)
    note = "created" if created else "kept"
    enforced = (
        "enforced" if settings.auth.enabled else "not enforced until AIMASS_AUTH__ENABLED=true"
    )
    output.out.print(f"admin API key {note} in {path} (mode 0600; access control {enforced})")


def _start_detached(home: Path, port_offset: int, timeout: float) -> StackState:
    with output.err.status("starting the stack") as spinner:
        try:
            return start_detached(
                home,
                port_offset=port_offset,
                startup_timeout_s=timeout,
                progress=lambda message: spinner.update(f"starting the stack: {message}"),
            )
        except StackError as err:
            spinner.stop()
            _fail(err.message, err.exit_code)


def _run_foreground(settings: Settings, timeout: float) -> None:
    handler = RichHandler(console=output.err, show_path=False)
    logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s", force=True)
    spinner = output.err.status("starting the stack")
    spinner.start()

    def ready(state: StackState) -> None:
        spinner.stop()
        output.out.print(output.started_table(state))
        _print_admin_key(settings)
        output.out.print(
            f"every component is SERVING; logs in {StackLayout(settings.home).logs_dir}."
            " Ctrl-C stops the stack."
        )

    try:
        asyncio.run(
            run_supervisor(
                settings,
                startup_timeout_s=timeout,
                progress=lambda message: spinner.update(f"starting the stack: {message}"),
                on_ready=ready,
            )
        )
    except StackError as err:
        spinner.stop()
        _fail(err.message, err.exit_code)
    finally:
        spinner.stop()
    output.out.print("stack stopped; nothing left running.")


@app.command()
def status(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show every component: pid, address, SERVING / NOT_SERVING / DOWN, uptime.

    Exit code 0 when all are SERVING, 1 otherwise, 3 when no stack is running.
    """
    resolved = _home(home)
    try:
        result = stack_status(resolved)
    except NoStackRunning as err:
        if as_json:
            _print_json({"home": str(resolved), "all_serving": False, "components": []})
        _fail(err.message, err.exit_code)
    if as_json:
        _print_json(result.to_dict())
    else:
        output.out.print(output.status_table(result.components, f"aimass stack in {resolved}"))
    if not result.all_serving:
        raise typer.Exit(EXIT_FAILED)


def _print_json(document: dict[str, object]) -> None:
    # Plain stdout, never rich: rich wraps long lines (paths) to the terminal width.
    typer.echo(json.dumps(document, indent=2))


@app.command()
def down(
    home: HomeOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait before SIGKILL.")
    ] = 30.0,
) -> None:
    """Stop every component (services first, NATS last); SIGKILL what will not stop."""
    resolved = _home(home)
    try:
        with output.err.status("stopping the stack"):
            report = stop_stack(resolved, timeout_s=timeout)
    except NoStackRunning as err:
        output.out.print(f"nothing to stop: {err.message}")
        return
    _print_stop_report(report)
    if report.left_running:
        raise typer.Exit(EXIT_FAILED)


def _print_stop_report(report: StopReport) -> None:
    if report.forced:
        output.err.print(f"[yellow]killed after the grace period:[/] {', '.join(report.forced)}")
    if report.left_running:
        output.err.print(f"[bold red]still running:[/] {', '.join(report.left_running)}")
        return
    output.out.print(f"stopped {len(report.stopped)} processes; nothing left running.")


# ---- demo -----------------------------------------------------------------------------------


@app.command()
def demo(
    home: Annotated[Path, typer.Option("--home", help="Demo data folder; cleared first.")] = Path(
        ".aimass-demo"
    ),
    port_offset: OffsetOption = 0,
    timeout: TimeoutOption = 90.0,
    pipelines: Annotated[
        list[Path] | None,
        typer.Option(
            "--pipeline",
            help="Pipeline files to run (default: examples/pipelines/digits.yaml and"
            " breast_cancer.yaml).",
        ),
    ] = None,
    services_only: Annotated[
        bool,
        typer.Option("--services-only", help="Only show every service answering one RPC."),
    ] = False,
) -> None:
    """Start a fresh stack, run the example pipelines end to end, print their summaries, stop."""
    from aimass.cli.pipeline import DEMO_PIPELINES, run_demo_pipelines, write_demo_data

    files = list(pipelines or DEMO_PIPELINES)
    missing = [str(p) for p in files if not p.exists()]
    if missing and not services_only:
        _fail(f"pipeline file not found: {', '.join(missing)} (run from the repository root)",
              EXIT_USAGE)  # fmt: skip
    settings = _settings(home, port_offset)
    _clear_demo_home(settings.home)
    write_demo_data(settings.data_roots[0])
    _start_detached(settings.home, port_offset, timeout)
    healthy = False
    try:
        if services_only:
            healthy = _show_demo(settings.home)
        else:
            result = stack_status(settings.home)
            title = f"aimass stack in {settings.home}"
            output.out.print(output.status_table(result.components, title))
            healthy = result.all_serving and run_demo_pipelines(
                settings.service_address("pipeline"), files
            )
    finally:
        with output.err.status("stopping the stack"):
            report = stop_stack(settings.home)
        _print_stop_report(report)
    if not healthy or report.left_running:
        raise typer.Exit(EXIT_FAILED)


def _clear_demo_home(home: Path) -> None:
    """A previous demo's stack is stopped and its files removed: every demo starts fresh."""
    with contextlib.suppress(NoStackRunning):
        stop_stack(home)
    shutil.rmtree(home, ignore_errors=True)


def _show_demo(home: Path) -> bool:
    """Prints the status and one RPC answer per service; True when all is healthy."""
    result = stack_status(home)
    output.out.print(output.status_table(result.components, f"aimass stack in {home}"))
    answers: list[tuple[str, RpcAnswer]] = []
    with output.err.status("calling one RPC on each service"):
        for component in result.components:
            # Triton serves no gRPC reflection: only aimass's own services are called.
            if component.kind == "grpc" and component.name != "triton":
                for answer in call_one_rpc_per_service(component.address):
                    answers.append((component.name, answer))
    output.out.print(output.rpc_table(answers))
    services_answered = bool(answers) and all(output.answered(a) for _, a in answers)
    return result.all_serving and services_answered and _every_component_called(result, answers)


def _every_component_called(result: StackStatus, answers: list[tuple[str, RpcAnswer]]) -> bool:
    called = {component for component, _ in answers}
    serving = {
        c.name
        for c in result.components
        if c.kind == "grpc" and c.name != "triton" and c.state == SERVING
    }
    return serving <= called


# ---- db -------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(home: HomeOption = None) -> None:
    """Bring the database schema to the latest migration."""
    settings = _settings(home)
    from aimass.core.db import migrate  # here: alembic is loaded only by the db commands

    where = _redact_url(settings.database_url)
    try:
        with output.err.status(f"migrating {where}"):
            migrate.upgrade(settings.database_url)
        revision = migrate.current_revision(settings.database_url)
    except AimassError as err:
        _fail(f"{where}: {err.message}", EXIT_FAILED)
    output.out.print(f"{where}: at revision {revision} (the latest)")


@db_app.command("current")
def db_current(home: HomeOption = None) -> None:
    """Show the revision the database schema is at, and the latest one."""
    settings = _settings(home)
    from aimass.core.db import migrate  # here: alembic is loaded only by the db commands

    where = _redact_url(settings.database_url)
    try:
        current = migrate.current_revision(settings.database_url)
        head = migrate.head_revision()
    except AimassError as err:
        _fail(f"{where}: {err.message}", EXIT_FAILED)
    if current == head:
        output.out.print(f"{where}: at revision {current} (the latest)")
    else:
        output.out.print(
            f"{where}: at revision {current or 'none (empty database)'}, the latest is {head}:"
            " `aimass db upgrade` migrates it"
        )


def _redact_url(url: str) -> str:
    """The URL without its password: it is printed on terminals and in CI logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{location}"


from aimass.cli.data import data_app  # noqa: E402

app.add_typer(data_app, name="data")

from aimass.cli.keys import keys_app  # noqa: E402

app.add_typer(keys_app, name="keys")

from aimass.cli.compress import compress_app  # noqa: E402

app.add_typer(compress_app, name="compress")

from aimass.cli.deploy import deploy_app, predict_command  # noqa: E402

app.add_typer(deploy_app, name="deploy")
app.command("predict")(predict_command)

from aimass.cli.pipeline import pipelines_app, run_command  # noqa: E402

app.add_typer(pipelines_app, name="pipelines")
app.command("run")(run_command)

from aimass.cli.schedule import schedule_app  # noqa: E402

app.add_typer(schedule_app, name="schedule")

from aimass.cli.monitor import monitor_app  # noqa: E402

app.add_typer(monitor_app, name="monitor")
