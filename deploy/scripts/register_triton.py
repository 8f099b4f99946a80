#!/usr/bin/env python3
"""Registers the Triton servers of a deployment with the routing service (one-shot, idempotent).

    python register_triton.py --routing routing:7106 --name triton \\
        --grpc-address triton:8001 --http-address triton:8000 --model-repository /models

With ``--count N`` each of ``--name`` and the addresses may hold ``{i}``, one
server per index 0..N-1 (a Kubernetes StatefulSet: ``triton-{i}.triton:8001``).
A server that is already registered is left as it is, so the compose stack and
the Kubernetes Job can run this on every start. The routing service is retried
while it is UNAVAILABLE (still starting), up to ``--wait`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from aimass.routing.v1 import routing_pb2, routing_pb2_grpc

RETRY_S = 2.0


def server_requests(
    name: str, grpc_address: str, http_address: str, model_repository: str, count: int
) -> list[routing_pb2.CreateInferenceServerRequest]:
    """One create request per server; ``{i}`` in the name and addresses becomes its index."""
    requests = []
    for index in range(count):
        server = routing_pb2.InferenceServer(
            kind=routing_pb2.SERVER_KIND_TRITON,
            grpc_address=grpc_address.format(i=index),
            http_address=http_address.format(i=index),
            model_repository_uri=model_repository.format(i=index),
            description="registered by deploy/scripts/register_triton.py",
        )
        requests.append(
            routing_pb2.CreateInferenceServerRequest(
                inference_server=server, inference_server_id=name.format(i=index)
            )
        )
    return requests


def register(
    stub: routing_pb2_grpc.RoutingServiceStub,
    request: routing_pb2.CreateInferenceServerRequest,
    wait_s: float,
) -> str:
    """Creates one server; returns "created" or "exists"; retries while routing is away."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stub.CreateInferenceServer(request, timeout=10)
            return "created"
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                return "exists"
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(RETRY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routing", default="routing:7106", help="host:port of routing")
    parser.add_argument("--name", default="triton", help="{server} id; may hold {i}")
    parser.add_argument("--grpc-address", default="triton:8001")
    parser.add_argument("--http-address", default="triton:8000")
    parser.add_argument("--model-repository", default="/models")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for routing")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    requests = server_requests(
        args.name, args.grpc_address, args.http_address, args.model_repository, args.count
    )
    with grpc.insecure_channel(args.routing) as channel:
        stub = routing_pb2_grpc.RoutingServiceStub(channel)
        for request in requests:
            try:
                outcome = register(stub, request, args.wait)
            except grpc.RpcError as err:
                print(f"{request.inference_server_id}: {err.code().name}: {err.details()}")
                return 1
            print(f"inferenceServers/{request.inference_server_id}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
