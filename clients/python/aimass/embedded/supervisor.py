"""The supervisor of the embedded stack: starts every component, keeps them up, stops them all.

Start-up is all or nothing. The supervisor takes the home's lock, refuses to
run beside a live stack, checks every port before it starts anything, migrates
the database, starts nats-server and waits for it, then starts the services
(each in its own process group, output to HOME/logs/<name>.log) and waits until
each reports SERVING on grpc.health.v1 (a component hosted by another's process,
the REST gateway inside routing, is only probed: it shares its host's process,
restarts and stop). If any step fails, everything already
started is stopped and the error carries the tail of the failing log.

Once up, a component that exits on its own is restarted with exponential
backoff (logged, counted in stack.json); a component that stays up for
``reset_after_s`` earns a fast restart again. On SIGTERM, SIGINT or SIGHUP the
services are stopped first, NATS last (services drain their events into it),
each with SIGTERM then, past the grace period, SIGKILL to its whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import IO

import psutil

from aimass.core.settings import Settings
from aimass.embedded.components import NATS, ComponentSpec, available_services, child_env, plan
from aimass.embedded.errors import StackAlreadyRunning, StackError, StartupFailed
from aimass.embedded.layout import SUPERVISOR, StackLayout, tail
from aimass.embedded.ports import ensure_ports_free
from aimass.embedded.probes import SERVING, probe
from aimass.embedded.state import (
    ProcessRecord,
    StackState,
    is_alive,
    live_group_members,
    read_state,
    remove_state,
    write_state,
)

log = logging.getLogger("aimass.embedded")

ProgressFn = Callable[[str], None]
ReadyFn = Callable[[StackState], None]
# How often a starting component is probed.
_PROBE_INTERVAL_S = 0.2
# Time a stopping component gets beyond the drain time it was configured with.
_STOP_MARGIN_S = 5.0


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts of a component that keeps dying."""

    initial_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A component that ran this long is healthy again: its next crash restarts fast.
    reset_after_s: float = 60.0

    def next_delay(self, previous_s: float | None, ran_for_s: float) -> float:
        if previous_s is None or ran_for_s >= self.reset_after_s:
            return self.initial_delay_s
        return min(previous_s * 2, self.max_delay_s)


@dataclass
class Managed:
    """A component and its current process."""

    spec: ComponentSpec
    process: asyncio.subprocess.Process
    record: ProcessRecord
    started_monotonic: float


