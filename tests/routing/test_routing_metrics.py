"""The router's per-request metrics: plain counters on the hot path, exposed as Prometheus
series when scraped (counts by code, latency histogram summed over codes)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aimass.routing.metrics import RoutingMetrics

DEPLOYMENT, VERSION = "deployments/d", "models/m/versions/1"


def scraped(metrics: RoutingMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_by_code_and_cumulative_latency_buckets():
    metrics = RoutingMetrics()
    for seconds in (0.0004, 0.001, 0.003, 20.0):
        metrics.observe(DEPLOYMENT, VERSION, "OK", seconds)
    metrics.observe(DEPLOYMENT, VERSION, "INVALID_ARGUMENT", 0.0001)
    values = scraped(metrics)
    labels = (("deployment", DEPLOYMENT), ("model_version", VERSION))

    def requests(code: str) -> float:
        key = tuple(sorted((*labels, ("code", code))))
        return values[("aimass_predict_requests_total", key)]

    def bucket(le: str) -> float:
        return values[
            ("aimass_predict_latency_seconds_bucket", tuple(sorted((*labels, ("le", le)))))
        ]

    assert requests("OK") == 4
    assert requests("INVALID_ARGUMENT") == 1
    # Buckets are cumulative and inclusive (le), over every code.
    assert bucket("0.0005") == 2
    assert bucket("0.001") == 3
    assert bucket("0.005") == 4
    assert bucket("10.0") == 4
    assert bucket("+Inf") == 5
    assert values[("aimass_predict_latency_seconds_count", labels)] == 5
    assert abs(values[("aimass_predict_latency_seconds_sum", labels)] - 20.0045) < 1e-9
