"""Roles, permissions, and the permission every RPC needs, derived from the protos.

A method needs one permission; a role grants a set of them:

    admin       read write predict manage
    developer   read write predict
    predictor   predict
    viewer      read

The method map is read from the generated descriptors of every aimass proto
package: a google.api.http ``get`` is a read, any other verb a write;
``Predict*`` methods need predict, and what a predicting client must read
(deployment metadata, health, route tables) accepts read or predict. Every
method of the access package needs manage, except LookupCallerIdentity, which
any authenticated caller may use; the training workers' RPCs (claim, report, complete,
register) need manage too. A method missing from the map needs manage:
unknown means admin only, never open.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from google.api import annotations_pb2
from google.protobuf import descriptor

from aimass.core.settings import SERVICE_NAMES, Ports

ADMIN = "admin"
DEVELOPER = "developer"
PREDICTOR = "predictor"
VIEWER = "viewer"
ROLES = (ADMIN, DEVELOPER, PREDICTOR, VIEWER)

READ = "read"
WRITE = "write"
PREDICT = "predict"
MANAGE = "manage"

ROLE_PERMISSIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        ADMIN: frozenset({READ, WRITE, PREDICT, MANAGE}),
        DEVELOPER: frozenset({READ, WRITE, PREDICT}),
        PREDICTOR: frozenset({PREDICT}),
        VIEWER: frozenset({READ}),
    }
)

# Any authenticated caller.
ANYONE: frozenset[str] = frozenset()
ONLY_ADMIN = frozenset({MANAGE})
# Reads a predicting client needs before or while it predicts.
_PREDICT_SIDE_READS = {
    "GetRouteTable",
    "WatchRouteTable",
    "GetDeploymentMetadata",
    "GetDeploymentHealth",
}
_OPEN_ACCESS_METHODS = {"LookupCallerIdentity"}
# What training workers call to run jobs: a developer key must not forge a job's outcome,
# so only admins and the stack's internal token (which workers present) may call them.
_WORKER_METHODS = {
    "ClaimTrainingJob",
    "ReportTrainingJobProgress",
    "CompleteTrainingJob",
    "RegisterWorker",
}
# Every package a process of the stack may serve (a port name is a process name).
_PROTO_PACKAGES = tuple(dict.fromkeys([*SERVICE_NAMES, *Ports.model_fields, "access"]))


def allowed(role: str, accepted: frozenset[str]) -> bool:
    """True when the role holds one of the accepted permissions (or none is needed)."""
    if not accepted:
        return True
    return bool(ROLE_PERMISSIONS.get(role, frozenset()) & accepted)


def permission_of(
    service: descriptor.ServiceDescriptor, method: descriptor.MethodDescriptor
) -> frozenset[str]:
    """The permissions that admit a call of one method (any one of them is enough)."""
    if service.full_name.startswith("aimass.access."):
        return ANYONE if method.name in _OPEN_ACCESS_METHODS else ONLY_ADMIN
    if method.name in _WORKER_METHODS:
        return ONLY_ADMIN
    if method.name.startswith("Predict"):
        return frozenset({PREDICT})
    if method.name in _PREDICT_SIDE_READS:
        return frozenset({READ, PREDICT})
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    return frozenset({READ}) if rule.WhichOneof("pattern") == "get" else frozenset({WRITE})


def file_descriptors() -> list[descriptor.FileDescriptor]:
    """The descriptors of every generated aimass proto module that is installed."""
    files = []
    for package in _PROTO_PACKAGES:
        try:
            module = importlib.import_module(f"aimass.{package}.v1")
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_pb2"):
                pb2 = importlib.import_module(f"aimass.{package}.v1.{info.name}")
                files.append(pb2.DESCRIPTOR)
    return files


def method_permissions(
    files: Iterable[descriptor.FileDescriptor] | None = None,
) -> dict[str, frozenset[str]]:
    """``{"/aimass.data.v1.DataService/GetDataset": {"read"}, ...}`` for every RPC."""
    table: dict[str, frozenset[str]] = {}
    for file in file_descriptors() if files is None else files:
        for service in file.services_by_name.values():
            for method in service.methods:
                table[f"/{service.full_name}/{method.name}"] = permission_of(service, method)
    return table
