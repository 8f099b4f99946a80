"""Coalescing: concurrent Predicts of one model go to the server as one batched call.

A Python router pays a gRPC client call to Triton for every request it
forwards, and that call costs about as much CPU as serving the request did:
on a small machine the hop's throughput is bound by it (see
../shared/MEASURED.md and docs/benchmarks/serving.md). Triton's dynamic
batcher merges requests only after they have crossed that hop.

A :class:`Coalescer` (one per server, model entry and tensor layout) sends a
request straight through while fewer than ``max_in_flight`` calls to that
model are outstanding (the router's setting times the model's instance
count), so a lone request waits for nothing. Requests that arrive while the
model is busy queue here, and every time a call returns the queue leaves as
one request, after waiting up to the deployment's dynamic-batching
``max_queue_delay`` for more unless it is full: the inputs' raw bytes
concatenated along the batch dimension (at most the deployment's
``max_batch_size`` rows), and the answer cut back into one response per
caller, with its own id and batch size. The batch size thus follows the load:
the busier the model, the bigger the batches and the fewer calls per request,
and a request that did not have to queue never waits.

Only requests with the same inputs (names and order), the same requested
outputs, raw contents, no parameters and fixed-size types are merged, and
each caller's future is its own: a caller that gives up (deadline, cancel)
leaves the others' call alone. A model whose merged answer cannot be cut
per row (an output without the batch dimension) is called alone from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aimass.routing.v1 import routing_pb2 as pb

log = logging.getLogger(__name__)

# Calls outstanding per model instance before requests queue to be merged. One: while the
# model computes, the next batch forms here (measured on 2 cores, MLP at c=16: mean merge
# 4.1, Triton's CPU per request 353 -> 100 us, the router's 589 -> 380 us; two in flight
# merged only 1.5).
DEFAULT_MAX_IN_FLIGHT = 1
# (input names, requested output names): requests merge only with the same layout.
LayoutKey = tuple[tuple[str, ...], tuple[str, ...]]
# gRPC metadata sent with a call (a lone traced request's traceparent).
Metadata = tuple[tuple[str, str], ...] | None
Send = Callable[[bytes, float, Metadata], Awaitable[bytes]]


def layout_of(request: pb.PredictRequest) -> tuple[LayoutKey, int] | None:
    """The layout key and batch rows of a request that can be merged, else None."""
    inputs = request.inputs
    if not inputs or request.parameters or len(request.raw_input_contents) != len(inputs):
        return None
    rows = -1
    for tensor in inputs:
        if not tensor.shape or tensor.parameters:
            return None
        if rows < 0:
            rows = tensor.shape[0]
        elif tensor.shape[0] != rows:
            return None
    if rows <= 0:
        return None
    key = (tuple(t.name for t in inputs), tuple(o.name for o in request.outputs))
    return key, rows


class Unsplittable(ValueError):
    """A merged answer that cannot be cut per request (an output without the batch rows)."""


@dataclass(slots=True)
class _Member:
    request: pb.PredictRequest
    forward: bytes  # the request's own bytes for the server, sent when it goes alone
    rows: int
    deadline: float
    future: asyncio.Future[bytes]
    metadata: Metadata = None


class Coalescer:
    """Merges queued requests of one model and layout into batched calls (module docstring)."""

    def __init__(
        self,
        send: Send,
        model_suffix: bytes,
        max_rows: int,
        max_in_flight: int,
        linger_s: float = 0.0,
    ) -> None:
        self._send = send
        self._suffix = model_suffix
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        # How long a queue that is not full may wait for more once the model is free.
        self.linger_s = linger_s
        self.in_flight = 0
        self._queue: deque[_Member] = deque()
        self._queued_rows = 0
        self._drain_scheduled = False
        # Set when a merged answer could not be cut back: this model is then called alone.
        self.disabled = False
        # Figures for tests and metrics: calls made, requests they carried.
        self.calls = 0
        self.requests = 0

    async def call(
        self,
        request: pb.PredictRequest,
        forward: bytes,
        rows: int,
        deadline: float,
        metadata: Metadata = None,
    ) -> bytes:
        """The server's answer (Triton's bytes) to ``request``, alone or merged with others.

        ``metadata`` goes with the request when it is sent alone (a traced caller's
        ``traceparent``); a merged call carries none."""
        if self.disabled or (self.in_flight < self.max_in_flight and not self._queue):
            return await self._alone(forward, deadline, metadata)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue.append(_Member(request, forward, rows, deadline, future, metadata))
        self._queued_rows += rows
        if self._queued_rows >= self.max_rows:
            self._start_batch()  # a full batch gains nothing by waiting for a free slot
        return await future

    async def _alone(self, forward: bytes, deadline: float, metadata: Metadata) -> bytes:
        self.in_flight += 1
        self.calls += 1
        self.requests += 1
        try:
            return await self._send(forward, deadline - time.monotonic(), metadata)
        finally:
            self.in_flight -= 1
            self._drain_soon()

    def _drain_soon(self) -> None:
        """Sends what queued once the callbacks already due have run, or after ``linger_s``:
        requests arriving meanwhile join the batch instead of following it alone. Only
        requests that already queue wait: at low load nothing lingers."""
        if not self._drain_scheduled and self._queue:
            self._drain_scheduled = True
            loop = asyncio.get_running_loop()
            if self.linger_s > 0:
                loop.call_later(self.linger_s, self._drain)
            else:
                loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._queue and self.in_flight < self.max_in_flight:
            self._start_batch()

    def _start_batch(self) -> None:
        """Takes queued requests, oldest first, up to max_rows rows, and sends them as one."""
        members: list[_Member] = []
        rows = 0
        while self._queue and (not members or rows + self._queue[0].rows <= self.max_rows):
            member = self._queue.popleft()
            if member.future.done():  # its caller gave up while it queued
                self._queued_rows -= member.rows
                continue
            members.append(member)
            rows += member.rows
        self._queued_rows -= rows
        if members:
            self.in_flight += 1
            asyncio.get_running_loop().create_task(self._send_batch(members, rows))

    async def _send_batch(self, members: list[_Member], rows: int) -> None:
        self.calls += 1
        self.requests += len(members)
        try:
            timeout = max(m.deadline for m in members) - time.monotonic()
            if len(members) == 1:
                alone = members[0]
                answers = [await self._send(alone.forward, timeout, alone.metadata)]
            else:
                answers = await self._send_merged(members, rows, timeout)
            for member, answer in zip(members, answers, strict=True):
                if not member.future.done():
                    member.future.set_result(answer)
        except asyncio.CancelledError:
            for member in members:
                member.future.cancel()
            raise
        except Exception as error:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(error)
        finally:
            self.in_flight -= 1
            self._drain_soon()

    async def _send_merged(self, members: list[_Member], rows: int, seconds: float) -> list[bytes]:
        merged = merge_requests([m.request for m in members], rows) + self._suffix
        # No trace context: the call serves several callers' traces.
        answer = await self._send(merged, seconds, None)
        try:
            return split_response(answer, members, rows)
        except Unsplittable as error:
            # Not a model to merge for: every member asks alone, now and from now on.
            log.warning("%s; requests to this model are no longer merged", error)
            self.disabled = True
            return list(
                await asyncio.gather(*(self._send(m.forward, seconds, m.metadata) for m in members))
            )


def merge_requests(requests: list[pb.PredictRequest], rows: int) -> bytes:
    """One request whose inputs are the requests' inputs stacked along the batch dimension."""
    first = requests[0]
    merged = pb.PredictRequest()
    for tensor in first.inputs:
        added = merged.inputs.add()
        added.CopyFrom(tensor)
        added.shape[0] = rows
    merged.outputs.extend(first.outputs)
    merged.raw_input_contents.extend(
        b"".join(r.raw_input_contents[index] for r in requests)
        for index in range(len(first.inputs))
    )
    return merged.SerializeToString()


