"""Entry point of the evaluation service process: ``python -m aimass.evaluation``."""

from __future__ import annotations

from collections.abc import Sequence

from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext, run_service
from aimass.evaluation.v1 import evaluation_pb2_grpc

SERVICE_NAME = "evaluation"


async def build(ctx: ServiceContext) -> Sequence[GrpcService]:
    """The evaluation service's gRPC services.

    Every RPC answers UNIMPLEMENTED until evaluations and benchmarks come with their issue.
    """
    return [
        GrpcService(
            full_name="aimass.evaluation.v1.EvaluationService",
            servicer=evaluation_pb2_grpc.EvaluationServiceServicer(),
            add_to_server=evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server,
        )
    ]


def main() -> None:
    run_service(SERVICE_NAME, build)
