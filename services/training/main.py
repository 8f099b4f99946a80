"""Entry point of the training service process: ``python -m aimass.training``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.training.api import TrainingServicer
from aimass.training.scheduling import Scheduler, SchedulingConfig
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
    # Releases queued jobs to free workers that fit them (priorities, project quotas).
    settings = ctx.settings.training
    scheduler = Scheduler(
        store,
        SchedulingConfig(settings.quotas, settings.default_quota, settings.worker_stale_s),
        ctx.notify_outbox,
    )
    scheduler.start()
    ctx.on_close(scheduler.stop)

    def changed() -> None:
        # A write that queued events may also have queued, ended or claimed a job.
        ctx.notify_outbox()
        scheduler.wake()

    servicer = TrainingServicer(
        store,
        data_channel=lambda: ctx.channels().get("data"),
        notify_outbox=changed,
        artifacts=ctx.artifacts,
        scheduler=scheduler,
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
