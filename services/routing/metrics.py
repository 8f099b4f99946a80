"""Prometheus metrics of the routing service, on their own registry and port.

Per deployment and version: requests by status code and latency; per server:
requests in flight; model loads, unloads and evictions; shadow comparisons.

The two per-request series are plain Python numbers kept per (deployment,
version, code): a request costs a dict lookup, a bisect and three additions on
the event loop thread, no label hashing and no lock (prometheus_client's
metrics take a lock per update). A collector turns them into the Prometheus
counter and histogram when the endpoint is scraped, and the same totals are
OpenTelemetry observable counters (``aimass.predict.requests``,
``aimass.predict.duration``), read at collection.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _Series:
    """One (deployment, version, code): requests, total seconds, latency bucket counts."""

    __slots__ = ("buckets", "count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        # One slot per bound of LATENCY_BUCKETS, and one for +Inf.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)


class _PredictCollector(Collector):
    """Exposes the per-request series as aimass_predict_requests_total and
    aimass_predict_latency_seconds (latency summed over codes)."""

    def __init__(self, series: dict[tuple[str, str, str], _Series]) -> None:
        self.series = series

    def collect(self) -> Iterator[Metric]:
        # list(): one step under the GIL, so a series added meanwhile cannot break it.
        items = list(self.series.items())
        requests = CounterMetricFamily(
            "aimass_predict_requests",
            "Predict requests through the router, by deployment, version and gRPC code.",
            labels=["deployment", "model_version", "code"],
        )
        latency: dict[tuple[str, str], tuple[list[int], float]] = {}
        for (deployment, version, code), series in items:
            requests.add_metric([deployment, version, code], series.count)
            counts, seconds = latency.get((deployment, version), ([0] * len(series.buckets), 0.0))
            counts = [a + b for a, b in zip(counts, series.buckets, strict=True)]
            latency[(deployment, version)] = (counts, seconds + series.seconds)
        histogram = HistogramMetricFamily(
            "aimass_predict_latency_seconds",
            "Latency of Predict through the router (router and server time).",
            labels=["deployment", "model_version"],
        )
        bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
        for labels, (counts, seconds) in latency.items():
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric(list(labels), cumulative, seconds)
        yield requests
        yield histogram


# (server, model entry, calls sent, requests they carried) of each coalescer.
CoalescingFigures = Callable[[], Iterable[tuple[str, str, int, int]]]


class _CoalescingCollector(Collector):
    """Calls sent to servers and the requests they carried (their ratio: the mean batch)."""

    def __init__(self, figures: CoalescingFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "aimass_server_calls",
            "Inference calls the router sent, per server and model entry (merged or alone).",
            labels=["server", "model"],
        )
        carried = CounterMetricFamily(
            "aimass_server_call_requests",
            "Predict requests those calls carried; over aimass_server_calls: the mean merge.",
            labels=["server", "model"],
        )
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for server, model, sent, requests in self.figures():
            before = totals.get((server, model), (0, 0))
            totals[(server, model)] = (before[0] + sent, before[1] + requests)
        for labels, (sent, requests) in totals.items():
            calls.add_metric(list(labels), sent)
            carried.add_metric(list(labels), requests)
        yield calls
        yield carried


class RoutingMetrics:
    def __init__(self, meter_provider: otel_metrics.MeterProvider | None = None) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[str, str, str], _Series] = {}
        self.registry.register(_PredictCollector(self._series))
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
        self._register_otel(meter_provider)

    def watch_coalescing(self, figures: CoalescingFigures) -> None:
        """Exposes the coalescers' figures (read at scrape time, nothing per request)."""
        self.registry.register(_CoalescingCollector(figures))

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
        items = list(self._series.items())
        return [Observation(s.count, self._attributes(k)) for k, s in items]

    def _observe_duration(self, options: CallbackOptions) -> list[Observation]:
        items = list(self._series.items())
        return [Observation(s.seconds, self._attributes(k)) for k, s in items]

    def observe(self, deployment: str, version: str, code: str, seconds: float) -> None:
        """One Predict; called on the event loop thread only."""
        key = (deployment, version, code)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.count += 1
        series.seconds += seconds
        series.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
