"""Calls one RPC on each gRPC service a server offers, to show it answers (``aimass demo``).

The services and their methods are read from the server itself through gRPC
reflection, so the check needs no generated code and follows the protos as
they grow. It prefers a read-only method (List*, then Get*) and sends an empty
request; whatever status comes back (UNIMPLEMENTED while a service is a
skeleton, INVALID_ARGUMENT once it checks its input) proves the service answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# Services every server has; not the domain services we want to show.
_INFRASTRUCTURE = ("grpc.health.", "grpc.reflection.")


@dataclass(frozen=True)
class RpcAnswer:
    """How one service answered one call."""

    service: str
    method: str
    # The gRPC status code name: OK, UNIMPLEMENTED, INVALID_ARGUMENT, ...
    code: str
    details: str


def domain_services(channel: grpc.Channel) -> list[ServiceDescriptor]:
    """The services a server offers through reflection, health and reflection left out."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    names = [n for n in database.get_services() if not n.startswith(_INFRASTRUCTURE)]
    return [pool.FindServiceByName(name) for name in sorted(names)]


def pick_method(service: ServiceDescriptor) -> MethodDescriptor | None:
    """A unary method that is safe to call with an empty request, List* or Get* first."""
    unary = [m for m in service.methods if not m.client_streaming and not m.server_streaming]
    for prefix in ("List", "Get"):
        for method in unary:
            if method.name.startswith(prefix):
                return method
    return unary[0] if unary else None


def call_empty(channel: grpc.Channel, method: MethodDescriptor, timeout_s: float) -> RpcAnswer:
    """Calls method with an empty request; any status is an answer."""
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    service = method.containing_service.full_name
    try:
        call(request_cls(), timeout=timeout_s)
    except grpc.RpcError as err:
        return RpcAnswer(service, method.name, err.code().name, err.details() or "")
    return RpcAnswer(service, method.name, "OK", "")


def call_one_rpc_per_service(address: str, timeout_s: float = 5.0) -> list[RpcAnswer]:
    """One answer per domain service served at address (host:port)."""
    with grpc.insecure_channel(address) as channel:
        answers = []
        for service in domain_services(channel):
            method = pick_method(service)
            if method is None:
                answers.append(RpcAnswer(service.full_name, "-", "NO_UNARY_METHOD", ""))
                continue
            answers.append(call_empty(channel, method, timeout_s))
        return answers