class Supervisor:
    """Runs one embedded stack from one home; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        components: list[ComponentSpec] | None = None,
        startup_timeout_s: float = 60.0,
        policy: RestartPolicy | None = None,
        supervisor_log: str = "",
        progress: ProgressFn | None = None,
    ) -> None:
        self.settings = settings
        self.layout = StackLayout(settings.home)
        # What to run, in start order; default: NATS, then every installed service.
        self._components = components
        self.startup_timeout_s = startup_timeout_s
        self.policy = policy or RestartPolicy()
        self.supervisor_log = supervisor_log
        self._progress = progress or (lambda message: None)
        self._env = child_env(settings)
        self._managed: list[Managed] = []
        self._stopping = False
        self._lock: IO[str] | None = None
        # True once this supervisor may write and remove stack.json (never another's).
        self._owns_state = False
        self._started_at = time.time()

    # ---- the whole life ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_ready: ReadyFn | None = None) -> None:
        """Starts the stack, keeps it up until stop is set, then stops it.

        Raises a StackError when start-up fails (nothing is left running then).
        Setting stop during start-up aborts it cleanly.
        """
        starting = asyncio.create_task(self.start())
        stop_wait = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not starting.done():
            self._progress("stop requested while starting: stopping what was started")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StackError):
                await starting
            return
        state = starting.result()
        if on_ready is not None:
            on_ready(state)
        try:
            await self.supervise(stop)
        finally:
            await self.stop()

    async def start(self) -> StackState:
        """Starts every component and waits until all are SERVING; all or nothing."""
        self.layout.ensure()
        self._take_lock()
        try:
            self._refuse_if_running()
            self._owns_state = True
            specs = self._components or plan(self.settings, self.layout, available_services())
            ensure_ports_free(self.settings.host, specs)
            await self._migrate()
            await self._start_all(specs)
        except BaseException:
            await self.stop()
            raise
        state = self._state()
        write_state(self.layout, state)
        return state

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restarts components that exit on their own, until stop is set."""
        own = [m for m in self._managed if not m.spec.hosted_by]
        keepers = [asyncio.create_task(self._keep_alive(m)) for m in own]
        try:
            await stop.wait()
        finally:
            self._stopping = True
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)

    async def stop(self) -> None:
        """Stops the services, then NATS; removes the run state and releases the home."""
        self._stopping = True
        # A hosted component stops with its host's process (one SIGTERM per process).
        services = [m for m in self._managed if m.spec.name != NATS and not m.spec.hosted_by]
        nats = [m for m in self._managed if m.spec.name == NATS]
        grace = self.settings.shutdown_grace_s + _STOP_MARGIN_S
        await asyncio.gather(*(self._terminate(m, grace) for m in services))
        await asyncio.gather(*(self._terminate(m, grace) for m in nats))
        self._managed.clear()
        if self._owns_state:
            remove_state(self.layout)
        self._release_lock()

    # ---- start-up ---------------------------------------------------------------------

    def _take_lock(self) -> None:
        """One supervisor per home: a second `aimass up` fails here instead of racing."""
        lock = (self.layout.run_dir / "supervisor.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock.close()
            raise StackAlreadyRunning(
                f"a stack is already starting or running from {self.layout.home}:"
                " `aimass status` shows it, `aimass down` stops it"
            ) from err
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _refuse_if_running(self) -> None:
        """A stale stack.json is removed; one whose processes still live stops us."""
        previous = read_state(self.layout)
        if previous is None:
            return
        alive = [p for p in previous.all_processes() if is_alive(p)]
        if alive:
            listed = ", ".join(f"{p.name} (pid {p.pid})" for p in alive)
            raise StackAlreadyRunning(
                f"processes of a previous stack still run from {self.layout.home}: {listed};"
                " `aimass down` stops them"
            )
        remove_state(self.layout)

    async def _migrate(self) -> None:
        """Brings the database schema to head before any service checks it."""
        # Imported here: alembic is heavy and only this step needs it.
        from aimass.core.db.migrate import upgrade

        # alembic announces each of its plugins at INFO: noise on the terminal and in logs.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        self._progress("migrating the database")
        try:
            await asyncio.to_thread(upgrade, self.settings.database_url)
        except Exception as err:
            raise StackError(f"database migration failed: {err}") from err

    async def _start_all(self, specs: list[ComponentSpec]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        nats = [s for s in specs if s.name == NATS]
        services = [s for s in specs if s.name != NATS]
        for spec in nats:
            await self._wait_serving(await self._spawn(spec), deadline)
        started = [await self._spawn(spec) for spec in services if not spec.hosted_by]
        started += [self._host(spec) for spec in services if spec.hosted_by]
        waits = [asyncio.create_task(self._wait_serving(m, deadline)) for m in started]
        try:
            await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()

    async def _spawn(self, spec: ComponentSpec, restarts: int = 0) -> Managed:
        """Starts one component in its own process group, output appended to its log."""
        note = f" (restart #{restarts})" if restarts else ""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with spec.log.open("ab") as out:
            out.write(f"--- {stamp} aimass supervisor: starting {spec.name}{note}\n".encode())
            out.flush()
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self._env, **dict(spec.env)},
                # Own group: Ctrl-C in the terminal reaches only the supervisor, and a
                # stop reaches the component's own children too (killpg).
                process_group=0,
            )
        record = ProcessRecord(
            name=spec.name,
            kind=spec.kind,
            pid=process.pid,
            pgid=process.pid,
            create_time=_create_time(process.pid),
            address=spec.address,
            log=str(spec.log),
            restarts=restarts,
            metrics_port=spec.metrics_port,
        )
        managed = Managed(spec, process, record, time.monotonic())
        self._managed = [m for m in self._managed if m.spec.name != spec.name] + [managed]
        self._progress(f"started {spec.name} (pid {process.pid}){note}")
        return managed

    def _host(self, spec: ComponentSpec) -> Managed:
        """A component served by another's process: its record is the host's process, under
        its own name, kind and address (status probes it there)."""
        host = next(m for m in self._managed if m.spec.name == spec.hosted_by)
        record = replace(
            host.record, name=spec.name, kind=spec.kind, address=spec.address, metrics_port=0
        )
        managed = Managed(spec, host.process, record, host.started_monotonic)
        self._managed = [m for m in self._managed if m.spec.name != spec.name] + [managed]
        return managed

    def _hosted_by(self, host: Managed) -> list[Managed]:
        """The components ``host``'s process serves, re-derived from its current process."""
        specs = [m.spec for m in self._managed if m.spec.hosted_by == host.spec.name]
        return [self._host(spec) for spec in specs]

    async def _wait_serving(self, managed: Managed, deadline: float) -> None:
        """Returns once the component is SERVING; raises StartupFailed if it exits or times out."""
        spec = managed.spec
        state = "DOWN"
        while True:
            code = managed.process.returncode
            if code is not None:
                raise StartupFailed(spec.name, _describe_exit(code), str(spec.log), tail(spec.log))
            state = await probe(spec.kind, spec.address, timeout_s=1.0)
            if state == SERVING:
                self._progress(f"{spec.name} is SERVING on {spec.address}")
                return
            if time.monotonic() >= deadline:
                raise StartupFailed(
                    spec.name,
                    f"not SERVING on {spec.address} after {self.startup_timeout_s:.0f} s"
                    f" (last state {state})",
                    str(spec.log),
                    tail(spec.log),
                )
            await asyncio.sleep(_PROBE_INTERVAL_S)

    # ---- keeping it up ----------------------------------------------------------------

    async def _keep_alive(self, managed: Managed) -> None:
        """Restarts the component each time it exits, until the stack stops."""
        delay: float | None = None
        while True:
            code = await managed.process.wait()
            if self._stopping:
                return
            ran_for = time.monotonic() - managed.started_monotonic
            delay = self.policy.next_delay(delay, ran_for)
            restarts = managed.record.restarts + 1
            log.warning(
                "%s (pid %d) %s after %.1f s; restarting in %.1f s (restart #%d); log: %s",
                managed.spec.name,
                managed.record.pid,
                _describe_exit(code),
                ran_for,
                delay,
                restarts,
                managed.spec.log,
            )
            await asyncio.sleep(delay)
            # Children the dead process left in its group could hold its port.
            _kill_group(managed.record.pgid, signal.SIGKILL)
            managed = await self._spawn(managed.spec, restarts)
            hosted = self._hosted_by(managed)
            write_state(self.layout, self._state())
            for restarted in (managed, *hosted):
                await self._report_restart(restarted)

    async def _report_restart(self, managed: Managed) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            await self._wait_serving(managed, deadline)
        except StartupFailed as err:
            # Not fatal: if it exited, the keeper restarts it again after a longer delay.
            log.error("%s", err.message)
        else:
            log.warning("%s is SERVING again (pid %d)", managed.spec.name, managed.record.pid)

    # ---- stopping ---------------------------------------------------------------------

    async def _terminate(self, managed: Managed, grace_s: float) -> None:
        """SIGTERM to the component's group; SIGKILL to whatever is left after grace_s."""
        process, pgid = managed.process, managed.record.pgid
        if process.returncode is None:
            _kill_group(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                log.warning("%s did not stop within %.0f s: killing it", managed.spec.name, grace_s)
                _kill_group(pgid, signal.SIGKILL)
                await process.wait()
        if live_group_members(pgid):
            _kill_group(pgid, signal.SIGKILL)

    def _state(self) -> StackState:
        me = os.getpid()
        supervisor = ProcessRecord(
            name=SUPERVISOR,
            kind=SUPERVISOR,
            pid=me,
            pgid=os.getpgid(me),
            create_time=_create_time(me),
            log=self.supervisor_log,
        )
        return StackState(
            home=str(self.layout.home),
            host=self.settings.host,
            started_at=self._started_at,
            supervisor=supervisor,
            components=[m.record for m in self._managed],
            ports=self.settings.ports.model_dump(),
        )


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return time.time()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
