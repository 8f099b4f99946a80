"""Prediction logging: a sample of Predict calls captured, batched into Parquet, announced.

A deployment's ``serving_config.prediction_logging.sample_rate`` picks the share
of Predict calls that are captured (router path only: the SDK's fast path calls
Triton directly and is never captured). The request path pays for one random
draw and, when the call is sampled, one append of references to the request
and response bytes to a bounded queue (no parsing, no copy). A full queue
(``max_queued_calls`` calls or ``max_queued_bytes`` bytes) drops the sample and
counts it: Predict never waits for logging. The bounds cover every call held,
queued or in a file not yet written, so memory stays bounded while the
artifact store is slow.

A background task drains the queue per deployment into a Parquet file of at
most ``calls_per_file`` calls or ``flush_interval`` of age, decoded and written in a
worker thread, stores it in the artifact store under
``predictions/<deployment>/<date>/<time>-<id>.parquet``, and records it with an
``aimass.routing.predictions.logged`` event (outbox: the row and the event
commit together). Columns, one row per sample of a call's batch:

    time          timestamp[us, UTC]  when the call ended
    request_id    string              x-request-id of the call, else a generated one
    model_version string              the version that answered
    latency_ms    float64             router latency of the whole call
    code          string              OK or the gRPC status name of a failed call
    sample        int32               the row's index in its call's batch (0: first)
    batch_size    int32               rows of the call
    inputs.<name>  list<...>           the sample's input tensor, flattened
    outputs.<name> list<...>           the sample's output, null for a failed call
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.wire import NUMPY_TYPES, tensor_to_numpy

log = logging.getLogger(__name__)

TOPIC_LOGGED = "aimass.routing.predictions.logged"
DEFAULT_CALLS_PER_FILE = 10_000
DEFAULT_FLUSH_S = 10.0
MAX_QUEUED_CALLS = 20_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class CaptureOptions:
    """A deployment's capture settings, read from its serving config."""

    sample_rate: float = 0.0
    calls_per_file: int = DEFAULT_CALLS_PER_FILE
    flush_interval_s: float = DEFAULT_FLUSH_S

    @classmethod
    def from_proto(cls, config: pb.PredictionLogging) -> CaptureOptions:
        flush = (
            config.flush_interval.ToTimedelta().total_seconds()
            if config.HasField("flush_interval")
            else DEFAULT_FLUSH_S
        )
        return cls(
            sample_rate=config.sample_rate,
            calls_per_file=config.calls_per_file or DEFAULT_CALLS_PER_FILE,
            flush_interval_s=flush or DEFAULT_FLUSH_S,
        )


@dataclass(frozen=True)
class Captured:
    """One sampled call, as references to its bytes: nothing is parsed on the request path."""

    time: float
    request_id: str
    model_version: str
    latency_s: float
    code: str
    request: bytes
    response: bytes | None


@dataclass(frozen=True)
class LoggedBatch:
    """A Parquet file of one deployment's captured calls, before it is stored."""

    deployment: str
    path: Path
    rows: int
    start_time: datetime
    end_time: datetime
    model_versions: list[str]
    dropped: int


# Stores a written batch (artifact + row + event); the routing service's own sink is
# :class:`aimass.routing.prediction_sink.ArtifactSink`.
Sink = Callable[[LoggedBatch], Awaitable[None]]


@dataclass
class _Pending:
    options: CaptureOptions
    calls: list[Captured] = field(default_factory=list)
    size: int = 0
    first_time: float = 0.0
    dropped: int = 0


