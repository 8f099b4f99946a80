"""gRPC channels from one service to another (and from workers to services).

Services never import each other's code; they call each other's gRPC API.
``ServiceChannels`` keeps one pooled ``grpc.aio`` channel per target service,
with the message-size limits of the settings and a client interceptor that
carries the current trace context (W3C ``traceparent``) and, when set, the
caller's credentials in the metadata, so one trace spans service hops.

    channels = ServiceChannels(settings)
    registry = registry_pb2_grpc.RegistryServiceStub(channels.get("registry"))
    ...
    await channels.close()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc import aio

from aimass.core.settings import Settings
from aimass.core.telemetry import inject_headers


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments shared by every internal client: message limits and keepalive."""
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


class _MetadataInterceptor:
    """Adds trace headers and static credentials to every outgoing call (through the
    per-kind subclasses below)."""

    def __init__(self, credentials: Callable[[], Mapping[str, str]] | None) -> None:
        self._credentials = credentials

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        for key, value in inject_headers().items():
            metadata[key] = value
        if self._credentials is not None:
            for key, value in self._credentials().items():
                metadata[key] = value
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        return await continuation(self._details(details), requests)


# grpc.aio files each interceptor under the first kind it is an instance of (an elif
# chain in grpc/aio/_channel.py), so one class with all three bases would only ever see
# unary-unary calls and streaming calls would go out without credentials: one per kind.
class _UnaryUnaryMetadata(_MetadataInterceptor, aio.UnaryUnaryClientInterceptor):
    pass


class _UnaryStreamMetadata(_MetadataInterceptor, aio.UnaryStreamClientInterceptor):
    pass


class _StreamUnaryMetadata(_MetadataInterceptor, aio.StreamUnaryClientInterceptor):
    pass


def metadata_interceptors(
    credentials: Callable[[], Mapping[str, str]] | None = None,
) -> list[aio.ClientInterceptor]:
    """Interceptors that send the trace context and ``credentials()`` with every call.

    grpc.aio applies an interceptor to one call kind only, so there is one per kind.
    """
    kinds = (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata)
    return [kind(credentials) for kind in kinds]


def open_channel(
    address: str,
    settings: Settings,
    credentials: Callable[[], Mapping[str, str]] | None = None,
) -> aio.Channel:
    """One insecure ``grpc.aio`` channel to ``address`` with the internal interceptor."""
    return aio.insecure_channel(
        address, options=channel_options(settings), interceptors=metadata_interceptors(credentials)
    )


class ServiceChannels:
    """One lazily opened channel per aimass service, addressed through the settings.

    ``addresses`` overrides ``settings.service_address(name)`` (tests that bind
    port 0 pass the real ports here). ``credentials`` returns metadata to send
    with each call, such as ``{"x-api-key": ...}`` for an internal key.
    """

    def __init__(
        self,
        settings: Settings,
        addresses: Mapping[str, str] | None = None,
        credentials: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self._settings = settings
        self._addresses = dict(addresses or {})
        self._credentials = credentials
        self._channels: dict[str, aio.Channel] = {}

    def address(self, service: str) -> str:
        return self._addresses.get(service) or self._settings.service_address(service)

    def get(self, service: str) -> aio.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(
                self.address(service), self._settings, self._credentials
            )
        return self._channels[service]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def is_retryable(err: grpc.RpcError) -> bool:
    """True for codes where the same call may succeed on a retry (the server was away)."""
    code = err.code() if isinstance(err, aio.AioRpcError | grpc.Call) else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
