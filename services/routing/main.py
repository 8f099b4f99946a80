"""Entry point of the routing service process: ``python -m aimass.routing``.

One process serves two gRPC services: RoutingService (deployments, inference
servers: the control plane) and PredictionService (Predict forwarded to
Triton: the data plane), on the routing port.
"""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.routing.v1 import routing_pb2_grpc

SERVICE_NAME = "routing"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """Routing's gRPC services. Every RPC answers UNIMPLEMENTED until routing's issue lands."""
    return [
        GrpcService(
            full_name="aimass.routing.v1.RoutingService",
            servicer=routing_pb2_grpc.RoutingServiceServicer(),
            add_to_server=routing_pb2_grpc.add_RoutingServiceServicer_to_server,
        ),
        GrpcService(
            full_name="aimass.routing.v1.PredictionService",
            servicer=routing_pb2_grpc.PredictionServiceServicer(),
            add_to_server=routing_pb2_grpc.add_PredictionServiceServicer_to_server,
        ),
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
