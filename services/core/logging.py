"""Structured logging: one JSON object per line (or a readable console line).

Every record carries the service name and, inside a traced call, the trace and
span ids, so logs join traces. Values that look like credentials are masked
before they are written: keys never appear in logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

_SECRET_PATTERNS = [
    re.compile(
        r"(?i)(authorization|api[-_]?key|x-api-key|secret|password|token)([\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)"
    ),
    re.compile(r"\baim(?:ass)?_[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]+"),
    # A JWT anywhere (header.claims.signature, base64url; every JWT header starts "eyJ").
    re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),
    # The password of a URL (postgresql://user:password@host/db).
    re.compile(r"(://[^:/@\s]+:)([^@\s]+)@"),
]
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    """Masks credential-looking values (API keys, bearer tokens, passwords)."""
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SECRET_PATTERNS[1].sub("aimass_***", text)
    text = _SECRET_PATTERNS[2].sub("Bearer ***", text)
    text = _SECRET_PATTERNS[3].sub("jwt-***", text)
    return _SECRET_PATTERNS[4].sub(lambda m: f"{m.group(1)}***@", text)


def _trace_fields() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; extra= fields become keys."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": redact(record.getMessage()),
            **_trace_fields(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """A short human line: time level service logger message."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Sends the root logger to stderr in the chosen format; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else ConsoleFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc and nats are chatty at INFO about reconnects that we log ourselves.
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
