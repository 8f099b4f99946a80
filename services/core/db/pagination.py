"""Keyset pagination with opaque page tokens (AIP-158).

A page token is base64url of JSON holding the sort key of the last row
returned, a digest of the query it belongs to, and a checksum of both. The
next page starts strictly after that key, so rows inserted or deleted between
calls never shift a page (offsets do), and each page costs an index range scan
however deep it is.

A token is refused with InvalidArgument("page_token", ...) when it was not
issued by this code, was altered, or is sent with another filter or order_by
than the one it came from. The checksum protects against accidents, not
attackers: a token only says where to resume; what a caller may see is
decided by the query's own filters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, ColumnElement, Select, and_, false, or_
from sqlalchemy.orm import Session
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression

from aimass.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_TOKEN_VERSION = 1


def effective_page_size(page_size: int) -> int:
    """0 means the default; more than the maximum is capped; negative is refused."""
    if page_size < 0:
        raise InvalidArgument("page_size", f"must be 0 or more, got {page_size}")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def paginate(
    session: Session,
    stmt: Select[Any],
    order_columns: Sequence[ColumnElement[Any]],
    page_size: int,
    page_token: str,
) -> tuple[list[Any], str]:
    """One page of ``stmt`` ordered by ``order_columns``, and the token of the next page.

    ``stmt`` is the filtered query without ORDER BY or LIMIT. ``order_columns``
    are columns, each optionally wrapped in ``.desc()``/``.asc()``; together
    they must order rows totally, so the last one must be unique (a primary
    key). Nullable columns cannot be keys (NULL compares with nothing).
    Items are ORM objects when ``stmt`` selects one entity or column, rows
    otherwise. The next token is "" on the last page.
    """
    size = effective_page_size(page_size)
    keys = [_OrderKey.of(column) for column in order_columns]
    _require_total_order(keys)
    digest = _query_digest(session, stmt, keys)
    query = stmt.order_by(*(key.ordering() for key in keys))
    if page_token:
        after = _decode(page_token, digest, len(keys))
        query = query.where(_after(keys, after))
    labelled = [key.column.label(f"_page_key_{i}") for i, key in enumerate(keys)]
    rows = session.execute(query.add_columns(*labelled).limit(size + 1)).all()
    width = len(rows[0]) - len(keys) if rows else 0
    page = rows[:size]
    items = [row[0] if width == 1 else tuple(row[:width]) for row in page]
    if len(rows) <= size:
        return items, ""
    last_key = list(page[-1][width:])
    return items, _encode(last_key, digest)


class _OrderKey:
    """One ORDER BY column and its direction."""

    def __init__(self, column: ColumnElement[Any], descending: bool) -> None:
        self.column = column
        self.descending = descending

    @classmethod
    def of(cls, element: ColumnElement[Any]) -> _OrderKey:
        expression = getattr(element, "__clause_element__", lambda: element)()
        if isinstance(expression, UnaryExpression) and expression.modifier in (
            operators.desc_op,
            operators.asc_op,
        ):
            return cls(expression.element, expression.modifier is operators.desc_op)
        return cls(expression, False)

    def ordering(self) -> ColumnElement[Any]:
        return self.column.desc() if self.descending else self.column.asc()

    def after(self, value: Any) -> ColumnElement[bool]:
        return self.column < value if self.descending else self.column > value


def _require_total_order(keys: list[_OrderKey]) -> None:
    if not keys:
        raise ValueError("paginate needs at least one order column")
    for key in keys:
        if isinstance(key.column, Column) and key.column.nullable:
            raise ValueError(f"order column {key.column} is nullable: it cannot be a page key")
    last = keys[-1].column
    if not (isinstance(last, Column) and (last.primary_key or last.unique)):
        raise ValueError(f"the last order column ({last}) must be a primary key or unique")


def _after(keys: list[_OrderKey], values: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``keys``:
    k1 > v1 OR (k1 = v1 AND k2 > v2) OR ... (direction per key)."""
    clauses: list[ColumnElement[bool]] = []
    for i, key in enumerate(keys):
        equal_before = [keys[j].column == values[j] for j in range(i)]
        clauses.append(and_(*equal_before, key.after(values[i])))
    return or_(false(), *clauses)


def _query_digest(session: Session, stmt: Select[Any], keys: list[_OrderKey]) -> str:
    """Digest of the SQL and parameters of the query and its order: what a token belongs to."""
    ordered = stmt.order_by(*(key.ordering() for key in keys))
    compiled = ordered.compile(bind=session.get_bind())
    params = sorted((name, repr(value)) for name, value in compiled.params.items())
    text = json.dumps([compiled.string, params])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checksum(digest: str, key: list[Any]) -> str:
    body = json.dumps([_TOKEN_VERSION, digest, key], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _encode(values: list[Any], digest: str) -> str:
    key = [_to_json(value) for value in values]
    token = {"v": _TOKEN_VERSION, "q": digest, "k": key, "c": _checksum(digest, key)}
    raw = json.dumps(token, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str, digest: str, width: int) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        key, query, check = data["k"], data["q"], data["c"]
        if data["v"] != _TOKEN_VERSION or not isinstance(key, list) or len(key) != width:
            raise ValueError("unexpected token layout")
        if check != _checksum(query, key):
            raise ValueError("checksum mismatch")
        values = [_from_json(value) for value in key]
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InvalidArgument(
            "page_token", "is not a page token this server issued (altered or truncated?)"
        ) from err
    if query != digest:
        raise InvalidArgument(
            "page_token",
            "was issued for another filter or order_by: send the same ones, "
            "or start again without a page_token",
        )
    return values


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"dt": value.isoformat()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} in a page token")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return datetime.fromisoformat(value["dt"])
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a page token")
