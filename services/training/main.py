"""Entry point of the training service process: ``python -m aimass.training``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.training.v1 import training_pb2_grpc

SERVICE_NAME = "training"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The training service's gRPC services.

    Every RPC answers UNIMPLEMENTED until training jobs come with their issue.
    """
    return [
        GrpcService(
            full_name="aimass.training.v1.TrainingService",
            servicer=training_pb2_grpc.TrainingServiceServicer(),
            add_to_server=training_pb2_grpc.add_TrainingServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
