"""Entry point of the compression service process: ``python -m aimass.compression``.

The process serves the gRPC API, consumes the compression work queue (an
``aimass worker compression`` process can consume it too) and follows
``aimass.registry.version.created`` for compression policies.
"""

from __future__ import annotations

from collections.abc import Sequence

from aimass.compression.api import CompressionServicer
from aimass.compression.v1 import compression_pb2_grpc
from aimass.compression.worker import JobWorker, PolicyTrigger, open_runner
from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service

SERVICE_NAME = "compression"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The compression service over the database, artifact store, event bus and other services."""
    database = ctx.database()
    bus = await ctx.event_bus()
    await ctx.watch_job_queues("compression")
    runner, sources = await open_runner(ctx)
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
