"""The filter and order_by parser of list and search calls."""

from __future__ import annotations

import pytest

from aimass.core.errors import InvalidArgument
from aimass.registry.filters import (
    MODEL_FIELDS,
    VERSION_FIELDS,
    Condition,
    OrderKey,
    parse_filter,
    parse_order_by,
)


def test_parses_conditions_joined_by_and() -> None:
    parsed = parse_filter(
        'metrics.accuracy >= 0.95 AND tags.stage = "qa \\"x\\"" AND alias = "production" '
        'AND model = "digits" AND metrics.ndcg@10 < 1e-1'
    )
    assert parsed == [
        Condition("metrics", "accuracy", ">=", 0.95),
        Condition("tags", "stage", "=", 'qa "x"'),
        Condition("alias", "", "=", "production"),
        Condition("model", "", "=", "digits"),
        Condition("metrics", "ndcg@10", "<", 0.1),
    ]
    assert parse_filter("") == []
    assert parse_filter("   ") == []
    assert parse_filter('owner = "ana"', MODEL_FIELDS) == [Condition("owner", "", "=", "ana")]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("metrics.accuracy >= high", "position 20"),
        ('metrics.accuracy >= "0.9"', "position 20"),
        ("metrics >= 1", "metrics needs a name"),
        ('tags.stage > "a"', "position 11"),
        ('alias = "a" OR model = "b"', "expected AND, found 'OR' at position 12"),
        ('alias = "a" AND', "expected a condition after AND"),
        ("alias =", "expected a value at position 7"),
        ('size = "1"', "unknown field 'size' at position 0"),
        ("alias = 'x'", 'unexpected character "\'" at position 8'),
        ('alias "x"', "expected an operator"),
        ('alias.x = "x"', "alias takes no '.x'"),
        ("metrics.a = 1; DROP TABLE model_versions", "position 13"),
    ],
)
def test_bad_filters_name_the_position(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text, VERSION_FIELDS)
    assert info.value.violations[0].field == "filter"
    assert problem in info.value.message


def test_order_by() -> None:
    fields = frozenset({"create_time", "version", "metrics"})
    assert parse_order_by("", fields) is None
    assert parse_order_by("metrics.accuracy desc", fields) == OrderKey("metrics", "accuracy", True)
    assert parse_order_by("version", fields) == OrderKey("version", "", False)
    for bad in ("version up", "owner", "metrics desc", "a b c"):
        with pytest.raises(InvalidArgument, match="order_by"):
            parse_order_by(bad, fields)
