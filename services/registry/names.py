"""Resource names of the registry, parsed and checked (AIP-122).

    models/{model}
    models/{model}/versions/{version}
    models/{model}/aliases/{alias}
    models/{model}/versions/{version}/releases/{release}

{model}, {alias} and {release} are 1-63 characters of lower-case letters,
digits and '-', starting with a letter; {version} is a positive decimal number.
Every error names the request field it came from.
"""

from __future__ import annotations

import re

from aimass.core.errors import InvalidArgument

ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
_ID_RULE = "1-63 lower-case letters, digits or '-', starting with a letter"
_MAX_VERSION = 2**31 - 1


def check_id(value: str, field: str, what: str = "id") -> str:
    """``value`` when it is a valid resource id, else InvalidArgument naming ``field``."""
    if not ID_PATTERN.match(value):
        raise InvalidArgument(field, f"{what} {value!r} is not valid: use {_ID_RULE}")
    return value


def _parts(name: str, field: str, shape: str, count: int) -> list[str]:
    parts = name.split("/")
    labels = shape.split("/")[0::2]
    if len(parts) != count or [p for p in parts[0::2]] != labels:
        raise InvalidArgument(field, f"{name!r} is not a resource name of the form {shape!r}")
    return parts


def _number(value: str, field: str) -> int:
    if not value.isdigit() or value.startswith("0") or int(value) > _MAX_VERSION:
        raise InvalidArgument(field, f"version {value!r} is not a positive version number")
    return int(value)


def parse_model_name(name: str, field: str = "name") -> str:
    """'models/{model}' -> model id."""
    parts = _parts(name, field, "models/{model}", 2)
    return check_id(parts[1], field, "model id")


def parse_version_name(name: str, field: str = "name") -> tuple[str, int]:
    """'models/{model}/versions/{version}' -> (model id, version number)."""
    parts = _parts(name, field, "models/{model}/versions/{version}", 4)
    return check_id(parts[1], field, "model id"), _number(parts[3], field)


def parse_alias_name(name: str, field: str = "name") -> tuple[str, str]:
    """'models/{model}/aliases/{alias}' -> (model id, alias)."""
    parts = _parts(name, field, "models/{model}/aliases/{alias}", 4)
    return check_id(parts[1], field, "model id"), check_id(parts[3], field, "alias")


def parse_release_name(name: str, field: str = "name") -> tuple[str, int, str]:
    """'models/{model}/versions/{version}/releases/{release}' -> (model, version, release)."""
    parts = _parts(name, field, "models/{model}/versions/{version}/releases/{release}", 6)
    return (
        check_id(parts[1], field, "model id"),
        _number(parts[3], field),
        check_id(parts[5], field, "release id"),
    )
