"""Friendly dicts (YAML, JSON) <-> protobuf messages, with errors that name the key.

Config files are written by people, so enum values may be given short and in
any case (``optimizer: {type: adamw}`` for ``OPTIMIZER_TYPE_ADAMW``,
``activation: gelu`` for ``ACTIVATION_GELU``), and field names in
snake_case or lowerCamelCase. Unknown keys are refused with their path.

    config = message_from_dict({"optimizer": {"type": "sgd"}}, TrainingConfig(), "training")
    as_dict = message_to_dict(config)          # short enum names, defaults left out
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from aimass.core.errors import InvalidArgument

M = TypeVar("M", bound=Message)

# Well-known types whose JSON form json_format already handles.
_OPAQUE = {"google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"}


def enum_prefix(enum: EnumDescriptor) -> str:
    """The common prefix of an enum's value names, e.g. "OPTIMIZER_TYPE_"."""
    names = [value.name for value in enum.values]
    unspecified = [n for n in names if n.endswith("_UNSPECIFIED")]
    if unspecified:
        return unspecified[0][: -len("UNSPECIFIED")]
    return ""


def _enum_value(value: Any, enum: EnumDescriptor, path: str) -> str | int:
    if isinstance(value, bool):
        raise InvalidArgument(path, f"expected one of {short_enum_names(enum)}, got {value!r}")
    if isinstance(value, int):
        if enum.values_by_number.get(value) is None:
            raise InvalidArgument(path, f"unknown value {value}")
        return value
    if not isinstance(value, str):
        raise InvalidArgument(path, f"expected one of {short_enum_names(enum)}, got {value!r}")
    wanted = value.strip().upper().replace("-", "_")
    for candidate in (wanted, enum_prefix(enum) + wanted):
        if candidate in enum.values_by_name:
            return candidate
    raise InvalidArgument(
        path, f"unknown value {value!r}; expected one of {short_enum_names(enum)}"
    )


def short_enum_names(enum: EnumDescriptor) -> list[str]:
    """The values people may write, lower case and without the prefix."""
    prefix = enum_prefix(enum)
    return [
        v.name[len(prefix) :].lower() for v in enum.values if not v.name.endswith("_UNSPECIFIED")
    ]


def _field(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(key)
    if field is None:
        field = next((f for f in descriptor.fields if f.json_name == key), None)
    return field


def _normalize(data: Any, descriptor: Descriptor, path: str) -> dict[str, Any]:
    if descriptor.full_name in _OPAQUE:
        return data
    if not isinstance(data, Mapping):
        raise InvalidArgument(path or "(root)", f"expected a mapping, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = _field(descriptor, str(key))
        if field is None:
            known = ", ".join(sorted(f.name for f in descriptor.fields))
            raise InvalidArgument(where, f"unknown key; known keys: {known}")
        if value is None:
            continue
        out[field.name] = _normalize_value(value, field, where)
    return out


def _normalize_value(value: Any, field: FieldDescriptor, path: str) -> Any:
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        if not isinstance(value, Mapping):
            raise InvalidArgument(path, "expected a mapping")
        value_field = field.message_type.fields_by_name["value"]
        return {str(k): _scalar(v, value_field, f"{path}.{k}") for k, v in value.items()}
    if field.is_repeated:
        if not isinstance(value, list | tuple):
            raise InvalidArgument(path, f"expected a list, got {value!r}")
        return [_scalar(v, field, f"{path}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, field, path)


def _scalar(value: Any, field: FieldDescriptor, path: str) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_value(value, field.enum_type, path)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _normalize(value, field.message_type, path)
    return value


def message_from_dict(data: Mapping[str, Any] | None, message: M, path: str = "") -> M:
    """Fills ``message`` from a friendly dict; InvalidArgument names the bad key."""
    normalized = _normalize(data or {}, message.DESCRIPTOR, path)
    try:
        json_format.ParseDict(normalized, message, ignore_unknown_fields=False)
    except json_format.ParseError as err:
        raise InvalidArgument(path or "(root)", str(err)) from err
    return message


def message_to_dict(message: Message) -> dict[str, Any]:
    """The message as a dict with snake_case keys and short lower-case enum names."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _shorten(data, message.DESCRIPTOR)


def _shorten(data: Any, descriptor: Descriptor) -> Any:
    if descriptor.full_name in _OPAQUE or not isinstance(data, dict):
        return data
    for key, value in list(data.items()):
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            prefix = enum_prefix(field.enum_type)

            def short(v: Any, prefix: str = prefix) -> Any:
                return v[len(prefix) :].lower() if isinstance(v, str) else v

            data[key] = [short(v) for v in value] if isinstance(value, list) else short(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            sub = field.message_type
            data[key] = (
                [_shorten(v, sub) for v in value]
                if isinstance(value, list)
                else _shorten(value, sub)
            )
    return data
