"""deploy/prometheus/alerts.yml: every expression parses as PromQL, every rule is
complete, and the issue's alerts (error rate, backlog, down, job failures) exist."""

from __future__ import annotations

import re

import grpc
import promql_parser
import pytest
import yaml

from tests.deploy.deploy_files import PROMETHEUS

RULES = [
    rule
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    for rule in group["rules"]
]


@pytest.mark.parametrize("rule", RULES, ids=[r["alert"] for r in RULES])
def test_rule_is_valid_promql_with_severity_and_summary(rule):
    promql_parser.parse(rule["expr"])
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


def test_a_broken_expression_is_rejected():
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum(rate(grpc_server_handled_total[5m])")


def test_alert_names_are_unique():
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names))


def test_the_issue_alerts_are_present():
    exprs = {r["alert"]: r["expr"] for r in RULES}
    assert "grpc_server_handled_total" in exprs["AimassHighErrorRate"]
    assert 'stream_name="AIMASS_JOBS"' in exprs["AimassJobQueueBacklog"]
    assert "up{" in exprs["AimassServiceDown"]
    assert 'aimass_jobs_total{state="FAILED"}' in exprs["AimassJobFailures"]
    assert "up{" in exprs["TritonDown"]


def test_aimass_metrics_in_alerts_are_the_ones_the_services_export():
    from prometheus_client import REGISTRY

    from aimass.core import metrics  # noqa: F401 - registers the metrics

    exported = {s.name for family in REGISTRY.collect() for s in family.samples} | {
        family.name for family in REGISTRY.collect()
    }
    used = {
        name
        for rule in RULES
        for name in re.findall(r"\b(aimass_[a-z_]+|grpc_server_[a-z_]+)", rule["expr"])
    }
    assert used, "no aimass metric in the alert rules"
    # A metric with no sample yet exports only its family name: compare on both.
    suffixes = ("_total", "_bucket", "_count", "_sum")
    missing = {
        name
        for name in used
        if name not in exported
        and not any(name.removesuffix(suffix) in exported for suffix in suffixes)
    }
    assert not missing
    for state in re.findall(r"aimass_jobs_total\{[^}]*state=~?\"([^\"]+)\"", str(RULES)):
        assert set(state.split("|")) <= {"SUCCEEDED", "FAILED", "CANCELLED"}, state
    # The interceptor labels codes with grpc.StatusCode names (INTERNAL), not gRPC's
    # CamelCase spelling (Internal): a rule on the other spelling would never fire.
    codes = {code.name for code in grpc.StatusCode}
    for matched in re.findall(r"grpc_code=~?\"([^\"]+)\"", str(RULES)):
        assert set(matched.split("|")) <= codes, matched


def test_alerts_name_scrape_jobs_that_prometheus_has():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"aimass", "aimass-training-worker", "triton", "nats"} <= jobs
    for rule in RULES:
        for job in ("aimass", "triton", "nats"):
            if f'job="{job}"' in rule["expr"]:
                assert job in jobs
