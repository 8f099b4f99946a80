"""gRPC aio server bootstrap shared by every aimass service.

``create_server`` builds a server (interceptor, health, reflection, message
limits) and binds it, separately from serving, so tests bind port 0;
``serve`` runs it until SIGTERM or SIGINT, then drains: health flips to
NOT_SERVING first (so balancers stop sending), in-flight calls get
``shutdown_grace_s`` to finish, and only then are the rest cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aimass.core.errors import Unavailable
from aimass.core.interceptors import AimassServerInterceptor, AuthHook, InterceptedRegistration
from aimass.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcService:
    """One gRPC service served by a process: its servicer and how to add it."""

    # Full name, "aimass.registry.v1.RegistryService".
    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started server with what is needed to report health and stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: Sequence[GrpcService]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The services' handlers as registered (wrapped): a co-located gateway calls them.
    registration: InterceptedRegistration | None = None

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        for service in self.services:
            await self.health.set(service.full_name, status)

    async def stop(self, grace_s: float) -> None:
        """Refuses new calls, lets in-flight ones finish within grace_s, then runs on_stop hooks."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
        for hook in reversed(self.on_stop):
            await hook()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Keepalive lets clients notice a dead server within seconds, not minutes.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
    ]


async def create_server(
    name: str,
    services: Sequence[GrpcService],
    settings: Settings,
    *,
    port: int | None = None,
    auth: AuthHook | None = None,
) -> RunningServer:
    """Builds, binds and starts a server; port None means the service's configured port.

    ``auth`` None means the hook the settings ask for (aimass.core.auth: AllowAll
    unless ``auth.enabled``).
    """
    owned_auth = auth is None
    if auth is None:
        from aimass.core.auth import auth_hook_from_settings  # here: avoids an import cycle

        auth = auth_hook_from_settings(settings)
    server = grpc.aio.server(options=server_options(settings))
    # Handlers go in wrapped (tracing, auth, errors, metrics), not through a gRPC
    # interceptor: gRPC then finds them with a plain lookup per call.
    registration = InterceptedRegistration(server, AimassServerInterceptor(name, auth))
    for service in services:
        service.add_to_server(service.servicer, registration)  # type: ignore[arg-type]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    wanted = settings.ports.of(name) if port is None else port
    address = f"{settings.host}:{wanted}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise Unavailable(
            f"{name}: cannot listen on {address}: the port is already in use"
        ) from err
    if bound == 0:
        raise Unavailable(f"{name}: cannot listen on {address}: the port is already in use")
    await server.start()
    running = RunningServer(
        server=server,
        port=bound,
        health=health_servicer,
        services=services,
        registration=registration,
    )
    # The hook built here is this server's: its NATS link (key revocations, shared rate
    # limits) connects before the first call and closes with the server.
    if owned_auth and hasattr(auth, "start"):
        await auth.start()
        running.on_stop.append(auth.close)
    await running.set_serving(True)
    log.info("%s serving on %s:%d", name, settings.host, bound)
    return running


async def wait_for_stop_signal() -> None:
    """Returns on SIGTERM or SIGINT (loop signal handlers, never tasks from handlers)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


async def serve_until_signal(running: RunningServer, name: str, grace_s: float) -> None:
    """Serves until a stop signal, then shuts down gracefully."""
    await wait_for_stop_signal()
    log.info("%s: stop signal received, draining for up to %.1f s", name, grace_s)
    await running.stop(grace_s)
    log.info("%s: stopped", name)
