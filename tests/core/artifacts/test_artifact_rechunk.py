"""rechunk: the regrouping of a stream into parts that every backend relies on."""

from __future__ import annotations

import asyncio

import pytest
from artifact_support import stream_of
from hypothesis import given
from hypothesis import strategies as st

from aimass.core.artifacts.base import rechunk
from aimass.core.errors import InvalidArgument


async def regroup(chunks: list[bytes], size: int) -> list[bytes]:
    return [bytes(block) async for block in rechunk(stream_of(chunks), size)]


@given(st.lists(st.binary(max_size=50), max_size=12), st.integers(min_value=1, max_value=40))
def test_blocks_are_full_but_the_last_and_keep_every_byte_in_order(chunks, size):
    blocks = asyncio.run(regroup(chunks, size))

    assert b"".join(blocks) == b"".join(chunks)
    assert all(len(block) == size for block in blocks[:-1])
    assert all(0 < len(block) <= size for block in blocks[-1:])


async def test_memoryviews_and_bytearrays_are_accepted():
    chunks = [memoryview(b"abcd"), bytearray(b"efg")]

    assert await regroup(chunks, 3) == [b"abc", b"def", b"g"]


async def test_a_chunk_that_is_not_bytes_is_refused():
    with pytest.raises(InvalidArgument) as raised:
        await regroup(["text"], 3)
    assert raised.value.violations[0].field == "chunks"
