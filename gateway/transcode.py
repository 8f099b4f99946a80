"""HTTP/JSON <-> protobuf for one route: body, path variables, query parameters, statuses.

Request: the body (all of it for ``body: "*"``, one field for ``body: "f"``)
is parsed as proto3 JSON (unknown fields are refused), then path variables
and query parameters set the fields they name (``?page_size=10``,
``?a.b=x``, a repeated field by repeating the parameter). Response: proto3
JSON with lowerCamelCase names, the ``response_body`` field when the rule
names one. Errors: the gRPC status -> HTTP status table of Envoy's
grpc_json_transcoder, and a google.rpc.Status JSON body.

JSON is read and written with orjson; plain messages (Predict's tensors and
base64 bytes) go to and from protobuf through :mod:`aimass.gateway.fastpath`,
anything it declines through json_format, so results and errors are the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc
import orjson
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from aimass.gateway.fastpath import dict_from_message, message_from_dict
from aimass.gateway.routes import Route

# Envoy's grpc_json_transcoder / grpc-gateway mapping (google/rpc/code.proto comments).
HTTP_STATUS_OF_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class BadRequest(Exception):
    """The HTTP request cannot become the RPC's request: 400 (or ``status``)."""

    def __init__(self, message: str, field: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: several times faster than json.dumps)."""
    return orjson.dumps(document)


def parse_json(raw: bytes) -> Any:
    """JSON, or BadRequest naming the line, column and offset of the first error."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is stricter (UTF-8 only, 64-bit integers, no NaN) and words its errors
        # differently: the standard parser decides, so what is accepted and every error
        # message stay as they were.
        pass
    try:
        return json.loads(raw)
    except UnicodeDecodeError as err:
        raise BadRequest(f"malformed JSON: not UTF-8 at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise BadRequest(
            f"malformed JSON at line {err.lineno} column {err.colno} (char {err.pos}): {err.msg}"
        ) from err


def _field_by_path(message_type: descriptor.Descriptor, path: str) -> descriptor.FieldDescriptor:
    current = message_type
    found: descriptor.FieldDescriptor | None = None
    for part in path.split("."):
        if current is None:
            raise BadRequest(f"{path}: not a field of {message_type.full_name}", path)
        found = current.fields_by_name.get(part) or current.fields_by_camelcase_name.get(part)
        if found is None:
            raise BadRequest(f"{path}: no such field in {message_type.full_name}", path)
        current = found.message_type
    assert found is not None
    return found


def _scalar(field: descriptor.FieldDescriptor, value: str, name: str) -> Any:
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise BadRequest(f"{name}: must be true or false, got {value!r}", name)
    if field.cpp_type in (
        descriptor.FieldDescriptor.CPPTYPE_FLOAT,
        descriptor.FieldDescriptor.CPPTYPE_DOUBLE,
    ):
        try:
            return float(value)
        except ValueError as err:
            raise BadRequest(f"{name}: must be a number, got {value!r}", name) from err
    # Integers, strings, bytes, enums and well-known types (Timestamp, FieldMask): proto3
    # JSON takes their string form.
    return value


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise BadRequest(f"{path}: conflicts with a value already set", path)
        target = node
    target[parts[-1]] = value


def build_request(
    route: Route,
    message_class: type[Message],
    body: bytes,
    bound: dict[str, str],
    query: Iterable[tuple[str, str]],
) -> Message:
    """The RPC's request message from the HTTP request's parts."""
    request = message_class()
    message_type = request.DESCRIPTOR
    values: dict[str, Any] = {}
    if route.body and body.strip():
        document = parse_json(body)
        if route.body == "*":
            if not isinstance(document, dict):
                raise BadRequest("body: must be a JSON object")
            values = document
        else:
            _field_by_path(message_type, route.body)
            _set_path(values, route.body, document)
    elif body.strip() and not route.body:
        raise BadRequest(f"{route.http_method} {route.template} takes no body")
    taken = {route.body.split(".")[0]} if route.body and route.body != "*" else set()
    for name, raw in query:
        if route.body == "*":
            raise BadRequest(f"{name}: query parameters are not accepted here (body is '*')", name)
        field = _field_by_path(message_type, name)
        if name.split(".")[0] in taken:
            raise BadRequest(f"{name}: is bound by the body, not a query parameter", name)
        value = _scalar(field, raw, name)
        if field.is_repeated:
            existing = _get_path(values, name)
            _set_path(values, name, [*(existing or []), value])
        else:
            _set_path(values, name, value)
    for path, value in bound.items():
        _set_path(values, path, value)
    built = message_from_dict(message_class, values)
    if built is not None:
        return built
    try:
        json_format.ParseDict(values, request, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise BadRequest(f"invalid request: {err}") from err
    return request


def _get_path(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def response_json(route: Route, message: Message, pool: Any) -> dict[str, Any]:
    """The response as proto3 JSON (the response_body field when the rule names one)."""
    document = dict_from_message(message)
    if document is None:
        document = json_format.MessageToDict(message, descriptor_pool=pool)
    if route.response_body:
        field = message.DESCRIPTOR.fields_by_name[route.response_body]
        return document.get(field.json_name)  # type: ignore[return-value]
    return document
