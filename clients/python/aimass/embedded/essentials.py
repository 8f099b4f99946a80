"""The essentials of one service's Prometheus page, for ``aimass status``.

Every service process serves ``/metrics`` (``aimass.core.metrics``); the status command
reads it and keeps what an operator looks at first: calls served, server-side failures
(the same codes as the error-rate alert in deploy/prometheus/alerts.yml), jobs waiting
on the work queues, and finished jobs by outcome.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Failures of the server, not of the caller's input: the alert's `grpc_code` set.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED"}
)


@dataclass
class Essentials:
    requests: int = 0
    server_errors: int = 0
    # kind -> jobs waiting on its work queue (only the services that run a kind's jobs).
    queued: dict[str, int] = field(default_factory=dict)
    # state (SUCCEEDED, FAILED, CANCELLED) -> jobs finished by this process.
    jobs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(page: str) -> Essentials:
    """The essentials of a Prometheus text page."""
    found = Essentials()
    jobs: dict[str, int] = defaultdict(int)
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total":
                count = int(sample.value)
                found.requests += count
                if sample.labels.get("grpc_code") in SERVER_ERROR_CODES:
                    found.server_errors += count
            elif sample.name == "aimass_job_queue_pending":
                found.queued[sample.labels.get("kind", "")] = int(sample.value)
            elif sample.name == "aimass_jobs_total":
                jobs[sample.labels.get("state", "")] += int(sample.value)
    found.jobs = dict(jobs)
    return found


def scrape(host: str, port: int, timeout_s: float) -> Essentials | None:
    """The essentials of ``http://host:port/metrics``; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as reply:
            return summarise(reply.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
