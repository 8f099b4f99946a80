"""The SDK's fast path: lookaside balancing over a watched route table, no router hop.

An :class:`Endpoint` watches its deployment's route table on the routing
service (``WatchRouteTable``: the current table, then one per change) and
calls the chosen Triton directly: it applies the weights itself (sticky by
routing key), sends to the least busy server holding the version, and puts a
server that answered UNAVAILABLE aside for a second. When the table has no
direct entry (nothing ready, the in-process backend) or Triton fails, the
request goes through the router's Predict instead, so a caller always gets
an answer the router could have given.

The request is aimass's ``PredictRequest``, whose fields 1-7 are Triton's
``ModelInferRequest``: with the model name and version put in fields 1 and 2,
the same bytes are a valid Triton request, and Triton's response parses as
a ``PredictResponse``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from aimass.common.v1 import common_pb2
from aimass.core.clients import metadata_interceptors
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
EJECT_S = 1.0
FALLBACK_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)
NUMPY_TO_KSERVE = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
KSERVE_TO_NUMPY = {v: k for k, v in NUMPY_TO_KSERVE.items()}
_BIG_ENDIAN = sys.byteorder == "big"
# Keyed by dtype object: ``dtype.name`` runs numpy's Python code on every call.
_DTYPE_TO_KSERVE = {np.dtype(name): kserve for name, kserve in NUMPY_TO_KSERVE.items()}
_KSERVE_TO_DTYPE = {
    kserve: np.dtype(name).newbyteorder("<") for name, kserve in NUMPY_TO_KSERVE.items()
}


@dataclass(frozen=True)
class Prediction:
    """Outputs by name, the version that answered, and whether the router was used."""

    outputs: dict[str, np.ndarray]
    model_version: str
    via_router: bool = False


def encode_request(
    inputs: Mapping[str, np.ndarray], *, request_id: str = "", outputs: Sequence[str] = ()
) -> pb.PredictRequest:
    """A PredictRequest with raw little-endian tensors (deployment and routing left empty)."""
    request = pb.PredictRequest(id=request_id)
    for name, value in inputs.items():
        array = np.ascontiguousarray(value)
        datatype = _DTYPE_TO_KSERVE.get(array.dtype.newbyteorder("="))
        if datatype is None:
            raise ValueError(f"inputs[{name!r}]: dtype {array.dtype} has no KServe datatype")
        request.inputs.append(
            common_pb2.InferTensor(name=name, datatype=datatype, shape=array.shape)
        )
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and _BIG_ENDIAN):
            array = array.astype(array.dtype.newbyteorder("<"))
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.append(pb.RequestedOutput(name=name))
    return request


def decode_response(response: pb.PredictResponse) -> dict[str, np.ndarray]:
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        dtype = _KSERVE_TO_DTYPE[tensor.datatype]
        out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
    return out


def _sticky_point(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


@dataclass
class _Target:
    address: str
    channel: grpc.aio.Channel
    infer: Any
    outstanding: int = 0
    ejected_until: float = 0.0


@dataclass
class _Routes:
    """A route table made ready for picking: cumulative version weights, entries per version."""

    table: pb.RouteTable
    bounds: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    # Per version: (bytes naming the Triton entry, appended to a request; its target).
    entries: dict[str, list[tuple[bytes, _Target]]] = field(default_factory=dict)
    timeout_s: float | None = None

    @classmethod
    def of(cls, table: pb.RouteTable, target: Callable[[str], _Target]) -> _Routes:
        """Everything a call needs, computed once per table instead of once per call."""
        routes = cls(table, timeout_s=table.request_timeout.ToTimedelta().total_seconds() or None)
        weights: dict[str, float] = {}
        for entry in table.entries:
            if entry.grpc_address:
                names = pb.PredictRequest(
                    deployment=entry.triton_model_name, model_version=entry.triton_model_version
                ).SerializeToString()
                routes.entries.setdefault(entry.model_version, []).append(
                    (names, target(entry.grpc_address))
                )
            weights[entry.model_version] = weights.get(entry.model_version, 0.0) + entry.weight
        total = 0.0
        for version, weight in weights.items():
            if weight > 0:
                total += weight
                routes.bounds.append(total)
                routes.versions.append(version)
        return routes

    def pick(self, routing_key: str) -> str | None:
        if len(self.versions) == 1:
            return self.versions[0]
        if not self.bounds:
            return None
        point = _sticky_point(routing_key) if routing_key else random.random() * 100.0
        index = bisect.bisect_right(self.bounds, point * self.bounds[-1] / 100.0)
        return self.versions[min(index, len(self.versions) - 1)]


class Endpoint:
    """A deployment seen from the client: direct calls to Triton, the router as fallback."""

    def __init__(
        self,
        routing_address: str,
        deployment: str,
        *,
        max_message_mb: int = 64,
        first_table_timeout_s: float = 5.0,
        api_key: str | None = None,
    ) -> None:
        """``api_key`` (default: AIMASS_API_KEY) goes with every call to the routing service;
        Triton, called directly, takes none."""
        self.deployment = (
            deployment if deployment.startswith("deployments/") else f"deployments/{deployment}"
        )
        limit = max_message_mb * 1024 * 1024
        self._options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]
        key = api_key if api_key is not None else os.environ.get("AIMASS_API_KEY", "")
        credentials = (lambda: {"x-api-key": key}) if key else None
        self._router_channel = grpc.aio.insecure_channel(
            routing_address, options=self._options, interceptors=metadata_interceptors(credentials)
        )
        self._routing = routing_pb2_grpc.RoutingServiceStub(self._router_channel)
        self._prediction = routing_pb2_grpc.PredictionServiceStub(self._router_channel)
        self._routes: _Routes | None = None
        self._targets: dict[str, _Target] = {}
        self._first_table = asyncio.Event()
        self._first_table_timeout_s = first_table_timeout_s
        self._watch: asyncio.Task[None] | None = None
        self.direct_calls = 0
        self.router_calls = 0

    async def __aenter__(self) -> Endpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts watching the route table and waits (bounded) for the first one."""
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_loop())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_table.wait(), self._first_table_timeout_s)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for target in self._targets.values():
            await target.channel.close()
        await self._router_channel.close()

    @property
    def route_table(self) -> pb.RouteTable | None:
        return self._routes.table if self._routes else None

    async def _watch_loop(self) -> None:
        """Follows the table; reconnects with backoff when the routing service goes away."""
        backoff = 0.1
        while True:
            known = self._routes.table.revision if self._routes else 0
            request = pb.WatchRouteTableRequest(
                name=f"{self.deployment}/routeTable", known_revision=known
            )
            try:
                async for table in self._routing.WatchRouteTable(request):
                    self._install(table)
                    backoff = 0.1
            except grpc.aio.AioRpcError:
                self._first_table.set()  # no table: every call goes to the router
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _install(self, table: pb.RouteTable) -> None:
        if table.deleted:
            self._routes = None
        elif self._routes is None or table.revision >= self._routes.table.revision:
            self._routes = _Routes.of(table, self._target)
        self._first_table.set()

    def _target(self, address: str) -> _Target:
        target = self._targets.get(address)
        if target is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            target = _Target(address, channel, channel.unary_unary(INFER_METHOD))
            self._targets[address] = target
        return target

    def _choose(self, routes: _Routes, version: str) -> tuple[bytes, _Target] | None:
        """The least busy target holding ``version``, servers put aside skipped."""
        choices = routes.entries.get(version)
        if not choices:
            return None
        if len(choices) == 1:
            chosen = choices[0]
            return chosen if chosen[1].ejected_until <= time.monotonic() else None
        now = time.monotonic()
        best = None
        for names, target in choices:
            if target.ejected_until > now:
                continue
            if best is None or target.outstanding < best[1].outstanding:
                best = (names, target)
        return best

    async def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        routing_key: str = "",
        model_version: str = "",
        outputs: Sequence[str] = (),
        timeout_s: float | None = None,
    ) -> Prediction:
        """One inference: direct to Triton when the table allows, else through the router."""
        request = encode_request(inputs, outputs=outputs)
        routes = self._routes
        version = model_version or (routes.pick(routing_key) if routes else None)
        if routes is not None and version is not None:
            raw = await self._direct(routes, version, request.SerializeToString(), timeout_s)
            if raw is not None:
                return Prediction(decode_response(pb.PredictResponse.FromString(raw)), version)
        response = await self._via_router(request, routing_key, model_version, timeout_s)
        return Prediction(decode_response(response), response.model_version, True)

    async def predict_request(
        self,
        request: pb.PredictRequest,
        *,
        routing_key: str = "",
        model_version: str = "",
        timeout_s: float | None = None,
    ) -> tuple[pb.PredictResponse, bool]:
        """Sends a prepared request; returns the response and whether the router answered."""
        routes = self._routes
        version = model_version or (routes.pick(routing_key) if routes else None)
        if routes is not None and version is not None:
            raw = await self._direct(routes, version, request.SerializeToString(), timeout_s)
            if raw is not None:
                response = pb.PredictResponse.FromString(raw)
                response.deployment = self.deployment
                response.model_version = version
                return response, False
        return await self._via_router(request, routing_key, model_version, timeout_s), True

    async def _direct(
        self, routes: _Routes, version: str, payload: bytes, timeout_s: float | None
    ) -> bytes | None:
        """Triton's answer from a server holding ``version``; None: ask the router."""
        timeout = timeout_s or routes.timeout_s
        for _ in range(routes.table.max_retries + 1):
            chosen = self._choose(routes, version)
            if chosen is None:
                return None
            names, target = chosen
            target.outstanding += 1
            try:
                # Fields 1 and 2 appended: a parser keeps the last value, so these name the entry.
                raw = await target.infer(payload + names, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() not in FALLBACK_CODES:
                    raise
                target.ejected_until = time.monotonic() + EJECT_S
                continue
            finally:
                target.outstanding -= 1
            self.direct_calls += 1
            return raw
        return None

    async def _via_router(
        self,
        request: pb.PredictRequest,
        routing_key: str,
        model_version: str,
        timeout_s: float | None,
    ) -> pb.PredictResponse:
        request.deployment = self.deployment
        request.model_version = model_version
        request.routing_key = routing_key
        self.router_calls += 1
        return await self._prediction.Predict(request, timeout=timeout_s)