def split_response(raw: bytes, members: list[_Member], rows: int) -> list[bytes]:
    """The merged answer cut into one response per member, each with its id and its rows."""
    response = pb.PredictResponse.FromString(raw)
    outputs, contents = response.outputs, response.raw_output_contents
    if len(contents) != len(outputs):
        raise Unsplittable(f"{response.deployment}: a merged answer has no raw outputs")
    row_bytes = []
    for tensor, content in zip(outputs, contents, strict=True):
        if not tensor.shape or tensor.shape[0] != rows or len(content) % rows:
            raise Unsplittable(
                f"{response.deployment}: output {tensor.name} of a merged batch of {rows}"
                f" rows has shape {list(tensor.shape)}"
            )
        row_bytes.append(len(content) // rows)
    answers = []
    offset = 0
    for member in members:
        part = pb.PredictResponse(
            deployment=response.deployment, model_version=response.model_version
        )
        part.id = member.request.id
        for key, value in response.parameters.items():
            part.parameters[key].CopyFrom(value)
        for tensor, content, size in zip(outputs, contents, row_bytes, strict=True):
            added = part.outputs.add()
            added.CopyFrom(tensor)
            added.shape[0] = member.rows
            part.raw_output_contents.append(content[offset * size : (offset + member.rows) * size])
        offset += member.rows
        answers.append(part.SerializeToString())
    return answers
