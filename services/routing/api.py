"""gRPC adapters of the routing service: RoutingService (control) and PredictionService (data).

Predict is registered with no request deserializer and no response
serializer: the handler gets the caller's bytes and returns Triton's bytes
with two fields appended (see :mod:`aimass.routing.wire`), so tensors are
never parsed into a new message nor copied into one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from aimass.core.auth import scope
from aimass.core.errors import InvalidArgument
from aimass.core.server import GrpcService
from aimass.routing.runtime import Router
from aimass.routing.store import check_id, parse_name
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc

Context = grpc.aio.ServicerContext
PREDICTION_SERVICE = "aimass.routing.v1.PredictionService"

SERVER_MUTABLE = (
    "description",
    "grpc_address",
    "http_address",
    "model_repository_uri",
    "memory_budget_bytes",
    "labels",
)
DEPLOYMENT_MUTABLE = (
    "description",
    "labels",
    "project",
    "routes",
    "shadow",
    "serving_config",
    "servers",
)


def _paths(
    mask: object, given: pb.Deployment | pb.InferenceServer, mutable: tuple[str, ...], field: str
) -> list[str]:
    paths = list(mask.paths)  # type: ignore[attr-defined]
    if not paths:
        return [f.name for f, _ in given.ListFields() if f.name in mutable]
    for path in paths:
        top = path.split(".")[0]
        if top not in mutable:
            raise InvalidArgument(
                f"{field}.update_mask",
                f"{path!r} cannot be changed; changeable: {', '.join(mutable)}",
            )
    return list(dict.fromkeys(p.split(".")[0] for p in paths))


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def CreateInferenceServer(
        self, request: pb.CreateInferenceServerRequest, context: Context
    ) -> pb.InferenceServer:
        return await self.router.create_server(
            request.inference_server_id, request.inference_server
        )

    async def GetInferenceServer(
        self, request: pb.GetInferenceServerRequest, context: Context
    ) -> pb.InferenceServer:
        parse_name(request.name, "inferenceServers")
        return self.router.server_view(self.router.server(request.name))

    async def ListInferenceServers(
        self, request: pb.ListInferenceServersRequest, context: Context
    ) -> pb.ListInferenceServersResponse:
        import asyncio

        servers, token = await asyncio.to_thread(
            self.router.store.list_servers, request.page_size, request.page_token, request.filter
        )
        views = [
            self.router.server_view(self.router.servers[s.name])
            if s.name in self.router.servers
            else s
            for s in servers
        ]
        return pb.ListInferenceServersResponse(inference_servers=views, next_page_token=token)

    async def UpdateInferenceServer(
        self, request: pb.UpdateInferenceServerRequest, context: Context
    ) -> pb.InferenceServer:
        server_id = parse_name(
            request.inference_server.name, "inferenceServers", "inference_server.name"
        )
        paths = _paths(
            request.update_mask, request.inference_server, SERVER_MUTABLE, "inference_server"
        )
        return await self.router.update_server(server_id, request.inference_server, paths)

    async def DeleteInferenceServer(
        self, request: pb.DeleteInferenceServerRequest, context: Context
    ) -> empty_pb2.Empty:
        parse_name(request.name, "inferenceServers")
        await self.router.delete_server(request.name, request.etag, request.force)
        return empty_pb2.Empty()

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Context
    ) -> pb.Deployment:
        request.deployment.project = scope.stamp_project(
            request.deployment.project, "deployment.project"
        )
        return await self.router.create_deployment(
            request.deployment_id, request.deployment, request.validate_only
        )

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: Context
    ) -> pb.Deployment:
        return await self.router.get_deployment(parse_name(request.name, "deployments"))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: Context
    ) -> pb.ListDeploymentsResponse:
        import asyncio

        deployments, token = await asyncio.to_thread(
            self.router.store.list_deployments,
            request.page_size,
            request.page_token,
            request.filter,
        )
        return pb.ListDeploymentsResponse(deployments=deployments, next_page_token=token)

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: Context
    ) -> pb.Deployment:
        deployment_id = parse_name(request.deployment.name, "deployments", "deployment.name")
        paths = _paths(request.update_mask, request.deployment, DEPLOYMENT_MUTABLE, "deployment")
        merged = await self.router.get_deployment(deployment_id)
        if "project" in paths and request.deployment.project != merged.project:
            scope.stamp_project(request.deployment.project, "deployment.project")
        for path in paths:
            merged.ClearField(path)  # type: ignore[arg-type]
            value = getattr(request.deployment, path)
            if path in ("routes", "servers"):
                getattr(merged, path).extend(value)
            elif path == "labels":
                merged.labels.update(value)
            elif path in ("shadow", "serving_config"):
                getattr(merged, path).CopyFrom(value)
            else:
                setattr(merged, path, value)
        for route in merged.routes:
            route.resolved_version = ""
        return await self.router.update_deployment(deployment_id, merged, request.deployment.etag)

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: Context
    ) -> empty_pb2.Empty:
        await self.router.delete_deployment(parse_name(request.name, "deployments"), request.etag)
        return empty_pb2.Empty()

    async def GetRouteTable(
        self, request: pb.GetRouteTableRequest, context: Context
    ) -> pb.RouteTable:
        return self.router.route_table(_table_deployment(request.name))

    async def WatchRouteTable(
        self, request: pb.WatchRouteTableRequest, context: Context
    ) -> AsyncIterator[pb.RouteTable]:
        deployment_id = _table_deployment(request.name, allow_all=True)
        target = None if deployment_id == "-" else f"deployments/{deployment_id}"
        async for table in self.router.watch(target, request.known_revision):
            yield table


def _table_deployment(name: str, allow_all: bool = False) -> str:
    if not (name.startswith("deployments/") and name.endswith("/routeTable")):
        raise InvalidArgument("name", f"{name!r} is not deployments/{{deployment}}/routeTable")
    deployment_id = name[len("deployments/") : -len("/routeTable")]
    if allow_all and deployment_id == "-":
        return deployment_id
    return check_id(deployment_id, "name")


class PredictionServicer:
    """The data plane; Predict works on bytes (see the module docstring)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def Predict(self, request: bytes, context: Context) -> bytes:
        return await self.router.predict(
            request, context.time_remaining(), lambda: _request_id(context)
        )

    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: Context
    ) -> pb.PredictBatchResponse:
        return await self.router.predict_batch(request, context.time_remaining())

    async def GetDeploymentHealth(
        self, request: pb.GetDeploymentHealthRequest, context: Context
    ) -> pb.GetDeploymentHealthResponse:
        return await self.router.health(parse_name(request.name, "deployments"))

    async def GetDeploymentMetadata(
        self, request: pb.GetDeploymentMetadataRequest, context: Context
    ) -> pb.GetDeploymentMetadataResponse:
        plan = self.router.plan_of(f"deployments/{parse_name(request.name, 'deployments')}")
        response = pb.GetDeploymentMetadataResponse(
            deployment=plan.name, model_versions=plan.versions(), platform="onnxruntime_onnx"
        )
        for target, tensors in (
            (response.inputs, plan.signature.inputs),
            (response.outputs, plan.signature.outputs),
        ):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return response


