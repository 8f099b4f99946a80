"""What every service process does between ``python -m aimass.<service>`` and serving.

Reads the settings (a bad value exits with status 2 and the key named),
configures logging and tracing, opens the shared resources the service asks
for (database at the schema head, artifact store, event bus with its outbox
relay), builds the servicers, serves (plus the REST gateway where
``co_located_gateway`` names this service) until SIGTERM, then shuts down in the
reverse order. Services never import each other; they talk gRPC or events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from aimass.core.artifacts import ArtifactStore, open_artifact_store
from aimass.core.auth import outgoing_credentials
from aimass.core.clients import ServiceChannels
from aimass.core.db.engine import Database
from aimass.core.db.migrate import check_at_head
from aimass.core.errors import AimassError, Unavailable
from aimass.core.events import EventBus, OutboxRelay
from aimass.core.logging import configure_logging
from aimass.core.metrics import serve_metrics, watch_queue_depths
from aimass.core.server import GrpcService, RunningServer, create_server, serve_until_signal
from aimass.core.settings import Settings, SettingsError, load_settings
from aimass.core.telemetry import configure_tracing

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """Shared resources handed to a service's build function, opened on first use.

    Each resource is opened once per process and closed when the service
    stops, in the reverse order of opening.
    """

    name: str
    settings: Settings
    # Coroutines run at shutdown, last registered first.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self.closers.append(closer)

    def database(self) -> Database:
        """The metadata store; refuses to start when its schema is not at the code's head."""
        if "database" not in self.resources:
            check_at_head(self.settings.database_url)
            database = Database(self.settings.database_url)
            self.resources["database"] = database
            self.on_close(lambda: asyncio.to_thread(database.dispose))
        return self.resources["database"]

    async def artifacts(self) -> ArtifactStore:
        """The artifact store at settings.artifact_root (file:// or s3://)."""
        if "artifacts" not in self.resources:
            self.resources["artifacts"] = open_artifact_store(
                self.settings.artifact_root, self.settings.s3
            )
        return self.resources["artifacts"]

    async def event_bus(self) -> EventBus:
        """NATS with the aimass streams ensured, and the outbox relay of this service's database.

        The relay publishes what this process commits to the outbox; it stops
        before the bus closes so no publish is cut off halfway.
        """
        if "event_bus" not in self.resources:
            bus = await EventBus.connect(self.settings, f"aimass-{self.name}")
            self.on_close(bus.close)
            await bus.ensure_streams()
            relay = OutboxRelay(self.database(), bus)
            relay.start()
            self.on_close(relay.stop)
            self.resources["event_bus"] = bus
            self.resources["outbox_relay"] = relay
        return self.resources["event_bus"]

    def channels(self) -> ServiceChannels:
        """Pooled gRPC channels to the other services (closed when this service stops)."""
        if "channels" not in self.resources:
            # Calls carry the caller's credential (or the stack's internal token).
            channels = ServiceChannels(self.settings, credentials=outgoing_credentials)
            self.resources["channels"] = channels
            self.on_close(channels.close)
        return self.resources["channels"]

    def serve_metrics(self, port: int, registries: Sequence[CollectorRegistry] = ()) -> None:
        """Serves Prometheus ``/metrics`` on ``port``: the RPC and job metrics of this
        process plus ``registries`` (a service's own). Once per process; 0 means off."""
        if port <= 0 or "metrics" in self.resources:
            return
        try:
            stop = serve_metrics(port, self.settings.host, registries)
        except OSError as err:  # the port is taken: serve without metrics rather than not at all
            log.warning("%s: metrics port %d unavailable: %s", self.name, port, err)
            return
        self.resources["metrics"] = stop
        self.on_close(lambda: asyncio.to_thread(stop))

    async def watch_job_queues(self, *kinds: str) -> None:
        """Keeps ``aimass_job_queue_pending`` current for the job kinds this service runs."""
        bus = await self.event_bus()
        task = asyncio.create_task(watch_queue_depths(bus, kinds), name="queue-depths")

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.on_close(stop)

    def notify_outbox(self) -> None:
        """Wakes the outbox relay right after a commit that wrote events (safe from any thread)."""
        relay: OutboxRelay | None = self.resources.get("outbox_relay")
        if relay is not None:
            relay.notify()


BuildFn = Callable[[ServiceContext], Awaitable[Sequence[GrpcService]]]


async def start_service(
    name: str, build: BuildFn, settings: Settings, *, port: int | None = None
) -> tuple[RunningServer, ServiceContext]:
    """Opens resources, builds the servicers and starts serving (tests call this directly)."""
    ctx = ServiceContext(name=name, settings=settings)
    try:
        services = await build(ctx)
        running = await create_server(name, services, settings, port=port)
    except BaseException:
        await close_context(ctx)
        raise
    running.on_stop.append(lambda: close_context(ctx))
    return running, ctx


async def close_context(ctx: ServiceContext) -> None:
    for closer in reversed(ctx.closers):
        try:
            await closer()
        except Exception:  # one failing closer must not leak the others
            log.exception("%s: error while closing a resource", ctx.name)
    ctx.closers.clear()


async def start_co_located_gateway(name: str, running: RunningServer, settings: Settings) -> Any:
    """Serves the REST gateway from this process when the settings name it as its host;
    returns the gateway (aimass.gateway.app.Gateway), None when this process hosts none.

    Stopped first of the stop hooks (after the gRPC drain), before the servicers close.
    """
    if settings.co_located_gateway != name or running.registration is None:
        return None
    # Imported here: only the one process that hosts the gateway loads aiohttp for it.
    from aimass.gateway.server import start_co_located_gateway as start

    try:
        runner, _, gateway = await start(settings, running.registration)
    except OSError as err:
        address = f"{settings.host}:{settings.ports.gateway}"
        raise Unavailable(f"{name}: cannot serve the REST gateway on {address}: {err}") from err
    running.on_stop.append(runner.cleanup)
    return gateway


async def _run(name: str, build: BuildFn, settings: Settings) -> None:
    running, ctx = await start_service(name, build, settings)
    try:
        await start_co_located_gateway(name, running, settings)
    except BaseException:
        await running.stop(0)
        raise
    # A real process exposes its metrics (unless its build already did, with its own).
    ctx.serve_metrics(settings.ports.metrics)
    await serve_until_signal(running, name, settings.shutdown_grace_s)


def run_service(name: str, build: BuildFn) -> None:
    """Process entry point of a service: serve until SIGTERM, exit 0; bad config exits 2."""
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"aimass-{name}: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name, settings.tracing)
    try:
        asyncio.run(_run(name, build, settings))
    except AimassError as err:
        log.error("%s could not start: %s", name, err.message)
        print(f"aimass-{name}: {err.message}", file=sys.stderr)
        raise SystemExit(1) from err
