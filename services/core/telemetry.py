"""OpenTelemetry tracing: provider set-up and W3C context in gRPC metadata and NATS headers.

The exporter is chosen by settings: ``none``, ``console``, ``file`` (JSON
lines, one span each: the embedded stack's default when tracing is on) or
``otlp`` (a collector, as in the compose stack).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased

from aimass.core.settings import TracingSettings

TRACE_HEADERS = ("traceparent", "tracestate")


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to a file as one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [span.to_json(indent=None) for span in spans]
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _exporter(settings: TracingSettings, service: str) -> SpanExporter | None:
    if settings.exporter == "console":
        return ConsoleSpanExporter(service_name=service)
    if settings.exporter == "file":
        return JsonLinesSpanExporter(settings.file or Path(f"traces-{service}.jsonl"))
    if settings.exporter == "otlp":
        # Imported only here: the OTLP exporter pulls in its own gRPC stack.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
    return None


def configure_tracing(service: str, settings: TracingSettings) -> TracerProvider:
    """Installs the global tracer provider for this process and returns it.

    Without an exporter nothing is recorded (spans would only cost time), but spans
    still exist, so trace ids keep flowing from callers to the services this one calls.
    """
    exporter = _exporter(settings, service)
    sampler: Sampler = (
        ParentBased(TraceIdRatioBased(settings.sample_ratio)) if exporter else ALWAYS_OFF
    )
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"aimass-{service}"}), sampler=sampler
    )
    if exporter is not None:
        # The file exporter writes synchronously so a test can read spans at once.
        processor = (
            SimpleSpanProcessor(exporter)
            if settings.exporter == "file"
            else BatchSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def inject_headers(carrier: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as W3C headers (traceparent, tracestate)."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier)
    return carrier


def extract_context(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> otel_context.Context:
    """A context carrying the remote span named by W3C headers or gRPC metadata."""
    if headers is None:
        return otel_context.get_current()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    carrier = {k.lower(): v for k, v in pairs if isinstance(v, str)}
    return propagate.extract(carrier)
