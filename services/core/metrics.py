"""Prometheus metrics every aimass process exposes: RPCs, jobs and work queues.

Names follow the conventions of go-grpc-prometheus so stock dashboards and the alert
rules in deploy/prometheus/alerts.yml work unchanged:

- ``grpc_server_handled_total{grpc_service, grpc_method, grpc_code}``
- ``grpc_server_handling_seconds{grpc_service, grpc_method}`` (histogram)
- ``aimass_jobs_total{kind, state}`` and ``aimass_job_duration_seconds{kind, state}``
- ``aimass_job_queue_pending{kind}``: jobs waiting on the work queue

A service process serves them over HTTP on ``settings.ports.metrics`` (``/metrics``),
together with any registry a service adds (the router's per-deployment metrics).
Label children are cached, so recording a call costs a dict lookup and two updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.orm import object_session

if TYPE_CHECKING:
    from aimass.core.events import EventBus

log = logging.getLogger(__name__)

# Sub-millisecond buckets: the router's Predict answers in about a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)

HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
JOBS = Counter("aimass_jobs", "Jobs that reached a final state.", ["kind", "state"])
JOB_SECONDS = Histogram(
    "aimass_job_duration_seconds",
    "Time from a job's start to its final state.",
    ["kind", "state"],
    buckets=JOB_BUCKETS,
)
QUEUE_PENDING = Gauge(
    "aimass_job_queue_pending", "Jobs waiting on the work queue, by kind.", ["kind"]
)


class RpcMetrics:
    """Records one RPC: its status code and how long it took, label children cached."""

    def __init__(self) -> None:
        self._handled: dict[tuple[str, str], Counter] = {}
        self._handling: dict[str, Histogram] = {}

    def observe(self, full_method: str, code: str, seconds: float) -> None:
        handled = self._handled.get((full_method, code))
        if handled is None:
            service, method = split_method(full_method)
            handled = HANDLED.labels(service, method, code)
            self._handled[(full_method, code)] = handled
        handled.inc()
        handling = self._handling.get(full_method)
        if handling is None:
            handling = HANDLING.labels(*split_method(full_method))
            self._handling[full_method] = handling
        handling.observe(seconds)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def count_job_end(row: Any, kind: str, state: str) -> None:
    """Counts a job's final state (and its duration, from ``row.start_time`` to
    ``row.end_time``) once the transaction that wrote it commits: an end that is rolled
    back is never counted."""
    start, end = getattr(row, "start_time", None), getattr(row, "end_time", None)
    seconds = (end - start).total_seconds() if start and end else None
    session = object_session(row)
    if session is None:
        record_job_finished(kind, state, seconds)
        return
    event.listen(
        session,
        "after_commit",
        lambda _session: record_job_finished(kind, state, seconds),
        once=True,
    )


def record_job_finished(kind: str, state: str, seconds: float | None) -> None:
    """Counts a job that reached ``state`` (SUCCEEDED, FAILED, CANCELLED) and its duration."""
    JOBS.labels(kind, state).inc()
    if seconds is not None and seconds >= 0:
        JOB_SECONDS.labels(kind, state).observe(seconds)


async def watch_queue_depths(bus: EventBus, kinds: Sequence[str], interval_s: float = 5.0) -> None:
    """Keeps ``aimass_job_queue_pending`` current for ``kinds`` until cancelled."""
    while True:
        for kind in kinds:
            with contextlib.suppress(Exception):  # NATS away: keep the last value
                QUEUE_PENDING.labels(kind).set(await bus.pending_jobs(kind))
        await asyncio.sleep(interval_s)


class _Merged(Collector):
    """The process registry and a service's own registries, served as one page."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self.registries = [REGISTRY, *registries]

    def collect(self) -> Iterable[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def serve_metrics(
    port: int, host: str, registries: Iterable[CollectorRegistry] = ()
) -> Callable[[], None]:
    """Serves ``/metrics`` on ``host:port`` from a daemon thread; returns a stop function."""
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Merged(registries))
    server, thread = start_http_server(port, addr=host, registry=merged)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    log.info("metrics on http://%s:%d/metrics", host, port)
    return stop
