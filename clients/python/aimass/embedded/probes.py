"""Is a component up? gRPC health for the services, the NATS handshake for nats-server.

Every probe answers one of :data:`SERVING`, :data:`NOT_SERVING` (it answers, but
says it is not ready) or :data:`DOWN` (nothing answers), within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
DOWN = "DOWN"


async def grpc_health(address: str, timeout_s: float = 1.0, service: str = "") -> str:
    """The grpc.health.v1 status of a server ("" asks for the whole server).

    A fresh channel each time: a channel that failed to connect backs off for
    seconds before retrying, which would hide a server that has just come up.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return DOWN
            return NOT_SERVING
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return SERVING
    return NOT_SERVING


async def nats_health(host: str, port: int, timeout_s: float = 1.0) -> str:
    """SERVING once nats-server accepts a connection and announces JetStream in its INFO."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return DOWN
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError):
        return NOT_SERVING
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line.startswith(b"INFO "):
        return NOT_SERVING
    try:
        info = json.loads(line[5:])
    except ValueError:
        return NOT_SERVING
    return SERVING if info.get("jetstream") else NOT_SERVING


async def probe(kind: str, address: str, timeout_s: float = 1.0) -> str:
    """The state of a component of the given kind ("nats", "grpc" or "http") at host:port."""
    if kind == "process":
        return SERVING  # a worker without a port: serving while alive (checked by the caller)
    if kind == "nats":
        host, _, port = address.rpartition(":")
        return await nats_health(host, int(port), timeout_s)
    if kind == "http":
        host, _, port = address.rpartition(":")
        return await http_health(host, int(port), timeout_s)
    return await grpc_health(address, timeout_s)


async def http_health(host: str, port: int, timeout_s: float = 1.0) -> str:
    """SERVING when GET /healthz answers 200 (the REST gateway)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return DOWN
    try:
        writer.write(f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except (OSError, TimeoutError):
        return NOT_SERVING
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split()
    return SERVING if len(parts) >= 2 and parts[1] == b"200" else NOT_SERVING
