"""``aimass deploy`` and ``aimass predict``: deployments and inference from a terminal.

    aimass deploy create digits --route models/digits/aliases/production=90 \\
        --route models/digits/versions/4=10 --max-batch-size 32 --batch-delay-us 200
    aimass deploy list | show digits | delete digits | table digits | servers
    aimass deploy update digits --route models/digits/versions/4=100
    aimass predict digits --input input=@batch.npy          # or input='[[0.1, 0.2, ...]]'

Every command takes ``--json`` and ``--address`` (default: the routing service of the
configured stack). ``create`` and ``update`` wait until the deployment is READY (or
FAILED, exit 1) unless ``--no-wait``. Exit codes: 0 done, 1 refused, 2 bad usage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import typer
from google.protobuf import field_mask_pb2
from rich.table import Table

from aimass.cli.common import EXIT_USAGE, channel, console
from aimass.cli.common import call as _call
from aimass.cli.common import fail as _fail
from aimass.cli.common import print_json as _print_json
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc
from aimass.serving.endpoint import decode_response, encode_request

deploy_app = typer.Typer(
    help="Deployments: endpoints routing to model versions on Triton.", no_args_is_help=True
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the routing service (default: the stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _channel(address: str | None) -> grpc.Channel:
    return channel("routing", address)


RouteOption = Annotated[
    list[str],
    typer.Option("--route", help="MODEL=WEIGHT, MODEL a version or alias name; repeatable."),
]


def parse_routes(values: list[str]) -> list[pb.Route]:
    """``models/m/versions/1=90`` -> Route; a route without ``=`` takes the rest of 100."""
    routes = []
    for value in values:
        model, _, weight = value.partition("=")
        if weight and not weight.isdigit():
            _fail(f"--route {value}: the weight must be a whole percent", EXIT_USAGE)
        routes.append(pb.Route(model=model, weight_percent=int(weight) if weight else -1))
    unweighted = [r for r in routes if r.weight_percent == -1]
    rest = 100 - sum(r.weight_percent for r in routes if r.weight_percent >= 0)
    for route in unweighted:
        route.weight_percent = rest // len(unweighted)
    return routes


def _serving_config(
    max_batch_size: int, batch_delay_us: int, instances: int, timeout_s: float
) -> pb.ServingConfig:
    config = pb.ServingConfig(max_batch_size=max_batch_size, instance_count=instances)
    if batch_delay_us > 0:
        config.dynamic_batching.max_queue_delay_microseconds = batch_delay_us
    if timeout_s > 0:
        config.request_timeout.FromMilliseconds(int(timeout_s * 1000))
    return config


def _wait(stub: routing_pb2_grpc.RoutingServiceStub, name: str, timeout_s: float) -> pb.Deployment:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _call(stub.GetDeployment, pb.GetDeploymentRequest(name=name))
        if found.state == pb.DEPLOYMENT_STATE_READY:
            return found
        if found.state == pb.DEPLOYMENT_STATE_FAILED:
            _fail(f"{name} FAILED: {found.state_reason}")
        if time.monotonic() > deadline:
            _fail(f"{name} is still {pb.DeploymentState.Name(found.state)} after {timeout_s} s")
        time.sleep(0.2)


def _show(deployment: pb.Deployment, as_json: bool) -> None:
    if as_json:
        _print_json(deployment)
        return
    table = Table(title=f"{deployment.name} ({pb.DeploymentState.Name(deployment.state)[17:]})")
    for column in ("route", "resolved version", "weight"):
        table.add_column(column)
    for route in deployment.routes:
        table.add_row(route.model, route.resolved_version, f"{route.weight_percent}%")
    console.print(table)
    if deployment.state_reason:
        console.print(deployment.state_reason, highlight=False)


@deploy_app.command("create")
def create(
    deployment_id: str,
    route: RouteOption,
    max_batch_size: Annotated[int, typer.Option(help="0 disables batching.")] = 32,
    batch_delay_us: Annotated[int, typer.Option(help="Dynamic batching delay; 0: off.")] = 100,
    instances: Annotated[int, typer.Option(help="Model instances per server.")] = 1,
    timeout_s: Annotated[float, typer.Option(help="Request deadline; 0: 10 s.")] = 0.0,
    server: Annotated[list[str], typer.Option(help="inferenceServers/NAME; repeatable.")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option(help="Wait until READY.")] = True,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Creates a deployment routing to versions or aliases by weight."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    deployment = pb.Deployment(
        routes=parse_routes(route),
        servers=server,
        serving_config=_serving_config(max_batch_size, batch_delay_us, instances, timeout_s),
    )
    created = _call(
        stub.CreateDeployment,
        pb.CreateDeploymentRequest(deployment=deployment, deployment_id=deployment_id),
    )
    _show(_wait(stub, created.name, 300) if wait else created, as_json)


@deploy_app.command("update")
def update(
    deployment_id: str,
    route: RouteOption,
    wait: Annotated[bool, typer.Option(help="Wait until READY.")] = True,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replaces a deployment's routes (new versions load before traffic moves)."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    name = f"deployments/{deployment_id}"
    updated = _call(
        stub.UpdateDeployment,
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(name=name, routes=parse_routes(route)),
            update_mask=field_mask_pb2.FieldMask(paths=["routes"]),
        ),
    )
    _show(_wait(stub, updated.name, 300) if wait else updated, as_json)


@deploy_app.command("show")
def show(deployment_id: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Shows a deployment, its routes and state."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    found = _call(stub.GetDeployment, pb.GetDeploymentRequest(name=f"deployments/{deployment_id}"))
    _show(found, as_json)


@deploy_app.command("list")
def list_deployments(address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Lists deployments."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    found = _call(stub.ListDeployments, pb.ListDeploymentsRequest(page_size=1000))
    if as_json:
        _print_json(found)
        return
    table = Table(title="deployments")
    for column in ("name", "state", "routes", "revision"):
        table.add_column(column)
    for d in found.deployments:
        routes = ", ".join(f"{r.resolved_version or r.model} {r.weight_percent}%" for r in d.routes)
        table.add_row(d.name, pb.DeploymentState.Name(d.state)[17:], routes, str(d.revision))
    console.print(table)


@deploy_app.command("delete")
def delete(deployment_id: str, address: AddressOption = None) -> None:
    """Deletes a deployment: traffic stops, then its models are unloaded."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    _call(stub.DeleteDeployment, pb.DeleteDeploymentRequest(name=f"deployments/{deployment_id}"))
    console.print(f"deleted deployments/{deployment_id}")


