"""Prometheus metrics of the routing service, on their own registry and port.

Per deployment and version: requests by status code and latency; per server:
requests in flight; model loads, unloads and evictions; shadow comparisons.
Label children are looked up once per (deployment, version) and kept, so a
request costs two lock-protected additions, not label hashing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class RoutingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aimass_predict_requests",
            "Predict requests through the router, by deployment, version and gRPC code.",
            ["deployment", "model_version", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aimass_predict_latency_seconds",
            "Latency of Predict through the router (router and server time).",
            ["deployment", "model_version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "aimass_server_requests_in_flight",
            "Requests the router has outstanding on each inference server.",
            ["server"],
            registry=self.registry,
        )
        self.model_events = Counter(
            "aimass_model_events",
            "Model loads, unloads, evictions and load failures per server.",
            ["server", "event"],
            registry=self.registry,
        )
        self.shadow = Counter(
            "aimass_shadow_comparisons",
            "Shadow answers compared with the primary answer.",
            ["deployment", "model_version", "result"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, deployment: str, version: str, code: str, seconds: float) -> None:
        key = (deployment, version)
        latency = self._children.get(key)
        if latency is None:
            latency = (self.latency.labels(deployment, version), None)
            self._children[key] = latency
        latency[0].observe(seconds)
        self.requests.labels(deployment, version, code).inc()

    def serve(self, port: int, host: str) -> Callable[[], None]:
        """Starts the exposition endpoint; returns its stop function."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop
