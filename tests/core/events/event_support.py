"""Helpers of the event tests: helper subprocesses, polling, table creation."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from event_procs import ScratchTables

from aimass.core.db.base import Base
from aimass.core.db.engine import Database
from aimass.core.db.outbox import OutboxEvent, ProcessedEvent

PROCS = Path(__file__).with_name("event_procs.py")
LINE_TIMEOUT_S = 30.0


def create_tables(db: Database) -> None:
    """The outbox tables and the tests' widget table."""
    Base.metadata.create_all(db.engine, tables=[OutboxEvent.__table__, ProcessedEvent.__table__])
    ScratchTables.metadata.create_all(db.engine)


class Proc:
    """A helper process of event_procs.py whose stdout lines the test waits for."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(cls, *args: str) -> Proc:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROCS), *args, stdout=asyncio.subprocess.PIPE
        )
        return cls(process)

    async def line_starting(self, prefix: str) -> str:
        """The next stdout line that starts with ``prefix``; fails on EOF or timeout."""
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), LINE_TIMEOUT_S)
            if not raw:
                code = await self.process.wait()
                pytest.fail(f"helper exited with {code} before printing {prefix!r}")
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line

    async def kill(self) -> int:
        """SIGKILL, like a crash; returns the exit code."""
        if self.process.returncode is None:
            self.process.kill()
        return await self.process.wait()

    async def wait(self) -> int:
        return await asyncio.wait_for(self.process.wait(), LINE_TIMEOUT_S)


async def eventually(check: Callable[[], object], timeout_s: float = 20.0) -> Any:
    """Calls ``check()`` (sync or async) until it returns something truthy; fails after a while."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s: last result {result!r}")
        await asyncio.sleep(0.05)
