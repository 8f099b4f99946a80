"""Entry point of the pipeline service process: ``python -m aimass.pipeline``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.pipeline.api import PipelineServicer
from aimass.pipeline.engine import Engine
from aimass.pipeline.schedules import NewestDataset, Scheduler, ScheduleStore
from aimass.pipeline.stages import Stages
from aimass.pipeline.store import RunStore
from aimass.pipeline.v1 import pipeline_pb2_grpc

SERVICE_NAME = "pipeline"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The pipeline's gRPC service, and its event consumers on the bus of ``ctx``."""
    store = RunStore(ctx.database())
    bus = await ctx.event_bus()
    engine = Engine(store, Stages(ctx.channels()), ctx.notify_outbox)
    await engine.start(bus)
    # Registered after the bus: closers run last-first, so the consumers stop before it closes.
    ctx.on_close(engine.stop)
    ctx.resources["pipeline_engine"] = engine
    # Every replica runs the scheduler: firing is compare-and-set, so one run per firing.
    schedules = ScheduleStore(ctx.database())
    scheduler = Scheduler(schedules, NewestDataset(ctx.channels().get("data")), ctx.notify_outbox)
    scheduler.start()
    ctx.on_close(scheduler.stop)
    ctx.resources["pipeline_scheduler"] = scheduler
    return [
        GrpcService(
            full_name="aimass.pipeline.v1.PipelineService",
            servicer=PipelineServicer(store, ctx.notify_outbox, schedules),
            add_to_server=pipeline_pb2_grpc.add_PipelineServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
