"""A small, safe parser for the registry's list and search filters.

Grammar (AIP-160 flavoured, deliberately tiny)::

    filter     := condition ( "AND" condition )*
    condition  := field operator value
    field      := "metrics." NAME | "tags." NAME | "alias" | "model" | "owner" | "name" | "project"
                | "dataset_version"
    operator   := "=" | "!=" | ">" | ">=" | "<" | "<="
    value      := NUMBER | '"' characters, with \\" and \\\\ escapes '"'

Metrics compare with numbers; every other field compares for (in)equality with
a quoted string. The parser builds :class:`Condition` values and never SQL, so
nothing a caller types reaches the database except as a bound parameter. Each
list call says which fields it accepts; anything else is refused with
InvalidArgument("filter", "... at position N"), N counting from 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from aimass.core.errors import InvalidArgument

COMPARISONS = ("=", "!=", ">", ">=", "<", "<=")
# Fields that hold a key after the dot, and fields that stand alone.
KEYED_FIELDS = ("metrics", "tags")
# dataset_version: the lineage source, e.g. dataset_version = "datasets/d/versions/1".
VERSION_FIELDS = frozenset({"metrics", "tags", "alias", "model", "dataset_version"})
MODEL_FIELDS = frozenset({"tags", "owner", "name", "project"})
MAX_FILTER_LENGTH = 2000

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<op>>=|<=|!=|=|>|<)
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<word>[A-Za-z_][A-Za-z0-9_\-@/]*(?:\.[A-Za-z0-9_\-@/]+)?)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Condition:
    """One ``field[.key] op value`` of a filter."""

    field: str
    key: str
    op: str
    value: str | float


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def parse_filter(text: str, allowed: frozenset[str] = VERSION_FIELDS) -> list[Condition]:
    """Parses ``text`` into conditions that must all hold; "" means no condition."""
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidArgument("filter", f"is longer than {MAX_FILTER_LENGTH} characters")
    tokens = _tokenize(text)
    conditions: list[Condition] = []
    index = 0
    while index < len(tokens):
        if conditions:
            index = _expect_and(tokens, index, len(text))
        condition, index = _condition(tokens, index, allowed, len(text))
        conditions.append(condition)
    return conditions


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise InvalidArgument(
                "filter", f"unexpected character {text[position]!r} at position {position}"
            )
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), position))
        position = match.end()
    return tokens


def _expect_and(tokens: list[_Token], index: int, end: int) -> int:
    token = tokens[index]
    if token.kind != "word" or token.text != "AND":
        raise InvalidArgument(
            "filter", f"expected AND, found {token.text!r} at position {token.position}"
        )
    if index + 1 >= len(tokens):
        raise InvalidArgument("filter", f"expected a condition after AND at position {end}")
    return index + 1


def _condition(
    tokens: list[_Token], index: int, allowed: frozenset[str], end: int
) -> tuple[Condition, int]:
    field_token = tokens[index]
    field, key = _field(field_token, allowed)
    op_token = _next(tokens, index + 1, "an operator", end)
    if op_token.kind != "op":
        raise InvalidArgument(
            "filter",
            f"expected an operator ({', '.join(COMPARISONS)}), found {op_token.text!r} "
            f"at position {op_token.position}",
        )
    value_token = _next(tokens, index + 2, "a value", end)
    value = _value(field, op_token, value_token)
    return Condition(field, key, op_token.text, value), index + 3


def _next(tokens: list[_Token], index: int, what: str, end: int) -> _Token:
    if index >= len(tokens):
        raise InvalidArgument("filter", f"expected {what} at position {end}")
    return tokens[index]


def _field(token: _Token, allowed: frozenset[str]) -> tuple[str, str]:
    if token.kind != "word" or token.text == "AND":
        raise InvalidArgument(
            "filter", f"expected a field, found {token.text!r} at position {token.position}"
        )
    field, _, key = token.text.partition(".")
    if field not in allowed:
        raise InvalidArgument(
            "filter",
            f"unknown field {field!r} at position {token.position} "
            f"(known: {', '.join(sorted(allowed))})",
        )
    if field in KEYED_FIELDS and not key:
        raise InvalidArgument(
            "filter", f"{field} needs a name ({field}.<name>) at position {token.position}"
        )
    if field not in KEYED_FIELDS and key:
        raise InvalidArgument("filter", f"{field} takes no '.{key}' at position {token.position}")
    return field, key


def _value(field: str, op: _Token, token: _Token) -> str | float:
    if field == "metrics":
        if token.kind != "number":
            raise InvalidArgument(
                "filter",
                f"metrics compare with a number, found {token.text!r} at position {token.position}",
            )
        number = float(token.text)
        if not math.isfinite(number):
            raise InvalidArgument("filter", f"number out of range at position {token.position}")
        return number
    if op.text not in ("=", "!="):
        raise InvalidArgument(
            "filter",
            f"{field} supports only = and !=, found {op.text!r} at position {op.position}",
        )
    if token.kind != "string":
        raise InvalidArgument(
            "filter",
            f"{field} compares with a quoted string, found {token.text!r} "
            f"at position {token.position}",
        )
    return re.sub(r"\\(.)", r"\1", token.text[1:-1])


# ---------------------------------------------------------------- order_by


@dataclass(frozen=True)
class OrderKey:
    """One ``field[.key] [asc|desc]`` of an order_by."""

    field: str
    key: str
    descending: bool


def parse_order_by(text: str, allowed: frozenset[str]) -> OrderKey | None:
    """Parses a single-key order_by ("create_time desc", "metrics.accuracy desc");
    None when empty. The store adds a unique tie-breaker itself."""
    words = text.split()
    if not words:
        return None
    if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
        raise InvalidArgument(
            "order_by", f"expected '<field> [asc|desc]', got {text!r} (one key only)"
        )
    field, _, key = words[0].partition(".")
    if field not in allowed or (field in KEYED_FIELDS) != bool(key):
        raise InvalidArgument(
            "order_by",
            f"cannot order by {words[0]!r} (known: {', '.join(sorted(allowed))}, metrics.<name>)",
        )
    return OrderKey(field, key, len(words) == 2 and words[1].lower() == "desc")
