"""The capture queue and the Parquet it writes, without a service around them."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow.parquet as pq

from aimass.routing.prediction_log import (
    CaptureOptions,
    LoggedBatch,
    PredictionLogger,
    calls_table,
    sampled,
    write_parquet,
)
from tests.monitoring.captures import call


def test_table_has_a_row_per_sample_with_inputs_outputs_and_call_fields(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))
    calls = [
        call(a, a[:, :2] * 2, 1000.0),
        call(b, None, 1001.0, code="DEADLINE_EXCEEDED"),
    ]
    batch = write_parquet("deployments/d", calls, tmp_path / "x.parquet", dropped=4)
    table = pq.read_table(batch.path)
    assert batch.rows == table.num_rows == 5
    assert batch.dropped == 4
    assert batch.model_versions == ["models/m/versions/1"]
    assert batch.start_time.timestamp() == 1000.0
    assert batch.end_time.timestamp() == 1001.0
    inputs = np.array(table.column("inputs.input").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(inputs, np.concatenate([a, b]).astype(np.float32))
    outputs = table.column("outputs.logits").to_pylist()
    np.testing.assert_allclose(np.array(outputs[:3]), (a[:, :2] * 2).astype(np.float32))
    assert outputs[3:] == [None, None]  # a failed call has no outputs
    assert table.column("sample").to_pylist() == [0, 1, 2, 0, 1]
    assert table.column("batch_size").to_pylist() == [3, 3, 3, 2, 2]
    assert table.column("code").to_pylist() == ["OK"] * 3 + ["DEADLINE_EXCEEDED"] * 2
    assert table.column("request_id").to_pylist() == ["r1000.0"] * 3 + ["r1001.0"] * 2
    assert table.column("latency_ms").to_pylist() == [2.0] * 5


def test_calls_with_different_widths_become_a_list_column():
    table = calls_table([call(np.ones((1, 3)), None, 1.0), call(np.ones((2, 5)), None, 2.0)])
    assert [len(v) for v in table.column("inputs.input").to_pylist()] == [3, 5, 5]


async def test_a_full_queue_drops_and_counts_instead_of_waiting():
    written: list[LoggedBatch] = []

    async def sink(batch: LoggedBatch) -> None:
        written.append(batch)

    logger = PredictionLogger(sink, max_queued_calls=3)
    options = CaptureOptions(sample_rate=1.0)
    accepted = [
        logger.offer("deployments/d", options, call(np.ones((1, 2)), np.ones((1, 2)), float(i)))
        for i in range(5)
    ]
    assert accepted == [True, True, True, False, False]
    assert logger.dropped == 2
    await logger.flush()
    assert [b.rows for b in written] == [3]
    assert written[0].dropped == 2
    assert logger.written_rows == 3


async def test_queued_bytes_are_bounded_too():
    async def sink(batch: LoggedBatch) -> None:
        return None

    one = call(np.ones((64, 64)), None, 1.0)
    logger = PredictionLogger(sink, max_queued_bytes=len(one.request) * 2)
    results = [logger.offer("deployments/d", CaptureOptions(1.0), one) for _ in range(3)]
    assert results == [True, True, False]


def test_sampling_rate_bounds():
    draws = iter([0.1, 0.9])
    assert not sampled(0.0, lambda: 0.0)
    assert sampled(1.0, lambda: 0.999)
    assert sampled(0.5, lambda: next(draws))
    assert not sampled(0.5, lambda: next(draws))


async def test_calls_being_written_still_count_against_the_bound():
    release = asyncio.Event()
    written: list[LoggedBatch] = []

    async def slow_sink(batch: LoggedBatch) -> None:
        await release.wait()
        written.append(batch)

    logger = PredictionLogger(slow_sink, max_queued_calls=2)
    options = CaptureOptions(sample_rate=1.0)
    one = call(np.ones((1, 2)), np.ones((1, 2)), 1.0)
    assert logger.offer("deployments/d", options, one)
    assert logger.offer("deployments/d", options, one)
    writing = asyncio.create_task(logger.flush())
    await asyncio.sleep(0)  # the flush starts: the calls leave the queue for a batch
    assert not logger._queue
    assert not logger.offer("deployments/d", options, one)
    release.set()
    await writing
    assert [b.rows for b in written] == [2]
    assert logger.offer("deployments/d", options, one)
