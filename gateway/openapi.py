"""An OpenAPI 3 document of every REST route, generated from the same descriptors.

Path templates become OpenAPI paths with one parameter per resource-id
segment, named after the collection before it, as Google's discovery
documents do: ``/v1/{name=models/*/versions/*}`` ->
``/v1/models/{modelsId}/versions/{versionsId}``. Messages become component
schemas in proto3 JSON form (lowerCamelCase, int64 as string).
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor

from aimass.gateway.routes import Route

_FD = descriptor.FieldDescriptor
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}")
_SCALARS: dict[int, dict[str, Any]] = {
    _FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _FD.TYPE_FLOAT: {"type": "number", "format": "float"},
    _FD.TYPE_INT64: {"type": "string", "format": "int64"},
    _FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    _FD.TYPE_SINT64: {"type": "string", "format": "int64"},
    _FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    _FD.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    _FD.TYPE_INT32: {"type": "integer", "format": "int32"},
    _FD.TYPE_UINT32: {"type": "integer", "format": "int64"},
    _FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _FD.TYPE_FIXED32: {"type": "integer", "format": "int64"},
    _FD.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _FD.TYPE_BOOL: {"type": "boolean"},
    _FD.TYPE_STRING: {"type": "string"},
    _FD.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string", "example": "description,tags"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}},
}


def openapi_path(template: str) -> tuple[str, list[tuple[str, str]]]:
    """(OpenAPI path, [(parameter, bound field)]) of a google.api.http template."""
    parameters: list[tuple[str, str]] = []

    def expand(match: re.Match[str]) -> str:
        field, pattern = match.group(1), match.group(2) or "*"
        parts = pattern.split("/")
        out = []
        for index, part in enumerate(parts):
            if part in ("*", "**"):
                before = parts[index - 1] if index else field.replace(".", "_")
                name = f"{before}Id"
                parameters.append((name, field))
                out.append(f"{{{name}}}")
            else:
                out.append(part)
        return "/".join(out)

    return _VARIABLE.sub(expand, template), parameters


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder: recursive messages
            self.components[message.full_name] = self._object(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _object(self, message: descriptor.Descriptor) -> dict[str, Any]:
        properties = {field.json_name: self._field(field) for field in message.fields}
        return {"type": "object", "properties": properties}

    def _field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.type == _FD.TYPE_MESSAGE:
            return self.ref(field.message_type)
        if field.type == _FD.TYPE_ENUM:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        return dict(_SCALARS[field.type])


def _operation(route: Route, schemas: _Schemas, parameters: list[tuple[str, str]]) -> dict:
    operation: dict[str, Any] = {
        "operationId": f"{route.service.name}_{route.method.name}",
        "tags": [route.service.full_name],
        "x-grpc-method": route.grpc_method,
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": f"part of {field}",
            }
            for name, field in parameters
        ],
    }
    if route.body:
        message = route.method.input_type
        schema = (
            schemas.ref(message)
            if route.body == "*"
            else schemas._single(message.fields_by_name[route.body])
        )
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    response_type = "application/x-ndjson" if route.server_streaming else "application/json"
    operation["responses"] = {
        "200": {
            "description": "OK" + (" (one JSON object per line)" if route.server_streaming else ""),
            "content": {response_type: {"schema": schemas.ref(route.method.output_type)}},
        },
        "default": {
            "description": "Error: a google.rpc.Status",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}
            },
        },
    }
    return operation


def openapi_document(routes: list[Route], title: str = "aimass") -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    schemas = _Schemas()
    schemas.components["google.rpc.Status"] = {
        "type": "object",
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in sorted(routes, key=lambda r: (r.template, r.http_method)):
        path, parameters = openapi_path(route.template)
        paths.setdefault(path, {})[route.http_method.lower()] = _operation(
            route, schemas, parameters
        )
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "v1"},
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
    }
