"""What every service process does between ``python -m aimass.<service>`` and serving.

Reads the settings (a bad value exits with status 2 and the key named),
configures logging and tracing, opens the shared resources the service asks
for (database at the schema head, artifact store, event bus with its outbox
relay), builds the servicers, serves until SIGTERM, then shuts down in the
reverse order. Services never import each other; they talk gRPC or events.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aimass.core.errors import AimassError
from aimass.core.logging import configure_logging
from aimass.core.server import GrpcService, RunningServer, create_server, serve_until_signal
from aimass.core.settings import Settings, SettingsError, load_settings
from aimass.core.telemetry import configure_tracing

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    """Shared resources handed to a service's build function."""

    name: str
    settings: Settings
    # Coroutines run at shutdown, last registered first.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self.closers.append(closer)


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


async def _run(name: str, build: BuildFn, settings: Settings) -> None:
    running, _ = await start_service(name, build, settings)
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
