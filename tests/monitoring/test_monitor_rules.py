"""Rules judged on a captured table: error rate, latency, minimum rows, firing transitions."""

from __future__ import annotations

import math

import numpy as np

from aimass.evaluation.monitors import captured_matrix, health, judge
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.routing.prediction_log import calls_table
from tests.monitoring.captures import call


def rules(*items: tuple[str, str, float, int]) -> list[dict]:
    return [
        {"name": n, "metric": f"MONITOR_METRIC_{m}", "threshold": t, "min_rows": r}
        for n, m, t, r in items
    ]


def table_with_failures(failed: int, total: int):
    calls = [
        call(np.ones((2, 3)), None if i < failed else np.ones((2, 2)), float(i),
             code="UNAVAILABLE" if i < failed else "OK")
        for i in range(total)
    ]  # fmt: skip
    return calls_table(calls)


def test_error_rate_counts_calls_not_rows_and_fires_above_the_threshold():
    report = pb.MonitorReport()
    health(report, table_with_failures(3, 20))
    assert (report.rows, report.calls, report.failed_calls) == (40, 20, 3)
    assert report.error_rate == 0.15
    firing, fired = judge(report, rules(("errors", "ERROR_RATE", 0.1, 10)), {})
    assert firing == ["errors"]
    assert fired[0].value == 0.15
    firing, _ = judge(
        pb.MonitorReport(error_rate=0.05, calls=20), rules(("e", "ERROR_RATE", 0.1, 10)), {}
    )
    assert firing == []


def test_latency_percentiles_of_calls():
    report = pb.MonitorReport()
    health(report, table_with_failures(0, 10))
    assert report.latency_p50_ms == 2.0
    assert report.latency_p99_ms == 2.0
    firing, _ = judge(report, rules(("slow", "LATENCY_P99_MS", 1.0, 5)), {})
    assert firing == ["slow"]


def test_a_rule_with_too_few_rows_is_not_judged():
    report = pb.MonitorReport(rows=50, calls=5, error_rate=1.0)
    firing, fired = judge(report, rules(("errors", "ERROR_RATE", 0.1, 10)), {})
    assert (firing, fired) == ([], [])
    assert math.isnan(report.rules[0].value)
    assert "needs 10" in report.rules[0].detail


def test_drift_rule_without_features_says_why():
    report = pb.MonitorReport(rows=500, calls=50)
    firing, _ = judge(report, rules(("drift", "FEATURE_PSI", 0.2, 10)), {"drift": "no reference"})
    assert firing == []
    assert report.rules[0].detail == "no reference"


def test_captured_matrix_refuses_missing_outputs_and_reads_inputs():
    table = table_with_failures(1, 3)
    assert captured_matrix(table, "inputs").shape == (6, 3)
    assert captured_matrix(table, "outputs") is None  # a failed call has no outputs