def _request_id(context: Context) -> str:
    """The caller's x-request-id, asked only for a call that prediction logging captures."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return ""


def add_prediction_service(servicer: PredictionServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_*_to_server, but Predict takes and returns bytes."""
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(servicer.Predict),
        "PredictBatch": grpc.unary_unary_rpc_method_handler(
            servicer.PredictBatch,
            request_deserializer=pb.PredictBatchRequest.FromString,
            response_serializer=pb.PredictBatchResponse.SerializeToString,
        ),
        "GetDeploymentHealth": grpc.unary_unary_rpc_method_handler(
            servicer.GetDeploymentHealth,
            request_deserializer=pb.GetDeploymentHealthRequest.FromString,
            response_serializer=pb.GetDeploymentHealthResponse.SerializeToString,
        ),
        "GetDeploymentMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetDeploymentMetadata,
            request_deserializer=pb.GetDeploymentMetadataRequest.FromString,
            response_serializer=pb.GetDeploymentMetadataResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PREDICTION_SERVICE, handlers),)
    )


def services(router: Router) -> list[GrpcService]:
    return [
        GrpcService(
            full_name="aimass.routing.v1.RoutingService",
            servicer=RoutingServicer(router),
            add_to_server=routing_pb2_grpc.add_RoutingServiceServicer_to_server,
        ),
        GrpcService(
            full_name=PREDICTION_SERVICE,
            servicer=PredictionServicer(router),
            add_to_server=add_prediction_service,
        ),
    ]
