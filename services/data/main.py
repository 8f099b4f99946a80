"""Entry point of the data service process: ``python -m aimass.data``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.data.api import DataServicer
from aimass.data.v1 import data_pb2_grpc
from aimass.data.worker import IngestWorker

SERVICE_NAME = "data"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The data service over the database, artifact store and event bus of ``ctx``."""
    database = ctx.database()
    artifacts = await ctx.artifacts()
    # Also starts the outbox relay: ready/failed events leave through the outbox.
    bus = await ctx.event_bus()
    await ctx.watch_job_queues("ingest")
    servicer = DataServicer(
        database, artifacts, ctx.settings, ctx.notify_outbox, bus, ctx.channels()
    )
    worker = IngestWorker(bus, servicer.ingestor)
    await worker.start()
    # Registered after the bus: stops (and gives back its job) before the bus closes.
    ctx.on_close(worker.stop)
    return [
        GrpcService(
            full_name="aimass.data.v1.DataService",
            servicer=servicer,
            add_to_server=data_pb2_grpc.add_DataServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
