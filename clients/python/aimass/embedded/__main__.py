"""The detached supervisor: ``python -m aimass.embedded --home H --ready-fd FD``.

``aimass up --detach`` starts this in a new session with its output in
HOME/logs/supervisor.log and reads JSON lines from the pipe FD: ``progress``
events while the stack starts, then ``ready`` or ``failed``; the pipe is then
closed, so the command returns while the supervisor keeps the stack up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from aimass.core.logging import configure_logging
from aimass.core.settings import SettingsError
from aimass.embedded.components import stack_settings
from aimass.embedded.errors import StackError
from aimass.embedded.layout import SUPERVISOR, StackLayout
from aimass.embedded.runner import run_supervisor
from aimass.embedded.state import StackState

log = logging.getLogger("aimass.embedded")


class ReadyPipe:
    """Reports start-up to the parent; silent once the parent has gone or the pipe is closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            return
        line = json.dumps({"event": event, **fields}) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m aimass.embedded")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--ready-fd", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    pipe = ReadyPipe(args.ready_fd)
    configure_logging(SUPERVISOR, "INFO", "console")
    try:
        settings = stack_settings(args.home, args.port_offset)
    except (SettingsError, StackError) as err:
        pipe.send("failed", kind=type(err).__name__, message=str(err), exit_code=2)
        log.error("%s", err)
        return 2
    supervisor_log = str(StackLayout(settings.home).log_of(SUPERVISOR))

    def progress(message: str) -> None:
        log.info("%s", message)
        pipe.send("progress", message=message)

    def ready(state: StackState) -> None:
        log.info("stack ready: %d components SERVING", len(state.components))
        pipe.send("ready", state_file=str(StackLayout(settings.home).state_file))
        pipe.close()

    try:
        asyncio.run(
            run_supervisor(
                settings,
                startup_timeout_s=args.startup_timeout,
                progress=progress,
                on_ready=ready,
                supervisor_log=supervisor_log,
            )
        )
    except StackError as err:
        log.error("%s", err.message)
        pipe.send("failed", kind=type(err).__name__, message=err.message, exit_code=err.exit_code)
        return err.exit_code
    finally:
        pipe.close()
    log.info("stack stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
