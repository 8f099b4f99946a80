"""Entry point of the registry service process: ``python -m aimass.registry``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.registry.v1 import registry_pb2_grpc

SERVICE_NAME = "registry"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The registry's gRPC services. Every RPC answers UNIMPLEMENTED until issue 4 fills them in."""
    return [
        GrpcService(
            full_name="aimass.registry.v1.RegistryService",
            servicer=registry_pb2_grpc.RegistryServiceServicer(),
            add_to_server=registry_pb2_grpc.add_RegistryServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
