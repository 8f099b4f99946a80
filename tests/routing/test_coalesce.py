"""The router's coalescer on its own: when requests merge, how answers are cut back, and
what a caller that gives up, a failed call or an unsplittable answer do to the others.

``send`` here computes the answer from the request it gets (a row-wise function of the
inputs), so a wrongly merged or wrongly cut batch gives wrong numbers. The same code
against a real Triton is tested in test_triton_serving.py."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from aimass.common.v1 import common_pb2
from aimass.routing.backends import UpstreamError
from aimass.routing.coalesce import Coalescer, Metadata, layout_of
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.wire import string_field

SUFFIX = string_field(1, "mlp-v1-entry") + string_field(2, "1")


def request_of(values: np.ndarray, request_id: str) -> pb.PredictRequest:
    return pb.PredictRequest(
        deployment="deployments/mlp",
        id=request_id,
        inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=values.shape)],
        raw_input_contents=[values.astype(np.float32).tobytes()],
    )


def model(values: np.ndarray) -> np.ndarray:
    """Row-wise: each row's sum and its first value times two."""
    return np.stack([values.sum(axis=1), values[:, 0] * 2], axis=1).astype(np.float32)


def answer(body: bytes, scalar_output: bool = False) -> bytes:
    """What a server answers to ``body`` (a ModelInferRequest, model named by the suffix)."""
    request = pb.PredictRequest.FromString(body)
    shape = tuple(request.inputs[0].shape)
    values = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(shape)
    out = np.array([values.sum()], np.float32) if scalar_output else model(values)
    response = pb.PredictResponse(deployment=request.deployment, model_version="1", id=request.id)
    response.outputs.append(common_pb2.InferTensor(name="out", datatype="FP32", shape=out.shape))
    response.raw_output_contents.append(out.tobytes())
    return response.SerializeToString()


class Server:
    """Records every body sent; the first call can be held until ``release``."""

    def __init__(self, hold_first: bool = True, scalar_output: bool = False) -> None:
        """``scalar_output``: merged calls are answered with one value, not one per row."""
        self.bodies: list[bytes] = []
        self.metadata: list[Metadata] = []
        self.gate = asyncio.Event()
        self.hold_first = hold_first
        self.scalar_output = scalar_output
        self.fail_merged: Exception | None = None

    async def send(self, body: bytes, seconds: float, metadata: Metadata = None) -> bytes:
        self.bodies.append(body)
        self.metadata.append(metadata)
        if self.hold_first and len(self.bodies) == 1:
            await self.gate.wait()
        rows = pb.PredictRequest.FromString(body).inputs[0].shape[0]
        if self.fail_merged is not None and len(self.bodies) > 1:
            raise self.fail_merged
        await asyncio.sleep(0)
        return answer(body, self.scalar_output and rows > 1)

    def rows_sent(self) -> list[int]:
        return [pb.PredictRequest.FromString(b).inputs[0].shape[0] for b in self.bodies]


def call(
    coalescer: Coalescer, values: np.ndarray, request_id: str, metadata: Metadata = None
) -> asyncio.Task[bytes]:
    request = request_of(values, request_id)
    forward = request.SerializeToString() + SUFFIX
    rows = values.shape[0]
    deadline = time.monotonic() + 5
    return asyncio.create_task(coalescer.call(request, forward, rows, deadline, metadata))


def output(raw: bytes) -> tuple[str, np.ndarray]:
    response = pb.PredictResponse.FromString(raw)
    shape = tuple(response.outputs[0].shape)
    return response.id, np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def batches(rng: np.random.Generator, rows: list[int]) -> list[np.ndarray]:
    return [rng.random((n, 4), dtype=np.float32) for n in rows]


async def queue_behind_a_busy_call(
    coalescer: Coalescer, rows: list[int], seed: int
) -> tuple[list[np.ndarray], list[asyncio.Task[bytes]]]:
    """A first call held at the server, then one queued call per further entry of ``rows``:
    the arrays and their tasks, first included (release with ``server.gate.set()``)."""
    values = batches(np.random.default_rng(seed), rows)
    tasks = [call(coalescer, values[0], "first")]
    await settle()
    tasks += [call(coalescer, v, f"q{i}") for i, v in enumerate(values[1:])]
    await settle()
    return values, tasks


async def test_a_lone_request_goes_as_it_came():
    server = Server(hold_first=False)
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    values = np.ones((2, 4), np.float32)
    request = request_of(values, "only")
    answer_bytes = await coalescer.call(
        request, request.SerializeToString() + SUFFIX, 2, time.monotonic() + 5
    )
    assert server.bodies == [request.SerializeToString() + SUFFIX]
    request_id, out = output(answer_bytes)
    assert request_id == "only"
    np.testing.assert_allclose(out, model(values))


async def test_requests_queued_while_the_model_is_busy_leave_as_one_batch():
    server = Server()
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    (first, *queued), tasks = await queue_behind_a_busy_call(coalescer, [1, 1, 2, 1], seed=0)
    assert len(server.bodies) == 1  # the others wait while the model is busy
    server.gate.set()
    answers = await asyncio.gather(*tasks)

    assert server.rows_sent() == [1, 4]  # 1 + 2 + 1 rows merged into one call
    merged = pb.PredictRequest.FromString(server.bodies[1])
    assert merged.deployment == "mlp-v1-entry"  # the model entry appended, as Triton needs
    assert merged.raw_input_contents[0] == b"".join(v.tobytes() for v in queued)
    for (request_id, out), values, expected_id in zip(
        map(output, answers),
        [first, *queued],
        ["first", "q0", "q1", "q2"],
        strict=True,
    ):
        assert request_id == expected_id
        assert out.shape == (values.shape[0], 2)
        np.testing.assert_allclose(out, model(values), rtol=1e-6)
    assert (coalescer.calls, coalescer.requests) == (2, 4)


async def test_a_queue_lingers_for_more_once_the_model_is_free_unless_it_is_full():
    server = Server()
    coalescer = Coalescer(server.send, SUFFIX, max_rows=3, max_in_flight=1, linger_s=0.2)
    (_, early), tasks = await queue_behind_a_busy_call(coalescer, [1, 1], seed=6)
    server.gate.set()
    await tasks[0]
    await settle()
    assert server.rows_sent() == [1]  # the model is free, but the queued row waits a while
    late = batches(np.random.default_rng(7), [1])[0]
    tasks.append(call(coalescer, late, "late"))
    answers = await asyncio.gather(*tasks)
    assert server.rows_sent() == [1, 2]  # the late request rode with the early one
    for raw, values in zip(answers[1:], [early, late], strict=True):
        np.testing.assert_allclose(output(raw)[1], model(values), rtol=1e-6)

    # A full batch does not linger: three rows leave at once, the model still busy.
    held = Server()
    coalescer = Coalescer(held.send, SUFFIX, max_rows=3, max_in_flight=1, linger_s=60)
    _, tasks = await queue_behind_a_busy_call(coalescer, [1, 1, 1, 1], seed=8)
    assert held.rows_sent() == [1, 3]
    held.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)


async def test_a_merged_call_never_exceeds_max_batch_size():
    server = Server()
    coalescer = Coalescer(server.send, SUFFIX, max_rows=3, max_in_flight=1)
    first, *queued = batches(np.random.default_rng(1), [1, 2, 2, 1, 3])
    tasks = [call(coalescer, first, "first")]
    await settle()
    tasks += [call(coalescer, values, f"q{i}") for i, values in enumerate(queued)]
    await settle()
    server.gate.set()
    answers = await asyncio.gather(*tasks)
    assert max(server.rows_sent()) <= 3
    assert sum(server.rows_sent()) == 9
    for raw, values in zip(answers, [first, *queued], strict=True):
        np.testing.assert_allclose(output(raw)[1], model(values), rtol=1e-6)


async def test_a_caller_that_gives_up_leaves_the_others_their_answers():
    server = Server()
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    first, gives_up, stays = batches(np.random.default_rng(2), [1, 1, 1])
    busy = call(coalescer, first, "first")
    await settle()
    cancelled, kept = call(coalescer, gives_up, "gone"), call(coalescer, stays, "kept")
    await settle()
    cancelled.cancel()
    server.gate.set()
    await busy
    request_id, out = output(await kept)
    assert request_id == "kept"
    np.testing.assert_allclose(out, model(stays), rtol=1e-6)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The one who left was not sent at all.
    assert server.rows_sent() == [1, 1]


async def test_a_failed_merged_call_fails_each_of_its_callers():
    server = Server()
    server.fail_merged = UpstreamError(grpc.StatusCode.UNAVAILABLE, "mlp-v1-entry: gone")
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    _, (busy, *tasks) = await queue_behind_a_busy_call(coalescer, [1, 1, 1], seed=3)
    server.gate.set()
    await busy
    for task in tasks:
        with pytest.raises(UpstreamError) as raised:
            await task
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert coalescer.in_flight == 0


async def test_an_answer_without_batch_rows_turns_merging_off():
    server = Server(scalar_output=True)
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    (_, *queued), (busy, *tasks) = await queue_behind_a_busy_call(coalescer, [1, 1, 1], seed=4)
    server.gate.set()
    await busy
    for task, values in zip(tasks, queued, strict=True):
        # Each asked again alone, so each gets its own answer.
        np.testing.assert_allclose(output(await task)[1], model(values), rtol=1e-6)
    assert coalescer.disabled
    assert server.rows_sent() == [1, 2, 1, 1]


async def test_trace_context_goes_with_a_lone_call_and_never_with_a_merged_one():
    server = Server()
    coalescer = Coalescer(server.send, SUFFIX, max_rows=16, max_in_flight=1)
    first, *queued = batches(np.random.default_rng(5), [1, 1, 1, 1])

    def traced(name: str) -> Metadata:
        return (("traceparent", f"00-{name:0>32}-{name:0>16}-01"),)

    busy = call(coalescer, first, "first", traced("a"))
    await settle()
    merged = [call(coalescer, v, f"m{i}", traced(f"b{i}")) for i, v in enumerate(queued[:2])]
    await settle()
    server.gate.set()
    await asyncio.gather(busy, *merged)
    await call(coalescer, queued[2], "last", traced("c"))

    assert server.rows_sent() == [1, 2, 1]
    # Alone: the caller's context; merged (two traces at once): none.
    assert server.metadata == [traced("a"), None, traced("c")]


def test_only_plain_raw_requests_with_one_batch_size_can_be_merged():
    values = np.zeros((3, 4), np.float32)
    plain = request_of(values, "a")
    assert layout_of(plain) == ((("input",), ()), 3)

    with_outputs = request_of(values, "a")
    with_outputs.outputs.append(pb.RequestedOutput(name="out"))
    assert layout_of(with_outputs) == ((("input",), ("out",)), 3)

    with_parameters = request_of(values, "a")
    with_parameters.parameters["priority"].int64_param = 1
    assert layout_of(with_parameters) is None

    typed_contents = request_of(values, "a")
    del typed_contents.raw_input_contents[:]
    assert layout_of(typed_contents) is None

    two_batch_sizes = request_of(values, "a")
    two_batch_sizes.inputs.append(
        common_pb2.InferTensor(name="mask", datatype="FP32", shape=[2, 4])
    )
    two_batch_sizes.raw_input_contents.append(np.zeros((2, 4), np.float32).tobytes())
    assert layout_of(two_batch_sizes) is None