class PredictionLogger:
    """The bounded capture queue and the task that turns it into Parquet files."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_queued_calls: int = MAX_QUEUED_CALLS,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        tick_s: float = 0.25,
    ) -> None:
        self.sink = sink
        self.max_queued_calls = max_queued_calls
        self.max_queued_bytes = max_queued_bytes
        self.tick_s = tick_s
        self._queue: deque[tuple[str, CaptureOptions, Captured, int]] = deque()
        # Calls and bytes held: queued, or batched and not yet written.
        self._held_calls = 0
        self._held_bytes = 0
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Totals since start, for metrics and tests.
        self.captured = 0
        self.dropped = 0
        self.written_rows = 0
        self.failed_batches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Writes what is queued, then stops."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    def offer(self, deployment: str, options: CaptureOptions, call: Captured) -> bool:
        """Queues a sampled call; False (and counted) when the queue is full. Never blocks."""
        size = len(call.request) + (len(call.response) if call.response else 0)
        if (
            self._held_calls >= self.max_queued_calls
            or self._held_bytes + size > self.max_queued_bytes
        ):
            self.dropped += 1
            pending = self._pending.get(deployment)
            if pending is None:
                pending = self._pending[deployment] = _Pending(options)
            pending.dropped += 1
            return False
        self._queue.append((deployment, options, call, size))
        self._held_calls += 1
        self._held_bytes += size
        self.captured += 1
        if len(self._queue) >= 256:
            self._wake.set()
        return True

    async def flush(self) -> None:
        """Moves the queue into batches and writes every non-empty one now (tests, close)."""
        self._drain_queue()
        for deployment in list(self._pending):
            await self._write(deployment)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            self._drain_queue()
            now = time.time()
            for deployment, pending in list(self._pending.items()):
                full = (
                    len(pending.calls) >= pending.options.calls_per_file
                    or pending.size >= self.max_queued_bytes // 2
                )
                old = pending.calls and now - pending.first_time >= pending.options.flush_interval_s
                if full or old:
                    await self._write(deployment)

    def _drain_queue(self) -> None:
        while self._queue:
            deployment, options, call, size = self._queue.popleft()
            pending = self._pending.get(deployment)
            if pending is None:
                pending = self._pending[deployment] = _Pending(options)
            pending.options = options
            if not pending.calls:
                pending.first_time = call.time
            pending.calls.append(call)
            pending.size += size

    async def _write(self, deployment: str) -> None:
        pending = self._pending.pop(deployment, None)
        if pending is None or not pending.calls:
            if pending is not None and pending.dropped:
                # Keep counting drops until there is a file to report them in.
                self._pending[deployment] = pending
            return
        try:
            with tempfile.TemporaryDirectory(prefix="aimass-predlog-") as folder:
                path = Path(folder) / "batch.parquet"
                batch = await asyncio.to_thread(
                    write_parquet, deployment, pending.calls, path, pending.dropped
                )
                await self.sink(batch)
            self.written_rows += batch.rows
        except Exception:
            # Losing a batch must never take the router down; it is logged and counted.
            self.failed_batches += 1
            log.exception("%s: writing %d captured calls failed", deployment, len(pending.calls))
        finally:
            self._held_calls -= len(pending.calls)
            self._held_bytes -= pending.size


def sampled(rate: float, draw: Callable[[], float]) -> bool:
    return rate >= 1.0 or (rate > 0.0 and draw() < rate)


# ---- decoding (worker thread) -----------------------------------------------------------


def write_parquet(
    deployment: str, calls: list[Captured], path: Path, dropped: int = 0
) -> LoggedBatch:
    """Decodes captured calls into one table (a row per sample) and writes it to ``path``."""
    table = calls_table(calls)
    pq.write_table(table, path, compression="zstd")
    times = [c.time for c in calls]
    return LoggedBatch(
        deployment=deployment,
        path=path,
        rows=table.num_rows,
        start_time=datetime.fromtimestamp(min(times), UTC),
        end_time=datetime.fromtimestamp(max(times), UTC),
        model_versions=sorted({c.model_version for c in calls}),
        dropped=dropped,
    )


def calls_table(calls: list[Captured]) -> pa.Table:
    """The Parquet table of captured calls (see the module docstring for its columns).

    Each message is parsed once; the tensors of all calls are joined as raw bytes
    and viewed as one array per tensor name (numpy never sees one call at a time
    in the usual case: raw contents of one fixed-size datatype).
    """
    requests = [pb.PredictRequest.FromString(c.request) for c in calls]
    responses = [pb.PredictResponse.FromString(c.response) if c.response else None for c in calls]
    row_list = [_rows(r) for r in requests]
    rows = np.array(row_list, dtype=np.int64)
    owner = np.repeat(np.arange(len(calls)), rows)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
    columns: dict[str, pa.Array] = {
        "time": pa.array(
            (np.array([c.time for c in calls]) * 1e6).astype(np.int64)[owner],
            pa.timestamp("us", tz="UTC"),
        ),
        "request_id": pa.array([c.request_id for c in calls], pa.string()).take(owner),
        "model_version": pa.array([c.model_version for c in calls], pa.string()).take(owner),
        "latency_ms": pa.array(np.array([c.latency_s for c in calls])[owner] * 1000.0),
        "code": pa.array([c.code for c in calls], pa.string()).take(owner),
        "sample": pa.array((np.arange(len(owner)) - starts[owner]).astype(np.int32)),
        "batch_size": pa.array(rows[owner].astype(np.int32)),
    }
    for prefix, messages, tensor_field, raw_field in (
        ("inputs", requests, "inputs", "raw_input_contents"),
        ("outputs", responses, "outputs", "raw_output_contents"),
    ):
        tensors: dict[str, list[tuple[object, bytes | None] | None]] = {}
        for index, (message, count) in enumerate(zip(messages, row_list, strict=True)):
            if message is None:
                continue
            raw = list(getattr(message, raw_field))
            for i, tensor in enumerate(getattr(message, tensor_field)):
                shape = tensor.shape
                if shape and shape[0] != count:
                    continue  # not one row per sample: kept out of the table
                slots = tensors.get(tensor.name)
                if slots is None:
                    slots = tensors[tensor.name] = [None] * len(messages)
                slots[index] = (tensor, raw[i] if raw else None)
        for name, slots in tensors.items():
            columns[f"{prefix}.{name}"] = _tensor_column(slots, rows)
    return pa.table(columns)


def _rows(request: pb.PredictRequest) -> int:
    inputs = request.inputs
    shape = inputs[0].shape if inputs else ()
    return int(shape[0]) if shape else 1


def _tensor_column(slots: list[tuple[object, bytes | None] | None], rows: np.ndarray) -> pa.Array:
    """One tensor of every call as a list column, a row per sample (null where absent).

    A list, not a fixed-size list: Parquet readers refuse null fixed-size lists.
    """
    present = [s for s in slots if s is not None]
    datatypes = {t.datatype for t, _ in present}  # type: ignore[attr-defined]
    datatype = datatypes.pop() if len(datatypes) == 1 else ""
    if datatype in NUMPY_TYPES and all(raw is not None for _, raw in present):
        values = np.frombuffer(b"".join(raw for _, raw in present), NUMPY_TYPES[datatype])  # type: ignore[misc]
    elif all(t.datatype in NUMPY_TYPES for t, _ in present):  # type: ignore[attr-defined]
        parts = [tensor_to_numpy(t, raw).reshape(-1) for t, raw in present]  # type: ignore[arg-type]
        values = np.concatenate(parts) if parts else np.array([], np.float32)
    else:
        return _object_column(slots, rows)
    widths = np.array(
        [0 if s is None else math.prod(s[0].shape[1:]) for s in slots],  # type: ignore[attr-defined]
        dtype=np.int64,
    )
    lengths = np.repeat(widths, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    if offsets[-1] != len(values):
        return _object_column(slots, rows)
    absent = np.repeat(np.array([s is None for s in slots]), rows)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values), mask=pa.array(absent) if absent.any() else None
    )


def _object_column(slots: list[tuple[object, bytes | None] | None], rows: np.ndarray) -> pa.Array:
    """The slow, general form (BYTES tensors, mixed datatypes): Python lists per sample."""
    items: list[object] = []
    for slot, n in zip(slots, rows.tolist(), strict=True):
        if slot is None:
            items.extend([None] * n)
            continue
        array = tensor_to_numpy(slot[0], slot[1]).reshape(n, -1)  # type: ignore[arg-type]
        items.extend(list(row) for row in array.tolist())
    return pa.array(items)


async def iterate_path(path: Path, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    """A file's bytes in chunks, for ArtifactStore.put_named."""
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            yield data


def object_key(deployment: str, when: datetime) -> str:
    """``predictions/<deployment>/<yyyy-mm-dd>/<hhmmss.ffffff>-<id>.parquet``."""
    deployment_id = deployment.split("/", 1)[-1]
    return (
        f"predictions/{deployment_id}/{when:%Y-%m-%d}/{when:%H%M%S.%f}-{uuid.uuid4().hex[:8]}"
        ".parquet"
    )
