"""Direct dict <-> protobuf conversion for the plain messages most requests carry.

``json_format.ParseDict`` and ``MessageToDict`` walk every field in Python
with many checks and were about a third of the gateway's time per Predict.
These converters handle the common, unambiguous shapes (strings, integers,
booleans, bytes as standard base64, nested messages and repeated fields of
those, keyed by the JSON or the proto name) and answer ``None`` for anything
else (maps, enums, floats, well-known types, nulls, a value of an unexpected
type, non-canonical base64). The caller then runs json_format itself, so
every error message and every edge case stays json_format's: the fast path
only ever produces what json_format would have produced.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import Message

_FD = descriptor.FieldDescriptor
_INT32 = (_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32)
_UINT32 = (_FD.TYPE_UINT32, _FD.TYPE_FIXED32)
_INT64 = (_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64)
_UINT64 = (_FD.TYPE_UINT64, _FD.TYPE_FIXED64)
_RANGES: dict[int, tuple[int, int]] = {
    **{kind: (-(2**31), 2**31 - 1) for kind in _INT32},
    **{kind: (0, 2**32 - 1) for kind in _UINT32},
    **{kind: (-(2**63), 2**63 - 1) for kind in _INT64},
    **{kind: (0, 2**64 - 1) for kind in _UINT64},
}
_WELL_KNOWN_PREFIX = "google.protobuf."
# A 64-bit integer as proto3 JSON writes it (a decimal string); int() alone would also take
# "+4", " 4" and "4_0", which json_format judges differently.
_DECIMAL = re.compile(r"-?[0-9]{1,20}")
# Deeper nesting is left to json_format, which refuses past its own limit (100) with an
# error rather than Python's RecursionError.
_MAX_DEPTH = 32


class _Unsupported(Exception):
    """The value needs json_format's full treatment."""


# ---- JSON dict -> message ---------------------------------------------------------------------

# Message type -> {JSON key: field}, both the lowerCamelCase and the proto name. Keyed by
# the descriptor, not its name: two pools (a descriptor set file, the generated modules)
# may define one name differently.
_KEYS: dict[descriptor.Descriptor, dict[str, descriptor.FieldDescriptor]] = {}


def _keys_of(message_type: descriptor.Descriptor) -> dict[str, descriptor.FieldDescriptor]:
    keys = _KEYS.get(message_type)
    if keys is None:
        # json_format looks a key up by JSON name first, then by proto name.
        keys = {field.name: field for field in message_type.fields}
        keys.update({field.json_name: field for field in message_type.fields})
        _KEYS[message_type] = keys
    return keys


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    message_type = field.message_type
    return message_type is not None and message_type.GetOptions().map_entry


def _scalar_from_json(field: descriptor.FieldDescriptor, value: Any) -> Any:
    kind = field.type
    if kind == _FD.TYPE_STRING:
        if type(value) is not str:
            raise _Unsupported
        return value
    if kind == _FD.TYPE_BYTES:
        # Only canonical, padded standard base64: exactly what json_format decodes the same.
        if type(value) is not str or len(value) % 4:
            raise _Unsupported
        try:
            return binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as err:
            raise _Unsupported from err
    if kind == _FD.TYPE_BOOL:
        if type(value) is not bool:
            raise _Unsupported
        return value
    bounds = _RANGES.get(kind)
    if bounds is not None and type(value) is str and _DECIMAL.fullmatch(value):
        value = int(value)
    if bounds is not None and type(value) is int and bounds[0] <= value <= bounds[1]:
        return value
    # Floats, enums, integers given as strings or out of range: json_format decides.
    raise _Unsupported


def _fill(message: Message, values: dict[str, Any], depth: int = 0) -> None:
    message_type = message.DESCRIPTOR
    if depth > _MAX_DEPTH or message_type.full_name.startswith(_WELL_KNOWN_PREFIX):
        raise _Unsupported
    keys = _keys_of(message_type)
    seen: set[str] = set()
    for key, value in values.items():
        field = keys.get(key)
        # Unknown keys, both spellings of one field, two members of one oneof, nulls:
        # json_format's errors and rules.
        if field is None or field.name in seen or value is None:
            raise _Unsupported
        seen.add(field.name)
        oneof = field.containing_oneof
        if oneof is not None:
            if f"oneof {oneof.name}" in seen:
                raise _Unsupported
            seen.add(f"oneof {oneof.name}")
        if field.type == _FD.TYPE_MESSAGE:
            if _is_map(field):
                raise _Unsupported
            if field.is_repeated:
                if type(value) is not list:
                    raise _Unsupported
                target = getattr(message, field.name)
                for item in value:
                    if type(item) is not dict:
                        raise _Unsupported
                    _fill(target.add(), item, depth + 1)
            else:
                if type(value) is not dict:
                    raise _Unsupported
                child = getattr(message, field.name)
                child.SetInParent()
                _fill(child, value, depth + 1)
        elif field.is_repeated:
            if type(value) is not list:
                raise _Unsupported
            getattr(message, field.name).extend([_scalar_from_json(field, v) for v in value])
        else:
            setattr(message, field.name, _scalar_from_json(field, value))


def message_from_dict(message_class: type[Message], values: dict[str, Any]) -> Message | None:
    """The message json_format.ParseDict would build from ``values``, or None: use it."""
    message = message_class()
    try:
        _fill(message, values)
    except (_Unsupported, TypeError, ValueError):
        # TypeError / ValueError: a value protobuf itself refuses (a lone surrogate).
        return None
    return message


# ---- message -> JSON dict ---------------------------------------------------------------------


def _scalar_to_json(field: descriptor.FieldDescriptor, value: Any) -> Any:
    kind = field.type
    if kind == _FD.TYPE_STRING or kind == _FD.TYPE_BOOL or kind in _INT32 or kind in _UINT32:
        return value
    if kind == _FD.TYPE_BYTES:
        return binascii.b2a_base64(value, newline=False).decode("ascii")
    if kind in _INT64 or kind in _UINT64:
        # proto3 JSON writes 64-bit integers as strings.
        return str(value)
    raise _Unsupported


def _document(message: Message) -> dict[str, Any]:
    if message.DESCRIPTOR.full_name.startswith(_WELL_KNOWN_PREFIX):
        raise _Unsupported
    document: dict[str, Any] = {}
    # ListFields: the set fields in field-number order, as MessageToDict walks them.
    for field, value in message.ListFields():
        if field.is_extension:
            raise _Unsupported
        if field.type == _FD.TYPE_MESSAGE:
            if _is_map(field):
                raise _Unsupported
            if field.is_repeated:
                document[field.json_name] = [_document(item) for item in value]
            else:
                document[field.json_name] = _document(value)
        elif field.is_repeated:
            document[field.json_name] = [_scalar_to_json(field, v) for v in value]
        else:
            document[field.json_name] = _scalar_to_json(field, value)
    return document


def dict_from_message(message: Message) -> dict[str, Any] | None:
    """What json_format.MessageToDict answers for ``message``, or None: use it."""
    try:
        return _document(message)
    except _Unsupported:
        return None