@deploy_app.command("table")
def route_table(deployment_id: str, address: AddressOption = None) -> None:
    """Prints the route table the SDK's fast path uses."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    name = f"deployments/{deployment_id}/routeTable"
    _print_json(_call(stub.GetRouteTable, pb.GetRouteTableRequest(name=name)))


@deploy_app.command("servers")
def servers(address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Lists inference servers with their health and loaded models."""
    stub = routing_pb2_grpc.RoutingServiceStub(_channel(address))
    found = _call(stub.ListInferenceServers, pb.ListInferenceServersRequest(page_size=1000))
    if as_json:
        _print_json(found)
        return
    table = Table(title="inference servers")
    for column in ("name", "state", "address", "models", "memory used"):
        table.add_column(column)
    for s in found.inference_servers:
        models = ", ".join(m.triton_model_name for m in s.loaded_models)
        state = pb.ServerState.Name(s.state)[13:]
        table.add_row(s.name, state, s.grpc_address, models, str(s.memory_used_bytes))
    console.print(table)


def parse_input(value: str) -> tuple[str, np.ndarray]:
    """``NAME=@file.npy`` or ``NAME=<JSON array>`` (JSON numbers become float32)."""
    name, sep, data = value.partition("=")
    if not sep or not name:
        _fail(f"--input {value!r}: use NAME=@file.npy or NAME='[[...]]'", EXIT_USAGE)
    if data.startswith("@"):
        path = Path(data[1:])
        if not path.exists():
            _fail(f"--input {name}: {path} does not exist", EXIT_USAGE)
        return name, np.load(path, allow_pickle=False)
    try:
        array = np.asarray(json.loads(data))
    except ValueError as err:
        _fail(f"--input {name}: not a JSON array: {err}", EXIT_USAGE)
    return name, array.astype(np.float32) if array.dtype.kind == "f" else array


def predict_command(
    deployment_id: str,
    input_: Annotated[list[str], typer.Option("--input", help="NAME=@file.npy or NAME=JSON.")],
    routing_key: Annotated[str, typer.Option(help="Sticky routing key.")] = "",
    address: AddressOption = None,
) -> None:
    """Runs one inference through a deployment and prints the outputs as JSON."""
    request = encode_request(dict(parse_input(v) for v in input_))
    request.deployment = f"deployments/{deployment_id}"
    request.routing_key = routing_key
    stub = routing_pb2_grpc.PredictionServiceStub(_channel(address))
    response = _call(stub.Predict, request)
    outputs = {name: value.tolist() for name, value in decode_response(response).items()}
    typer.echo(json.dumps({"model_version": response.model_version, "outputs": outputs}))
