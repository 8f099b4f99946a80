"""Entry point of the data service process: ``python -m aimass.data``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.data.api import DataServicer
from aimass.data.v1 import data_pb2_grpc

SERVICE_NAME = "data"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The data service over the database, artifact store and event bus of ``ctx``."""
    database = ctx.database()
    artifacts = await ctx.artifacts()
    # Opened for its outbox relay: ready/failed events leave through the outbox.
    await ctx.event_bus()
    servicer = DataServicer(database, artifacts, ctx.settings, ctx.notify_outbox)
    ctx.on_close(servicer.ingestor.close)
    return [
        GrpcService(
            full_name="aimass.data.v1.DataService",
            servicer=servicer,
            add_to_server=data_pb2_grpc.add_DataServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
