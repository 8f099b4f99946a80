"""Entry point of the registry service process: ``python -m aimass.registry``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.auth.api import access_services
from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.registry.api import RegistryServicer
from aimass.registry.store import SqlRegistryStore
from aimass.registry.v1 import registry_pb2_grpc

SERVICE_NAME = "registry"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The registry's gRPC service over the database, artifact store and event bus of ``ctx``."""
    database = ctx.database()
    artifacts = await ctx.artifacts()
    # The bus is opened for its outbox relay: the registry's events go through the outbox.
    await ctx.event_bus()
    servicer = RegistryServicer(
        SqlRegistryStore(database), artifacts, notify_outbox=ctx.notify_outbox, temp_dir=None
    )
    return [
        GrpcService(
            full_name="aimass.registry.v1.RegistryService",
            servicer=servicer,
            add_to_server=registry_pb2_grpc.add_RegistryServiceServicer_to_server,
        ),
        # API keys and webhooks (aimass.core.auth) are served by the registry process.
        *await access_services(ctx),
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
