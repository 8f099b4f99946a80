import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from aimass.core.logging import JsonFormatter, redact
from aimass.core.settings import TracingSettings
from aimass.core.telemetry import configure_tracing, extract_context, inject_headers


def record(message, **extra):
    rec = logging.LogRecord("aimass.test", logging.INFO, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_carries_service_extra_fields_and_masks_keys():
    line = JsonFormatter("registry").format(
        record(
            "created with api_key=aim_abcdefgh12345678",
            model="digits",
            header="Bearer eyJhbGciOi.x.y",
        )
    )
    entry = json.loads(line)
    assert entry["service"] == "registry"
    assert entry["model"] == "digits"
    assert "aim_abcdefgh12345678" not in line
    assert "eyJhbGciOi" not in line
    assert entry["level"] == "INFO"


def test_redact_leaves_plain_text_alone():
    assert redact("trained 3 epochs on datasets/digits") == "trained 3 epochs on datasets/digits"
    assert "hunter2" not in redact('{"password": "hunter2"}')


def test_file_exporter_writes_one_span_per_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    provider: TracerProvider = configure_tracing(
        "test", TracingSettings(exporter="file", file=path)
    )
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("outer"), tracer.start_as_current_span("inner"):
        headers = inject_headers()
    provider.shutdown()
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["name"] for s in spans] == ["inner", "outer"]
    assert spans[0]["parent_id"] == spans[1]["context"]["span_id"]
    # The injected traceparent names the inner span, so a consumer continues it.
    assert spans[0]["context"]["span_id"][2:] in headers["traceparent"]
    remote = extract_context(headers)
    assert remote is not None
