"""The run state of a stack (HOME/run/stack.json) and whether its processes still live.

The supervisor writes the file atomically when the stack is ready and again
after every restart, so ``aimass status`` and ``aimass down`` always see the
current pids, even when the supervisor itself has died. A pid is trusted only
together with its process's start time: after a reboot or pid reuse a recorded
pid may name an unrelated process, which must never be signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from aimass.embedded.layout import StackLayout

STATE_VERSION = 1
# psutil's create_time is a float rounded differently across reads: compare loosely.
_CREATE_TIME_TOLERANCE_S = 0.05


@dataclass
class ProcessRecord:
    """One process of the stack as recorded in stack.json."""

    name: str
    # "supervisor", "nats" or "grpc".
    kind: str
    pid: int
    # Each component leads its own process group: pgid == pid.
    pgid: int
    # Seconds since the epoch, as psutil reports them for the pid.
    create_time: float
    address: str = ""
    log: str = ""
    restarts: int = 0
    # Port of its Prometheus page on the stack's host; 0 when it serves none.
    metrics_port: int = 0


@dataclass
class StackState:
    """Everything stack.json holds."""

    home: str
    host: str
    started_at: float
    supervisor: ProcessRecord
    components: list[ProcessRecord]
    ports: dict[str, int]
    version: int = STATE_VERSION

    def all_processes(self) -> list[ProcessRecord]:
        return [self.supervisor, *self.components]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackState:
        return cls(
            home=data["home"],
            host=data["host"],
            started_at=float(data["started_at"]),
            supervisor=ProcessRecord(**data["supervisor"]),
            components=[ProcessRecord(**c) for c in data["components"]],
            ports={k: int(v) for k, v in data["ports"].items()},
            version=int(data.get("version", STATE_VERSION)),
        )


def write_state(layout: StackLayout, state: StackState) -> None:
    """Replaces stack.json atomically: readers see the old or the new file, never half of one."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.state_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, layout.state_file)


def read_state(layout: StackLayout) -> StackState | None:
    """The recorded state, or None when there is none (or it is unreadable, e.g. truncated)."""
    try:
        return StackState.from_dict(json.loads(layout.state_file.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def remove_state(layout: StackLayout) -> None:
    layout.state_file.unlink(missing_ok=True)


def create_time_of(pid: int) -> float:
    """Start time of a live process, as recorded in ProcessRecord.create_time."""
    return psutil.Process(pid).create_time()


def is_alive(record: ProcessRecord) -> bool:
    """True when the recorded process runs (not a zombie) and is the same process as recorded."""
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap_if_child(record.pid)
            return False
        return abs(proc.create_time() - record.create_time) <= _CREATE_TIME_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in a process group."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    """Sends sig to the record's process group while it still holds live processes of ours.

    The kernel never hands out a pid that is still in use as a process group id, so a
    group with live members is still ours, unless its leader's pid now names another
    process (the whole group died and the number was reused): that group is left alone.
    """
    if record.pgid == record.pid and _pid_reused(record):
        return
    if not live_group_members(record.pgid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pgid, sig)


def _pid_reused(record: ProcessRecord) -> bool:
    """True when the recorded pid names a live process that is not the recorded one."""
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - record.create_time) > _CREATE_TIME_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _reap_if_child(pid: int) -> None:
    """Collects the exit status of a dead child of ours, so it stops being a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
