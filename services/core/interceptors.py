"""The server interceptor every aimass service runs: tracing, authentication, error mapping.

One interceptor, not three, so a call pays for one wrapper. For each call it:
1. continues the caller's trace (W3C traceparent in the gRPC metadata) with a
   SERVER span named after the method;
2. asks the auth hook who the caller is and whether the method is allowed,
   and makes the principal available through :func:`current_principal`;
3. turns domain errors (aimass.core.errors) into gRPC statuses with
   google.rpc details, NotImplementedError into UNIMPLEMENTED, and anything
   else into INTERNAL with an error id that is logged with the stack trace
   (the caller never sees a trace).
Health checks and reflection bypass auth so probes work without a key.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from aimass.core import errors
from aimass.core.metrics import RpcMetrics
from aimass.core.telemetry import extract_context

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    """Who is calling: from an API key or a JWT."""

    subject: str
    role: str
    project: str = ""
    key_id: str = ""


ANONYMOUS_ADMIN = Principal(subject="anonymous", role="admin")
_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "aimass_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being served (anonymous admin when auth is off)."""
    return _principal.get() or ANONYMOUS_ADMIN


class AuthHook(Protocol):
    """Decides who a caller is and whether it may call a method."""

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        """Returns the principal, or raises Unauthenticated / PermissionDenied."""
        ...


class AllowAll:
    """Auth switched off: every caller is an anonymous admin."""

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        return ANONYMOUS_ADMIN


def _details(error: errors.AimassError) -> list[any_pb2.Any]:
    detail = any_pb2.Any()
    if isinstance(error, errors.InvalidArgument):
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
        return [detail]
    if isinstance(error, errors.ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [detail]
    return []


def to_status(error: errors.AimassError) -> grpc.Status:
    """The rich gRPC status (with google.rpc details) of a domain error."""
    code = getattr(code_pb2, error.code.name)
    proto = status_pb2.Status(code=code, message=error.message, details=_details(error))
    return rpc_status.to_status(proto)


class AimassServerInterceptor(grpc.aio.ServerInterceptor):
    """Tracing, auth and error mapping around every handler of a service."""

    def __init__(self, service: str, auth: AuthHook | None = None) -> None:
        self.service = service
        self.auth: AuthHook = auth or AllowAll()
        self.tracer = trace.get_tracer(f"aimass.{service}")
        self.metrics = RpcMetrics()
        # Wrapping a handler allocates closures and a new handler object: do it once per
        # method, not on every call (the router's Predict is hot).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, _wrap_handler(handler, method, self))
        return cached[1]

    async def before_call(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        _principal.set(await self.auth.authenticate(method, metadata))

    async def on_error(
        self, method: str, error: BaseException, context: grpc.aio.ServicerContext
    ) -> None:
        """Aborts the call with the status that matches the error."""
        span = trace.get_current_span()
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        if isinstance(error, errors.AimassError):
            span.set_attribute("rpc.grpc.status_code", error.code.value[0])
            await context.abort_with_status(to_status(error))
        if isinstance(error, NotImplementedError):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error in %s (error id %s)", method, error_id, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})")


def _code_of(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status code name an error ends the call with (for metrics)."""
    if isinstance(error, errors.AimassError):
        return error.code.name
    if isinstance(error, NotImplementedError):
        return "UNIMPLEMENTED"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "INTERNAL"


def _passthrough(error: BaseException) -> bool:
    # Aborts already carry their status; cancellation must propagate untouched.
    return isinstance(error, grpc.aio.AbortError | asyncio.CancelledError)


def _span(
    interceptor: AimassServerInterceptor, method: str, context: grpc.aio.ServicerContext
) -> Any:
    parent = extract_context(context.invocation_metadata() or ())
    return interceptor.tracer.start_as_current_span(
        method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.method": method,
            "aimass.service": interceptor.service,
        },
    )


def _wrap_unary_response(
    behavior: Callable[..., Any], method: str, interceptor: AimassServerInterceptor
) -> Callable[..., Any]:
    async def wrapped(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        with _span(interceptor, method, context):
            try:
                await interceptor.before_call(method, context)
                result = behavior(request_or_iterator, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as error:
                code = _code_of(error, context)
                if _passthrough(error):
                    raise
                await interceptor.on_error(method, error, context)
                raise
            finally:
                interceptor.metrics.observe(method, code, time.perf_counter() - started)

    return wrapped


def _wrap_stream_response(
    behavior: Callable[..., Any], method: str, interceptor: AimassServerInterceptor
) -> Callable[..., Any]:
    async def wrapped(
        request_or_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        code = "OK"
        with _span(interceptor, method, context):
            try:
                await interceptor.before_call(method, context)
                result = behavior(request_or_iterator, context)
                if inspect.isawaitable(result):
                    # A handler that writes with context.write() and returns None.
                    await result
                    return
                async for item in result:
                    yield item
            except BaseException as error:
                code = "CANCELLED" if isinstance(error, GeneratorExit) else _code_of(error, context)
                if _passthrough(error) or isinstance(error, GeneratorExit):
                    raise
                await interceptor.on_error(method, error, context)
                raise
            finally:
                interceptor.metrics.observe(method, code, time.perf_counter() - started)

    return wrapped


def _wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, interceptor: AimassServerInterceptor
) -> grpc.RpcMethodHandler:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, method, interceptor), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, method, interceptor), **kwargs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, method, interceptor), **kwargs
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream_response(handler.stream_stream, method, interceptor), **kwargs
    )
