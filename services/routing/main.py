"""Entry point of the routing service process: ``python -m aimass.routing``.

One process serves two gRPC services: RoutingService (deployments, inference
servers: the control plane) and PredictionService (Predict forwarded to
Triton: the data plane), on the routing port, plus Prometheus metrics on the
metrics port. It follows ``aimass.registry.alias.moved`` to roll deployments
that route to an alias, and writes the calls that deployments' prediction
logging samples to the artifact store (see :mod:`aimass.routing.prediction_log`).
With ``AIMASS_CO_LOCATED_GATEWAY=routing`` (what `aimass up` sets) it also serves the
REST gateway on ports.gateway, calling its own unary methods in process
(:mod:`aimass.gateway.local`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.routing.api import services
from aimass.routing.config import RoutingConfig
from aimass.routing.metrics import RoutingMetrics
from aimass.routing.prediction_log import PredictionLogger
from aimass.routing.prediction_sink import ArtifactSink
from aimass.routing.runtime import Router
from aimass.routing.store import RoutingStore
from aimass.routing.versions import VersionResolver

SERVICE_NAME = "routing"


async def build(ctx: ServiceContext, config: RoutingConfig | None = None) -> Sequence[GrpcService]:
    """Routing's gRPC services over the database, the registry and the event bus of ``ctx``."""
    config = config or RoutingConfig.from_env(ctx.settings)
    database = ctx.database()
    bus = await ctx.event_bus()
    store = RoutingStore(database, notify_outbox=ctx.notify_outbox)
    resolver = VersionResolver(ctx.channels().get("registry"), config.cache_dir)
    metrics = RoutingMetrics()
    router = Router(
        store,
        resolver,
        config,
        ctx.settings.max_message_mb * 1024 * 1024,
        metrics,
        s3=ctx.settings.s3,
    )
    ctx.resources["router"] = router
    await router.start()
    ctx.on_close(router.close)
    # Prediction logging: sampled calls -> Parquet in the artifact store + events.
    logger = PredictionLogger(ArtifactSink(await ctx.artifacts(), database, ctx.notify_outbox))
    logger.start()
    router.prediction_log = logger
    ctx.on_close(logger.close)
    await router.subscribe_alias_moves(bus)
    # The router's per-deployment metrics are served with the process's RPC metrics.
    ctx.serve_metrics(config.metrics_port, [metrics.registry])
    return services(router)


def main() -> None:
    run_service(SERVICE_NAME, build)
