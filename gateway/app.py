"""The built-in REST gateway (aiohttp): HTTP/JSON in, generic gRPC calls out.

Per request: refuse path-escape attempts on the raw path (encoded '/' or
'\\', '.' and '..' segments), find the route (404 / 405 otherwise), read the
body within the size limit (413), build the request message (400 naming the
field, or the JSON error's position), call the service that owns the RPC over
a pooled grpc.aio channel with serialized bytes (no stubs), forwarding the
caller's credentials and trace context, and answer JSON (server streaming as
newline-delimited JSON). Inside a service's process the unary methods it
serves are called in process instead (``local_calls``, :mod:`aimass.gateway.local`),
through the same server-side wrapper and with the same errors. gRPC errors
become Envoy's HTTP statuses with a google.rpc.Status body; RESOURCE_EXHAUSTED
with RetryInfo adds Retry-After. Each matched response names its RPC in ``x-aimass-rpc``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from aimass.core.clients import channel_options
from aimass.core.settings import Settings
from aimass.gateway.descriptors import Descriptors
from aimass.gateway.local import UnaryCall
from aimass.gateway.openapi import openapi_document
from aimass.gateway.routes import Route, Router, routes_of
from aimass.gateway.transcode import (
    HTTP_STATUS_OF_GRPC,
    BadRequest,
    build_request,
    dumps,
    response_json,
)

log = logging.getLogger(__name__)

# Proto package -> the service process that serves it.
SERVING_PROCESS = {"access": "registry"}
FORWARDED_HEADERS = ("x-api-key", "authorization", "traceparent", "tracestate", "x-request-id")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
STATUS_DETAILS_KEY = "grpc-status-details-bin"
JSON = "application/json"
NDJSON = "application/x-ndjson"


def _status_body(code: int, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details or []}


def _error(http_status: int, code: int, message: str, **headers: str) -> web.Response:
    return web.json_response(
        _status_body(code, message), status=http_status, headers=headers or None
    )


class Gateway:
    """Routes of one descriptor set, proxied to the stack's services."""

    def __init__(
        self,
        settings: Settings,
        descriptors: Descriptors,
        *,
        addresses: Mapping[str, str] | None = None,
        max_body_bytes: int | None = None,
        unary_timeout_s: float = 300.0,
        local_calls: Mapping[str, UnaryCall] | None = None,
    ) -> None:
        """``local_calls``: gRPC method -> an in-process call (aimass.gateway.local), used
        instead of a channel when the gateway runs inside the process that serves it."""
        self.settings = settings
        self.descriptors = descriptors
        self.router = Router(routes_of(descriptors.services()))
        self.addresses = dict(addresses or {})
        self.max_body_bytes = max_body_bytes or settings.max_message_mb * 1024 * 1024
        self.unary_timeout_s = unary_timeout_s
        self._channels: dict[str, aio.Channel] = {}
        self.local_calls = dict(local_calls or {})
        # gRPC method -> its in-process call, else its multicallable on the pooled channel,
        # made once, not per request.
        self._unary_calls: dict[str, UnaryCall] = dict(self.local_calls)
        self._openapi: bytes | None = None

    # ---- the application ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/openapi.json", self._openapi_json)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(lambda _app: self.close())
        return app

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._unary_calls = dict(self.local_calls)
        for channel in channels:
            await channel.close()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def _openapi_json(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = json.dumps(openapi_document(self.router.routes)).encode()
        return web.Response(body=self._openapi, content_type=JSON)

    def channel(self, package: str) -> aio.Channel:
        process = SERVING_PROCESS.get(package, package)
        if process not in self._channels:
            address = self.addresses.get(process) or self.settings.service_address(process)
            self._channels[process] = aio.insecure_channel(
                address, options=channel_options(self.settings)
            )
        return self._channels[process]

    # ---- one request --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        refused = _refuse_escape(raw_path)
        if refused is not None:
            return refused
        path = unquote(raw_path)
        found = self.router.match(request.method, path)
        if found is None:
            allowed = self.router.allowed_methods(path)
            if allowed:
                return _error(
                    405,
                    code_pb2.UNIMPLEMENTED,
                    f"{request.method} is not allowed on {path}",
                    Allow=", ".join(allowed),
                )
            return _error(404, code_pb2.NOT_FOUND, f"no API route matches {request.method} {path}")
        route, bound = found
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413,
                code_pb2.INVALID_ARGUMENT,
                f"request body is larger than the limit of {self.max_body_bytes} bytes",
            )
        try:
            message = build_request(
                route,
                self.descriptors.message_class(route.method.input_type.full_name),
                body,
                bound,
                parse_qsl(request.query_string, keep_blank_values=True),
            )
        except BadRequest as err:
            return _error(err.status, code_pb2.INVALID_ARGUMENT, err.message)
        metadata = tuple(
            (name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers
        )
        if route.server_streaming:
            return await self._stream(request, route, message.SerializeToString(), metadata)
        return await self._unary(route, message.SerializeToString(), metadata)

    def _unary_call(self, route: Route) -> UnaryCall:
        call = self._unary_calls.get(route.grpc_method)
        if call is None:
            call = self.channel(route.package).unary_unary(route.grpc_method)
            self._unary_calls[route.grpc_method] = call
        return call

    async def _unary(
        self, route: Route, payload: bytes, metadata: tuple[tuple[str, str], ...]
    ) -> web.Response:
        try:
            if route.client_streaming:
                call = self.channel(route.package).stream_unary(route.grpc_method)
                reply = await call(_one(payload), metadata=metadata, timeout=self.unary_timeout_s)
            else:
                call = self._unary_call(route)
                reply = await call(payload, metadata=metadata, timeout=self.unary_timeout_s)
        except aio.AioRpcError as err:
            return self._rpc_error(route, err)
        output = self.descriptors.message_class(route.method.output_type.full_name)
        document = response_json(route, output.FromString(reply), self.descriptors.pool)
        return web.Response(
            body=dumps(document),
            content_type=JSON,
            headers={"x-aimass-rpc": route.grpc_method},
        )

    async def _stream(
        self,
        request: web.Request,
        route: Route,
        payload: bytes,
        metadata: tuple[tuple[str, str], ...],
    ) -> web.StreamResponse:
        call = self.channel(route.package).unary_stream(route.grpc_method)(
            payload, metadata=metadata
        )
        output = self.descriptors.message_class(route.method.output_type.full_name)
        response: web.StreamResponse | None = None
        try:
            async for reply in call:
                if response is None:
                    response = await self._start_stream(request, route)
                line = response_json(route, output.FromString(reply), self.descriptors.pool)
                await response.write(dumps(line) + b"\n")
        except aio.AioRpcError as err:
            if response is None:
                return self._rpc_error(route, err)
            # Headers are gone: the error becomes the stream's last line.
            await response.write(dumps({"error": self._status_document(err)}) + b"\n")
        except (ConnectionResetError, OSError):
            call.cancel()
            raise
        if response is None:
            response = await self._start_stream(request, route)
        await response.write_eof()
        return response

    async def _start_stream(self, request: web.Request, route: Route) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": NDJSON, "x-aimass-rpc": route.grpc_method}
        )
        await response.prepare(request)
        return response

    def _status_document(self, err: aio.AioRpcError) -> dict[str, Any]:
        status = _rich_status(err)
        if status is None:
            return _status_body(err.code().value[0], err.details() or "")
        return json_format.MessageToDict(status, descriptor_pool=None)

    def _rpc_error(self, route: Route, err: aio.AioRpcError) -> web.Response:
        http_status = HTTP_STATUS_OF_GRPC.get(err.code(), 500)
        headers = {"x-aimass-rpc": route.grpc_method}
        retry_after = _retry_after(err)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return web.json_response(self._status_document(err), status=http_status, headers=headers)


async def _one(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


def _refuse_escape(raw_path: str) -> web.Response | None:
    if _ENCODED_SEPARATOR.search(raw_path):
        return _error(400, code_pb2.INVALID_ARGUMENT, "path: encoded '/' or '\\' is not allowed")
    segments = unquote(raw_path).split("/")
    if any(s in (".", "..") or s.startswith(("..:", ".:")) for s in segments):
        return _error(400, code_pb2.INVALID_ARGUMENT, "path: '.' and '..' segments are not allowed")
    return None


def _rich_status(err: aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _retry_after(err: aio.AioRpcError) -> int | None:
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = _rich_status(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return max(1, math.ceil(info.retry_delay.ToNanoseconds() / 1e9))
    return 1
