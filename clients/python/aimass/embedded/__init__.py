"""The embedded stack: nats-server and every service as local processes, kept up by a supervisor.

aimass.embedded.components   what runs, on which ports (stack_settings, plan)
aimass.embedded.supervisor   Supervisor: start all or nothing, restart on crash, stop all
aimass.embedded.runner       run_supervisor: a supervisor in this process until a signal
aimass.embedded.control      start_detached, stack_status, stop_stack (from any terminal)
aimass.embedded.state        HOME/run/stack.json and process liveness
aimass.embedded.probes       SERVING / NOT_SERVING / DOWN of a component
aimass.embedded.rpc_check    one RPC per service, through gRPC reflection
"""

from __future__ import annotations

from aimass.embedded.components import available_services, stack_settings
from aimass.embedded.control import (
    ComponentStatus,
    StackStatus,
    StopReport,
    stack_status,
    start_detached,
    stop_stack,
)
from aimass.embedded.errors import (
    NoStackRunning,
    PortsInUse,
    ReportedError,
    StackAlreadyRunning,
    StackConfigError,
    StackError,
    StartupFailed,
)
from aimass.embedded.layout import StackLayout
from aimass.embedded.runner import run_supervisor
from aimass.embedded.state import StackState

__all__ = [
    "ComponentStatus",
    "NoStackRunning",
    "PortsInUse",
    "ReportedError",
    "StackAlreadyRunning",
    "StackConfigError",
    "StackError",
    "StackLayout",
    "StackState",
    "StackStatus",
    "StartupFailed",
    "StopReport",
    "available_services",
    "run_supervisor",
    "stack_settings",
    "stack_status",
    "start_detached",
    "stop_stack",
]
