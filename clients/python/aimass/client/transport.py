"""Pooled grpc.aio channels, credentials, deadlines and retries for every resource."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from aimass.client.config import ClientConfig

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_BASE_DELAY_S = 0.1
_MAX_DELAY_S = 5.0


class ClientError(Exception):
    """A call that failed: the gRPC code and the server's message (names field and problem)."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method


class Transport:
    """Stubs over one channel per service process, with metadata, deadlines and retries."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._channels: dict[str, aio.Channel] = {}
        limit = config.max_message_mb * 1024 * 1024
        self._options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000),
        ]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.config.api_key),) if self.config.api_key else ()

    def stub(self, package: str, stub_class: type) -> Any:
        address = self.config.address(package)
        if address not in self._channels:
            self._channels[address] = aio.insecure_channel(address, options=self._options)
        return stub_class(self._channels[address])

    async def unary(self, method: Any, request: Any, *, timeout_s: float | None = None) -> Any:
        """Calls a unary method of a stub; retries UNAVAILABLE with jittered backoff."""
        timeout = timeout_s or self.config.timeout_s
        for attempt in range(self.config.retries + 1):
            try:
                return await method(request, metadata=self.metadata, timeout=timeout)
            except aio.AioRpcError as err:
                if err.code() not in RETRYABLE or attempt == self.config.retries:
                    raise _error(err, method) from err
                delay = min(_MAX_DELAY_S, _BASE_DELAY_S * 2**attempt)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")

    async def stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        """Messages of a server-streaming method (no deadline: watches last as long as the job)."""
        call = method(request, metadata=self.metadata)
        try:
            async for message in call:
                yield message
        except aio.AioRpcError as err:
            raise _error(err, method) from err

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _error(err: aio.AioRpcError, method: Any) -> ClientError:
    name = getattr(method, "_method", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return ClientError(err.code(), err.details() or "", name)
