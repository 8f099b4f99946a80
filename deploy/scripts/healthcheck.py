#!/usr/bin/env python3
"""Exit 0 when a gRPC server answers SERVING on grpc.health.v1, else 1 (container health checks).

    python healthcheck.py PORT [--host 127.0.0.1] [--service NAME] [--timeout 3]

Installed in the aimass image as ``aimass-healthcheck``; the compose stack runs
it in each service container. Kubernetes needs no script: its native ``grpc:``
probes call the same health service.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status name of ``service`` ("" is the whole server), or the call's error code."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    status = check(f"{args.host}:{args.port}", args.service, args.timeout)
    if status != "SERVING":
        print(f"{args.host}:{args.port}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
