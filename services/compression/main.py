"""Entry point of the compression service process: ``python -m aimass.compression``.

The process serves the gRPC API, consumes the compression work queue (an
``aimass worker compression`` process can consume it too) and follows
``aimass.registry.version.created`` for compression policies.
"""

from __future__ import annotations

from collections.abc import Sequence

from aimass.compression.api import CompressionServicer
from aimass.compression.runner import Runner
from aimass.compression.sources import Sources
from aimass.compression.triton_check import triton_checker
from aimass.compression.v1 import compression_pb2_grpc
from aimass.compression.worker import JobWorker, PolicyTrigger
from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service

SERVICE_NAME = "compression"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The compression service over the database, artifact store, event bus and other services."""
    database = ctx.database()
    artifacts = await ctx.artifacts()
    bus = await ctx.event_bus()
    home = ctx.settings.home
    sources = Sources(ctx.channels(), home / "cache" / "compression" / "models")
    checker = triton_checker(home / "cache" / "compression" / "triton")
    if checker is not None:
        ctx.on_close(checker.close)
    runner = Runner(
        database, artifacts, sources, ctx.notify_outbox, home / "work" / "compression",
        checker.check if checker is not None else None,
    )  # fmt: skip
    worker = JobWorker(bus, runner)
    await worker.start()
    ctx.on_close(worker.stop)
    await PolicyTrigger(database, sources, ctx.notify_outbox).subscribe(bus)
    return [
        GrpcService(
            full_name="aimass.compression.v1.CompressionService",
            servicer=CompressionServicer(database, sources, ctx.notify_outbox),
            add_to_server=compression_pb2_grpc.add_CompressionServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
