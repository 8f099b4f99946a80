"""What the CLI does with a stack it does not run itself: start it detached, look at it, stop it.

Everything here works from HOME/run/stack.json and the live processes, so it
works from any terminal, and ``stop_stack`` still cleans up when the
supervisor itself has died (it signals the recorded process groups directly).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from aimass.embedded.errors import NoStackRunning, ReportedError, StackError, StartupFailed
from aimass.embedded.essentials import scrape
from aimass.embedded.layout import SUPERVISOR, StackLayout, tail
from aimass.embedded.probes import DOWN, SERVING, probe
from aimass.embedded.state import (
    ProcessRecord,
    StackState,
    is_alive,
    live_group_members,
    read_state,
    remove_state,
    signal_group,
)

# Beyond the stack's own start-up timeout: the supervisor's interpreter start and checks.
_DETACH_MARGIN_S = 30.0
_POLL_S = 0.1


# ---- start ----------------------------------------------------------------------------------


def start_detached(
    home: Path,
    *,
    port_offset: int = 0,
    startup_timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> StackState:
    """Starts a supervisor in a new session and returns once every component is SERVING.

    Raises the supervisor's error (PortsInUse, StartupFailed, ...) as a ReportedError
    with the same message and exit code; nothing is left running then.
    """
    layout = StackLayout(home)
    layout.ensure()
    supervisor_log = layout.log_of(SUPERVISOR)
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable, "-m", "aimass.embedded",
        "--home", str(home),
        "--port-offset", str(port_offset),
        "--startup-timeout", str(startup_timeout_s),
        "--ready-fd", str(write_fd),
    ]  # fmt: skip
    try:
        with supervisor_log.open("ab") as out:
            supervisor = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                # A new session: the stack outlives this terminal and its Ctrl-C.
                start_new_session=True,
                env={**os.environ, "AIMASS_HOME": str(home)},
            )
    finally:
        os.close(write_fd)
    try:
        _await_ready(
            read_fd, supervisor, supervisor_log, startup_timeout_s + _DETACH_MARGIN_S, progress
        )
    except BaseException:
        # Interrupted or timed out: the supervisor stops whatever it started on SIGTERM.
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            _wait_child(supervisor, _DETACH_MARGIN_S)
        raise
    finally:
        os.close(read_fd)
    state = read_state(layout)
    if state is None:
        raise StackError(f"the supervisor reported ready but {layout.state_file} is missing")
    return state


def _await_ready(
    read_fd: int,
    supervisor: subprocess.Popen[bytes],
    supervisor_log: Path,
    timeout_s: float,
    progress: Callable[[str], None] | None,
) -> None:
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartupFailed(
                SUPERVISOR,
                f"no answer within {timeout_s:.0f} s",
                str(supervisor_log),
                tail(supervisor_log),
            )
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            _raise_silent_exit(supervisor, supervisor_log)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if _handle_event(json.loads(line), progress):
                return


def _handle_event(event: dict[str, Any], progress: Callable[[str], None] | None) -> bool:
    """True once the stack is ready; raises what the supervisor reported as failed."""
    kind = event.get("event")
    if kind == "progress" and progress is not None:
        progress(str(event.get("message", "")))
    if kind == "failed":
        raise ReportedError(
            str(event.get("kind", "StackError")),
            str(event.get("message", "start-up failed")),
            int(event.get("exit_code", 1)),
        )
    return kind == "ready"


def _raise_silent_exit(supervisor: subprocess.Popen[bytes], log: Path) -> NoReturn:
    code = _wait_child(supervisor, 10.0)
    raise StartupFailed(
        SUPERVISOR, f"exited (code {code}) before the stack was ready", str(log), tail(log)
    )


def _wait_child(child: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


# ---- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentStatus:
    """One row of ``aimass status``."""

    name: str
    kind: str
    pid: int
    address: str
    # SERVING, NOT_SERVING or DOWN.
    state: str
    uptime_s: float | None
    restarts: int
    log: str
    # Calls served, server errors, queued and finished jobs (services only; None when the
    # component serves no metrics or they did not answer).
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class StackStatus:
    home: str
    components: list[ComponentStatus]

    @property
    def all_serving(self) -> bool:
        return all(c.state == SERVING for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "all_serving": self.all_serving,
            "components": [asdict(c) for c in self.components],
        }


def stack_status(home: Path, probe_timeout_s: float = 1.0) -> StackStatus:
    """The state of every process of the stack; raises NoStackRunning when none lives."""
    layout = StackLayout(home)
    state = read_state(layout)
    if state is None:
        raise NoStackRunning(f"no stack is running from {layout.home}")
    rows = asyncio.run(_probe_all(state, probe_timeout_s))
    if all(row.state == DOWN for row in rows):
        raise NoStackRunning(
            f"no stack is running from {layout.home} (its run state is stale:"
            " `aimass down` clears it)"
        )
    return StackStatus(home=str(layout.home), components=rows)


async def _probe_all(state: StackState, timeout_s: float) -> list[ComponentStatus]:
    return list(await asyncio.gather(*(_probe_one(p, timeout_s) for p in state.all_processes())))


async def _probe_one(record: ProcessRecord, timeout_s: float) -> ComponentStatus:
    alive = is_alive(record)
    if not alive:
        state = DOWN
    elif record.kind == SUPERVISOR:
        state = SERVING
    else:
        state = await probe(record.kind, record.address, timeout_s)
    essentials = None
    if alive and record.metrics_port:
        host = record.address.rpartition(":")[0] or "127.0.0.1"
        essentials = await asyncio.to_thread(scrape, host, record.metrics_port, timeout_s)
    return ComponentStatus(
        name=record.name,
        kind=record.kind,
        pid=record.pid,
        address=record.address,
        state=state,
        uptime_s=round(time.time() - record.create_time, 1) if alive else None,
        restarts=record.restarts,
        log=record.log,
        metrics=essentials.to_dict() if essentials else None,
    )


# ---- stop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopReport:
    """What ``aimass down`` did: every process it found, and any still alive (should be none)."""

    stopped: list[str]
    # "name (pid N)" of any process that survived SIGKILL; empty after a clean stop.
    left_running: list[str]
    forced: list[str]


def stop_stack(home: Path, timeout_s: float = 30.0) -> StopReport:
    """Stops the stack of this home: through its supervisor, then directly whatever is left.

    SIGTERM to the supervisor (it stops services, then NATS); if it is gone or stuck,
    SIGTERM then SIGKILL to each recorded process group directly. Removes the run state.
    """
    layout = StackLayout(home)
    state = read_state(layout)
    if state is None:
        raise NoStackRunning(f"no stack is running from {layout.home}")
    records = state.components
    if is_alive(state.supervisor):
        os.kill(state.supervisor.pid, signal.SIGTERM)
        _wait_gone([state.supervisor], timeout_s)
    forced = _stop_directly(records, timeout_s=min(timeout_s, 15.0))
    if is_alive(state.supervisor):
        # Stuck: its components are already stopped, so killing it loses nothing.
        os.kill(state.supervisor.pid, signal.SIGKILL)
        forced.append(f"{SUPERVISOR} (pid {state.supervisor.pid})")
        _wait_gone([state.supervisor], 5.0)
    everyone = state.all_processes()
    left = [
        f"{r.name} (pid {r.pid})"
        for r in everyone
        if is_alive(r) or (r.kind != SUPERVISOR and live_group_members(r.pgid))
    ]
    if not left:
        remove_state(layout)
    return StopReport(
        stopped=[f"{r.name} (pid {r.pid})" for r in everyone], left_running=left, forced=forced
    )


def _stop_directly(records: list[ProcessRecord], timeout_s: float) -> list[str]:
    """Stops recorded components whose supervisor did not: services first, NATS last."""
    forced: list[str] = []
    services = [r for r in records if r.kind != "nats"]
    nats = [r for r in records if r.kind == "nats"]
    for group in (services, nats):
        # One record per process group: a hosted component (the gateway in routing) shares
        # its host's, and a second SIGTERM could cut the host's drain short.
        running = list({r.pgid: r for r in group if _group_alive(r)}.values())
        if not running:
            continue
        for record in running:
            signal_group(record, signal.SIGTERM)
        _wait_gone(running, timeout_s)
        for record in running:
            if _group_alive(record):
                signal_group(record, signal.SIGKILL)
                forced.append(f"{record.name} (pid {record.pid})")
        _wait_gone(running, 5.0)
    return forced


def _group_alive(record: ProcessRecord) -> bool:
    return is_alive(record) or bool(live_group_members(record.pgid))


def _wait_gone(records: list[ProcessRecord], timeout_s: float) -> None:
    """Waits (bounded) until none of the records' processes or groups is alive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [
            r
            for r in records
            if is_alive(r) or (r.kind != SUPERVISOR and live_group_members(r.pgid))
        ]
        if not alive:
            return
        time.sleep(_POLL_S)
