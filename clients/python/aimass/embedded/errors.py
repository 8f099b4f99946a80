"""Why the embedded stack could not do what was asked.

StackError                  base; the CLI prints the message and exits 1
├── StackConfigError        unusable settings or options (the CLI exits 2)
├── PortsInUse              a port the stack needs is taken; nothing was started
├── StackAlreadyRunning     a supervisor already runs from this home
├── StartupFailed           a component did not come up; everything was stopped
├── NoStackRunning          nothing runs from this home (the CLI exits 3)
└── ReportedError           one of these, raised in the detached supervisor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class StackError(Exception):
    """Base of every error of the embedded stack; ``message`` is meant for people."""

    # The CLI's exit status for this error; scripts rely on it.
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StackConfigError(StackError):
    """Settings or options the stack cannot run with (a port of 0, an offset past 65535)."""

    exit_code = 2


@dataclass(frozen=True)
class PortConflict:
    """A port the stack needs and cannot bind."""

    component: str
    address: str
    reason: str


class PortsInUse(StackError):
    """Some ports are taken; raised before anything is started."""

    def __init__(self, conflicts: Sequence[PortConflict]) -> None:
        self.conflicts = tuple(conflicts)
        lines = [f"{c.address} ({c.component}): {c.reason}" for c in self.conflicts]
        super().__init__(
            "cannot start the stack, ports are not free: "
            + "; ".join(lines)
            + ". Stop what holds them, choose other ports (AIMASS_PORTS__<NAME>=...)"
            " or shift them all with --port-offset N."
        )


class StackAlreadyRunning(StackError):
    """A live supervisor owns this home already."""


class StartupFailed(StackError):
    """A component exited or never reported SERVING while the stack started."""

    def __init__(self, component: str, reason: str, log_path: str, log_tail: str) -> None:
        self.component = component
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail
        tail = f"\nlast lines of {log_path}:\n{log_tail}" if log_tail else f" ({log_path} is empty)"
        super().__init__(f"{component} did not start: {reason}{tail}")


class NoStackRunning(StackError):
    """No supervisor and no component of a stack is alive in this home."""

    exit_code = 3


class ReportedError(StackError):
    """An error the detached supervisor reported back to the command that started it."""

    def __init__(self, kind: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
