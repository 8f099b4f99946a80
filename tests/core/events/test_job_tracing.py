"""A job's worker continues the trace of whoever enqueued it: enqueue -> publish -> job."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aimass.core.events import EventBus
from aimass.events.v1 import events_pb2
from tests.fixtures.tracing import parent_chain


async def test_the_job_span_is_a_child_of_the_enqueuing_trace(
    nats_url: str, recorded_spans: InMemorySpanExporter
) -> None:
    bus = await EventBus.connect(nats_url, "trace-test")
    try:
        await bus.ensure_streams()
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("CreateTrainingJob") as create:
            payload = events_pb2.JobStateChanged(job="trainingJobs/7")
            await bus.enqueue_job("tracetest", "trainingJobs/7", payload)
        queue = await bus.job_queue("tracetest")
        job = await queue.pull(timeout_s=5)
        assert job is not None
        async with job.keep_alive():
            with tracer.start_as_current_span("GetDatasetVersion"):
                pass
        await job.ack()
    finally:
        await bus.close()

    spans = list(recorded_spans.get_finished_spans())
    inner = next(s for s in spans if s.name == "GetDatasetVersion")
    assert parent_chain(inner, spans) == [
        "GetDatasetVersion",
        "tracetest job",
        "aimassjobs.tracetest publish",
        "CreateTrainingJob",
    ]
    assert {s.context.trace_id for s in spans} == {create.get_span_context().trace_id}
    job_span = next(s for s in spans if s.name == "tracetest job")
    assert job_span.kind == trace.SpanKind.CONSUMER
    assert job_span.attributes["aimass.job"] == "trainingJobs/7"
