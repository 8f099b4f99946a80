"""Entry point of the evaluation service process: ``python -m aimass.evaluation``.

The process serves the gRPC API, runs the work-queue consumer of evaluation
and benchmark jobs, follows training and compression events for
automatic evaluations, records routing's captured-prediction files and runs
monitors on their schedule (:mod:`aimass.evaluation.monitors`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.evaluation.api import EvaluationServicer
from aimass.evaluation.monitor_store import MonitorStore
from aimass.evaluation.monitors import BatchRecorder, MonitorRunner, MonitorScheduler
from aimass.evaluation.runner import Runner
from aimass.evaluation.sources import Sources
from aimass.evaluation.v1 import evaluation_pb2_grpc
from aimass.evaluation.worker import AutoEvaluator, JobWorker

SERVICE_NAME = "evaluation"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The evaluation service over the database, artifact store, event bus and other services."""
    database = ctx.database()
    artifacts = await ctx.artifacts()
    bus = await ctx.event_bus()
    await ctx.watch_job_queues("evaluation")
    sources = Sources(ctx.channels(), ctx.settings.home / "cache" / "evaluation" / "models")
    runner = Runner(database, artifacts, sources, ctx.notify_outbox)
    worker = JobWorker(bus, runner)
    await worker.start()
    ctx.on_close(worker.stop)
    await AutoEvaluator(database, sources, ctx.notify_outbox).subscribe(bus)
    servicer = EvaluationServicer(database, artifacts, sources, ctx.notify_outbox)
    # Monitoring: captured predictions recorded from routing's events, monitors on a schedule.
    monitor_store = MonitorStore(database)
    await BatchRecorder(monitor_store).subscribe(bus)
    servicer.monitor_store = monitor_store
    servicer.monitor_runner = MonitorRunner(monitor_store, artifacts, sources)
    scheduler = MonitorScheduler(monitor_store, servicer.monitor_runner)
    scheduler.start()
    ctx.on_close(scheduler.stop)
    return [
        GrpcService(
            full_name="aimass.evaluation.v1.EvaluationService",
            servicer=servicer,
            add_to_server=evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
