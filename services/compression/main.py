"""Entry point of the compression service process: ``python -m aimass.compression``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.compression.v1 import compression_pb2_grpc
from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service

SERVICE_NAME = "compression"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The compression service's gRPC services.

    Every RPC answers UNIMPLEMENTED until compression jobs come with their issue.
    """
    return [
        GrpcService(
            full_name="aimass.compression.v1.CompressionService",
            servicer=compression_pb2_grpc.CompressionServiceServicer(),
            add_to_server=compression_pb2_grpc.add_CompressionServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
