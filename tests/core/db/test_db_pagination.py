"""Keyset pagination: every row once and in order, opaque tokens bound to their query."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from aimass.core.db.models import JobEvent, ModelVersion, RegisteredModel
from aimass.core.db.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    effective_page_size,
    paginate,
)
from aimass.core.errors import InvalidArgument

START = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def models(database):
    """23 models; create times repeat in threes so the id breaks ties."""
    with database.session() as session:
        for i in range(23):
            session.add(
                RegisteredModel(
                    name=f"m{i:02d}",
                    project="a" if i % 2 else "b",
                    create_time=START + timedelta(minutes=i // 3),
                )
            )
    return database


def all_pages(database, stmt, order, page_size):
    names, token, pages = [], "", 0
    while True:
        with database.session(read_only=True) as session:
            items, token = paginate(session, stmt, order, page_size, token)
        names.extend(item.name for item in items)
        pages += 1
        if not token:
            return names, pages


def test_pages_cover_every_row_once_in_ascending_order(models):
    order = [RegisteredModel.create_time, RegisteredModel.id]
    names, pages = all_pages(models, select(RegisteredModel), order, page_size=5)
    assert names == [f"m{i:02d}" for i in range(23)]
    assert pages == 5


def test_pages_follow_a_descending_and_mixed_order(models):
    descending = [RegisteredModel.create_time.desc(), RegisteredModel.id.desc()]
    names, _ = all_pages(models, select(RegisteredModel), descending, page_size=4)
    assert names == [f"m{i:02d}" for i in reversed(range(23))]

    # Newest first, and within one create time the lowest id first.
    mixed = [RegisteredModel.create_time.desc(), RegisteredModel.id.asc()]
    names, _ = all_pages(models, select(RegisteredModel), mixed, page_size=4)
    expected = [
        f"m{i:02d}" for group in reversed(range(8)) for i in range(3 * group, 3 * group + 3)
    ]
    assert names == [name for name in expected if int(name[1:]) < 23]


def test_a_filtered_query_pages_through_its_rows_only(models):
    stmt = select(RegisteredModel).where(RegisteredModel.project == "a")
    names, _ = all_pages(models, stmt, [RegisteredModel.name, RegisteredModel.id], page_size=3)
    assert names == [f"m{i:02d}" for i in range(1, 23, 2)]


def test_the_last_page_has_no_token(models):
    with models.session(read_only=True) as session:
        items, token = paginate(session, select(RegisteredModel), [RegisteredModel.id], 23, "")
    assert len(items) == 23
    assert token == ""


def test_rows_added_before_the_cursor_do_not_shift_later_pages(models):
    order = [RegisteredModel.create_time, RegisteredModel.id]
    with models.session(read_only=True) as session:
        first, token = paginate(session, select(RegisteredModel), order, 5, "")
    with models.session() as session:
        session.add(RegisteredModel(name="early", create_time=START - timedelta(days=1)))
    with models.session(read_only=True) as session:
        second, _ = paginate(session, select(RegisteredModel), order, 5, token)
    assert [m.name for m in first] == ["m00", "m01", "m02", "m03", "m04"]
    assert [m.name for m in second] == ["m05", "m06", "m07", "m08", "m09"]


def test_a_token_is_refused_with_another_filter_or_order(models):
    order = [RegisteredModel.name, RegisteredModel.id]
    stmt = select(RegisteredModel).where(RegisteredModel.project == "a")
    with models.session(read_only=True) as session:
        _, token = paginate(session, stmt, order, 2, "")
        other_filter = select(RegisteredModel).where(RegisteredModel.project == "b")
        with pytest.raises(InvalidArgument, match="another filter or order_by") as caught:
            paginate(session, other_filter, order, 2, token)
        assert caught.value.violations[0].field == "page_token"
        with pytest.raises(InvalidArgument, match="another filter or order_by"):
            paginate(session, stmt, [RegisteredModel.name.desc(), RegisteredModel.id], 2, token)
        # A different page size is fine (AIP-158).
        items, _ = paginate(session, stmt, order, 3, token)
    assert [m.name for m in items] == ["m05", "m07", "m09"]


def test_altered_or_garbage_tokens_are_refused(models):
    order = [RegisteredModel.name, RegisteredModel.id]
    with models.session(read_only=True) as session:
        _, token = paginate(session, select(RegisteredModel), order, 2, "")
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        payload["k"][0] = "m10"
        altered = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")

        for bad in (altered, token[:-3], "not-a-token", "e30", "!!!"):
            with pytest.raises(InvalidArgument, match="page_token: is not a page token"):
                paginate(session, select(RegisteredModel), order, 2, bad)


def test_rows_of_several_columns_come_back_as_tuples(models):
    model_id = add_versions(models)
    stmt = (
        select(RegisteredModel.name, ModelVersion.version)
        .join(ModelVersion)
        .where(RegisteredModel.id == model_id)
    )
    order = [ModelVersion.version.desc(), ModelVersion.id]
    with models.session(read_only=True) as session:
        first, token = paginate(session, stmt, order, 2, "")
        second, end = paginate(session, stmt, order, 2, token)
    assert first == [("m00", 3), ("m00", 2)]
    assert second == [("m00", 1)]
    assert end == ""


def test_page_size_zero_means_the_default_and_large_sizes_are_capped():
    assert effective_page_size(0) == DEFAULT_PAGE_SIZE == 50
    assert effective_page_size(7) == 7
    assert effective_page_size(10_000) == MAX_PAGE_SIZE == 1000


def test_a_negative_page_size_is_refused(models):
    with models.session(read_only=True) as session, pytest.raises(InvalidArgument) as caught:
        paginate(session, select(RegisteredModel), [RegisteredModel.id], -1, "")
    assert caught.value.violations[0].field == "page_size"


def test_orders_without_a_unique_last_column_are_a_programming_error(models):
    with models.session(read_only=True) as session:
        with pytest.raises(ValueError, match="primary key or unique"):
            paginate(session, select(RegisteredModel), [RegisteredModel.create_time], 5, "")
        with pytest.raises(ValueError, match="nullable"):
            paginate(session, select(ModelVersion), [ModelVersion.opset, ModelVersion.id], 5, "")


def test_aware_timestamp_keys_round_trip_through_tokens(database):
    with database.session() as session:
        for sequence in range(1, 8):
            session.add(
                JobEvent(
                    job="trainingJobs/t",
                    sequence=sequence,
                    event_time=START + timedelta(seconds=sequence // 2),
                    kind="log",
                )
            )
    order = [JobEvent.event_time, JobEvent.id]
    sequences, token = [], ""
    while True:
        with database.session(read_only=True) as session:
            items, token = paginate(session, select(JobEvent), order, 2, token)
        sequences += [event.sequence for event in items]
        if not token:
            break
    assert sequences == list(range(1, 8))


def add_versions(database) -> int:
    with database.session(read_only=True) as session:
        model = session.scalars(select(RegisteredModel).where(RegisteredModel.name == "m00")).one()
        model_id = model.id
    with database.session() as session:
        for version in (1, 2, 3):
            session.add(ModelVersion(model_id=model_id, version=version))
    return model_id
