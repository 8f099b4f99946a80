"""In-process unary calls: a gateway co-located with a service calls its handlers directly.

grpc-gateway's ``RegisterXHandlerServer`` for aimass. When the REST gateway runs
inside a service's process (see :func:`aimass.gateway.server.start_co_located_gateway`),
the unary-unary methods that process serves are called here, not over a channel:

    payload bytes -> request_deserializer -> the *wrapped* handler (auth hook,
    project scoping, rate limit, SERVER span, RPC metrics, error mapping: the
    wrapper every network call gets) -> response_serializer -> bytes

with a :class:`LocalContext` standing for the ServicerContext. A call that ends
in an error raises ``grpc.aio.AioRpcError`` with the code, details and trailing
metadata (google.rpc status details, RetryInfo) a network caller would see, so
the gateway maps it to HTTP exactly as it maps a remote error. Streaming methods
stay on the network.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import grpc
from grpc import aio

Metadata = Sequence[tuple[str, str | bytes]]
_OK = grpc.StatusCode.OK


class UnaryCall(Protocol):
    """What the gateway awaits for a unary RPC: a grpc.aio multicallable, or a local call."""

    def __call__(
        self, request: bytes, *, metadata: Metadata | None = ..., timeout: float | None = ...
    ) -> Awaitable[bytes]: ...


class HandlerLookup(Protocol):
    """Finds the wrapped handler a server runs for a method (InterceptedRegistration)."""

    def handler(self, method: str) -> grpc.RpcMethodHandler | None: ...


class LocalContext:
    """The ServicerContext of an in-process call: what the wrappers and handlers use."""

    __slots__ = ("_aborted", "_code", "_deadline", "_details", "_metadata", "_trailing")

    def __init__(self, metadata: Metadata, deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()
        self._aborted = False

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def peer(self) -> str:
        return "local"

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self._aborted

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        """Ends the call with ``code``; raises AbortError like grpc.aio's context."""
        if self._aborted:
            raise aio.UsageError("abort was already called")
        if code == _OK:
            # grpc.aio sends OK-with-abort as UNKNOWN too: an abort is never a success.
            code = grpc.StatusCode.UNKNOWN
        self._aborted = True
        self._code = code
        self._details = details or self._details
        self._trailing = tuple(trailing_metadata) or self._trailing
        raise aio.AbortError("Locally aborted.")

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        # No headers travel in process; the gateway answers its own.
        return None

    def set_compression(self, compression: grpc.Compression) -> None:
        return None

    def disable_next_message_compression(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def error(self) -> aio.AioRpcError:
        """The error a network caller would get for this context's status."""
        code = self._code if self._code is not None else grpc.StatusCode.UNKNOWN
        return rpc_error(code, self._details, self._trailing)


def rpc_error(code: grpc.StatusCode, details: str, trailing: Metadata = ()) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailing), details=details)


class LocalUnaryCall:
    """A unary-unary method of this process, awaited like ``channel.unary_unary(method)``."""

    def __init__(self, method: str, handler: grpc.RpcMethodHandler) -> None:
        if handler.unary_unary is None:
            raise ValueError(f"{method}: only unary-unary methods are called in process")
        self.method = method
        self._behavior: Callable[[Any, Any], Any] = handler.unary_unary
        self._deserialize = handler.request_deserializer
        self._serialize = handler.response_serializer
        # Calls made in process: what proves a REST call did not cross the network.
        self.calls = 0

    async def __call__(
        self,
        request: bytes,
        *,
        metadata: Metadata | None = None,
        # The multicallable's signature, so the gateway awaits either kind the same way.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> bytes:
        self.calls += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        context = LocalContext(metadata or (), deadline)
        try:
            message = request if self._deserialize is None else self._deserialize(request)
        except Exception as err:
            # What grpc answers a request it cannot parse.
            raise rpc_error(grpc.StatusCode.INTERNAL, "Exception deserializing request!") from err
        try:
            async with asyncio.timeout(timeout):
                reply = self._behavior(message, context)
                if inspect.isawaitable(reply):
                    reply = await reply
        except aio.AbortError as err:
            raise context.error() from err
        except TimeoutError as err:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from err
        except Exception as err:
            # The wrapper maps every error to an abort; an unwrapped handler's error is
            # what grpc reports for an exception in a method handler.
            raise rpc_error(
                grpc.StatusCode.UNKNOWN, f"Unexpected error: {type(err).__name__}"
            ) from err
        if context.code() not in (None, _OK):
            raise context.error()
        return reply if self._serialize is None else self._serialize(reply)


def local_calls(lookup: HandlerLookup, methods: Iterable[str]) -> dict[str, LocalUnaryCall]:
    """In-process calls for those of ``methods`` this process serves as unary-unary."""
    calls: dict[str, LocalUnaryCall] = {}
    for method in methods:
        handler = lookup.handler(method)
        if handler is not None and handler.unary_unary is not None:
            calls[method] = LocalUnaryCall(method, handler)
    return calls
