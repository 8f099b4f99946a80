"""Entry point of the data service process: ``python -m aimass.data``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.data.v1 import data_pb2_grpc

SERVICE_NAME = "data"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The data service's gRPC services.

    Every RPC answers UNIMPLEMENTED until ingest, splits and batches come with their issue.
    """
    return [
        GrpcService(
            full_name="aimass.data.v1.DataService",
            servicer=data_pb2_grpc.DataServiceServicer(),
            add_to_server=data_pb2_grpc.add_DataServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
