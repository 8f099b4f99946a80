"""Runs a supervisor in this process until SIGTERM, SIGINT or SIGHUP (``aimass up``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aimass.core.settings import Settings
from aimass.embedded.supervisor import ProgressFn, ReadyFn, RestartPolicy, Supervisor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def run_supervisor(
    settings: Settings,
    *,
    startup_timeout_s: float = 60.0,
    progress: ProgressFn | None = None,
    on_ready: ReadyFn | None = None,
    supervisor_log: str = "",
    policy: RestartPolicy | None = None,
) -> None:
    """Starts the stack, keeps it up until a stop signal, stops it; raises StackError on failure.

    SIGHUP counts as a stop: a closed terminal must not leave the services orphaned.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        supervisor = Supervisor(
            settings,
            startup_timeout_s=startup_timeout_s,
            progress=progress,
            supervisor_log=supervisor_log,
            policy=policy,
        )
        await supervisor.run(stop, on_ready)
    finally:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
