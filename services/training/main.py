"""Entry point of the training service process: ``python -m aimass.training``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.training.api import TrainingServicer
from aimass.training.store import TrainingStore
from aimass.training.v1 import training_pb2_grpc

SERVICE_NAME = "training"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The TrainingService over the database, the outbox relay and a channel to the data service.

    Jobs are trained by workers (``aimass worker training``), not by this process.
    """
    store = TrainingStore(ctx.database())
    # Opened for its outbox relay: jobs are enqueued and events published through it.
    await ctx.event_bus()
    await ctx.watch_job_queues("training")
    servicer = TrainingServicer(
        store,
        data_channel=lambda: ctx.channels().get("data"),
        notify_outbox=ctx.notify_outbox,
        artifacts=ctx.artifacts,
    )
    return [
        GrpcService(
            full_name="aimass.training.v1.TrainingService",
            servicer=servicer,
            add_to_server=training_pb2_grpc.add_TrainingServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
