"""The gateway process: settings, descriptors, serve on ports.gateway until SIGTERM.

Or co-located: :func:`start_co_located_gateway` serves the same REST API from inside
a service's process (the embedded stack's routing), calling that process's own unary
methods in process (:mod:`aimass.gateway.local`) and the other services over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from aimass.core.logging import configure_logging
from aimass.core.server import wait_for_stop_signal
from aimass.core.settings import Settings, SettingsError, load_settings
from aimass.gateway.app import Gateway
from aimass.gateway.descriptors import Descriptors, descriptor_set_from_modules
from aimass.gateway.local import HandlerLookup, local_calls
from aimass.gateway.routes import routes_of

log = logging.getLogger(__name__)
# A descriptor set file (buf build -o / protoc --descriptor_set_out); default: the
# installed generated modules.
DESCRIPTORS_ENV = "AIMASS_GATEWAY_DESCRIPTORS"


def load_descriptors(path: Path | None = None) -> Descriptors:
    source = path or (Path(os.environ[DESCRIPTORS_ENV]) if DESCRIPTORS_ENV in os.environ else None)
    return Descriptors(source.read_bytes() if source else descriptor_set_from_modules())


async def start_gateway(
    settings: Settings, gateway: Gateway | None = None, port: int | None = None
) -> tuple[web.AppRunner, int]:
    """Starts serving; returns the runner (``await runner.cleanup()`` stops) and the port."""
    gateway = gateway or Gateway(settings, load_descriptors())
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.host, settings.ports.gateway if port is None else port, backlog=1024
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("gateway serving REST on %s:%d", settings.host, bound)
    return runner, int(bound)


async def start_co_located_gateway(
    settings: Settings, lookup: HandlerLookup, port: int | None = None
) -> tuple[web.AppRunner, int, Gateway]:
    """Serves REST from a service's process: the unary methods ``lookup`` finds are called in
    process (through the handlers' server-side wrapper), every other route over gRPC."""
    descriptors = load_descriptors()
    methods = [
        route.grpc_method
        for route in routes_of(descriptors.services())
        if not (route.client_streaming or route.server_streaming)
    ]
    gateway = Gateway(settings, descriptors, local_calls=local_calls(lookup, methods))
    runner, bound = await start_gateway(settings, gateway, port)
    log.info("gateway: %d unary methods called in process", len(gateway.local_calls))
    return runner, bound, gateway


async def _run(settings: Settings) -> None:
    runner, _ = await start_gateway(settings)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"aimass-gateway: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    configure_logging("gateway", settings.log_level, settings.log_format)
    asyncio.run(_run(settings))
