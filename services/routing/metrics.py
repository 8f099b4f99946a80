"""Prometheus metrics of the routing service, on their own registry and port.

Per deployment and version: requests by status code and latency; per server:
requests in flight; model loads, unloads and evictions; shadow comparisons.
Label children are looked up once per (deployment, version, code) and kept, so
a request costs two lock-protected additions, not label hashing. The request
count and total time are also OpenTelemetry observable counters
(``aimass.predict.requests``, ``aimass.predict.duration``), read at collection.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class RoutingMetrics:
    def __init__(self, meter_provider: otel_metrics.MeterProvider | None = None) -> None:
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
        self._children: dict[tuple[str, str, str], tuple[Any, Any, list[float]]] = {}
        self._register_otel(meter_provider)

    def _register_otel(self, provider: otel_metrics.MeterProvider | None) -> None:
        """The same request counts as OpenTelemetry observable instruments.

        Observable: the meter reads the totals kept here when it collects, so a
        request pays nothing for OpenTelemetry (no attribute hashing per call).
        With no MeterProvider installed the API is a no-op.
        """
        meter = otel_metrics.get_meter("aimass.routing", meter_provider=provider)
        meter.create_observable_counter(
            "aimass.predict.requests",
            callbacks=[self._observe_requests],
            unit="{request}",
            description="Predict requests through the router, by deployment, version and code.",
        )
        meter.create_observable_counter(
            "aimass.predict.duration",
            callbacks=[self._observe_duration],
            unit="s",
            description="Total seconds spent in Predict (divide by the requests for the mean).",
        )

    def _attributes(self, key: tuple[str, str, str]) -> dict[str, str]:
        return {"deployment": key[0], "model_version": key[1], "code": key[2]}

    def _observe_requests(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(int(t[2][0]), self._attributes(k)) for k, t in self._children.items()]

    def _observe_duration(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(t[2][1], self._attributes(k)) for k, t in self._children.items()]

    def observe(self, deployment: str, version: str, code: str, seconds: float) -> None:
        key = (deployment, version, code)
        children = self._children.get(key)
        if children is None:
            children = (
                self.latency.labels(deployment, version),
                self.requests.labels(deployment, version, code),
                [0.0, 0.0],
            )
            self._children[key] = children
        children[0].observe(seconds)
        children[1].inc()
        totals = children[2]
        totals[0] += 1
        totals[1] += seconds
