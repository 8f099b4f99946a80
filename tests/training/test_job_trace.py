"""One trace spans a training job: the caller's Create, the job on the work queue, the
worker that trains it and the registry calls that register its version."""

from __future__ import annotations

import asyncio
import time

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aimass.common.v1 import common_pb2
from aimass.core.clients import open_channel
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from tests.fixtures.tracing import parent_chain

MLP = {"mlp": {"hidden_sizes": [16]}}
QUICK = {"epochs": 1, "batch_size": 64, "seed": 0}
CREATE = "aimass.training.v1.TrainingService/CreateTrainingJob"
CREATE_VERSION = "aimass.registry.v1.RegistryService/CreateModelVersion"


async def spans_of_trace(
    recorded: InMemorySpanExporter, trace_id: int, until: str, timeout_s: float = 10.0
) -> list[ReadableSpan]:
    """The trace's finished spans once one named ``until`` is among them (a server span ends
    after its handler returns, which can be a moment after the caller moved on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in recorded.get_finished_spans() if s.context.trace_id == trace_id]
        if any(s.name == until for s in spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


async def test_a_training_job_is_one_trace(recorded_spans: InMemorySpanExporter, training_stack):
    ts = training_stack
    tracer = trace.get_tracer("test")
    # A channel that sends the caller's trace context, as the SDK and the services do.
    channel = open_channel(ts.stack.address("training"), ts.settings)
    try:
        with tracer.start_as_current_span("client train") as root:
            job = await training_pb2_grpc.TrainingServiceStub(channel).CreateTrainingJob(
                tpb.CreateTrainingJobRequest(
                    training_job=ts.job(MLP, QUICK, target_model="models/traced")
                )
            )
    finally:
        await channel.close()
    async with ts.worker():
        done = await ts.wait(job.name)
    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason

    trace_id = root.get_span_context().trace_id
    spans = await spans_of_trace(recorded_spans, trace_id, until=CREATE_VERSION)
    register = next(s for s in spans if s.name == CREATE_VERSION)
    chain = parent_chain(register, spans)
    # registry server span <- worker's job span <- queue publish <- Create <- the caller
    assert chain[0] == CREATE_VERSION
    assert "training job" in chain
    assert chain.index("training job") < chain.index(CREATE) < chain.index("client train")
    assert chain[-1] == "client train"
    job_span = next(s for s in spans if s.name == "training job")
    assert job_span.attributes["aimass.job"] == job.name
