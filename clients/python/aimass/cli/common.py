"""What every resource command shares: channels that carry the API key, errors, JSON.

Exit codes scripts can trust: 0 success, 1 the operation failed (a gRPC error, a failed
job), 2 bad usage or configuration (a bad option, an unreadable settings file).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

from aimass.client.config import ClientConfig
from aimass.core.settings import SettingsError

EXIT_FAILED = 1
EXIT_USAGE = 2

console = Console()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor):  # fmt: skip
    """Adds ``x-api-key`` to every call (the services' interceptor reads it)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), ("x-api-key", self.key)]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, requests: Any
    ) -> Any:
        return continuation(self._with_key(details), requests)


def channel(service: str, address: str | None = None) -> grpc.Channel:
    """A channel to ``service`` (``--address`` or the configured stack's), carrying the API
    key from AIMASS_API_KEY, the client config file or the stack's admin key file."""
    try:
        config = ClientConfig.resolve()
    except (SettingsError, ValueError) as err:
        fail(str(err), EXIT_USAGE)
    limit = config.max_message_mb * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    plain = grpc.insecure_channel(address or config.address(service), options=options)
    if not config.api_key:
        return plain
    return grpc.intercept_channel(plain, _ApiKey(config.api_key))


def call(function: Callable[[Any], Any], request: Message) -> Any:
    """``function(request)``; a gRPC error ends the command with its code and message."""
    try:
        return function(request)
    except grpc.RpcError as err:
        fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Message | Any) -> None:
    """Prints a message (or plain data) as indented JSON for scripts."""
    data = as_dict(value) if isinstance(value, Message) else value
    typer.echo(json.dumps(data, indent=2, sort_keys=True))
