"""A drifted input stream fires an alert, a steady one does not; captured calls are exact.

Real services: data, registry, routing (in-process ONNX Runtime), evaluation, NATS,
SQLite and PostgreSQL. Both monitors run on their own schedule (1 s).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from aimass.access.v1 import webhooks_pb2, webhooks_pb2_grpc
from aimass.core.artifacts import open_artifact_store
from aimass.core.auth.webhooks import verify_signature
from aimass.evaluation.v1 import evaluation_pb2 as epb
from aimass.events.v1 import events_pb2
from aimass.routing.v1 import routing_pb2 as rpb
from tests.fixtures.stack import record_events

# Judged only near the full stream (569 rows): a scheduled run may see part of it, and a
# small part of a steady stream can look drifted by chance.
PSI_RULE = epb.AlertRule(
    name="input-drift", metric=epb.MONITOR_METRIC_FEATURE_PSI, threshold=0.25, min_rows=500
)
ERROR_RULE = epb.AlertRule(
    name="errors", metric=epb.MONITOR_METRIC_ERROR_RATE, threshold=0.05, min_rows=10
)


def monitor(deployment: str) -> epb.Monitor:
    return epb.Monitor(
        deployment=deployment,
        interval=duration_pb2.Duration(seconds=1),
        window=duration_pb2.Duration(seconds=600),
        rules=[PSI_RULE, ERROR_RULE],
    )


async def send(env, deployment: str, rows: np.ndarray, batch: int = 16) -> None:
    for start in range(0, len(rows), batch):
        await env.predict(deployment, rows[start : start + batch])


async def wait_for_report(env, name: str, rows: int) -> epb.Monitor:
    """The monitor once a scheduled run has seen ``rows`` captured rows."""
    for _ in range(300):
        current = await env.evaluation.GetMonitor(epb.GetMonitorRequest(name=name))
        if current.last_report.rows >= rows:
            return current
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reported {rows} rows: {current.last_report}")


class Receiver:
    """A local HTTP endpoint that records the webhook POSTs it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return web.Response(status=204)


async def start_receiver() -> tuple[Receiver, web.AppRunner, str]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/alerts", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return receiver, runner, f"http://127.0.0.1:{port}/alerts"


async def test_drifted_stream_fires_an_alert_and_steady_one_does_not(monitoring, nats_url):
    env = monitoring
    receiver, runner, url = await start_receiver()
    webhook = await webhooks_pb2_grpc.WebhookServiceStub(
        env.stack.channel("registry")
    ).CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(
            webhook_id="alerts",
            webhook=webhooks_pb2.Webhook(url=url, event_types=["aimass.monitoring.alert.fired"]),
        )
    )
    rng = np.random.default_rng(0)
    steady = env.features[rng.permutation(len(env.features))]
    # Drift: the measurements come in on another scale (a unit change upstream).
    drifted = steady * 1.6 + steady.std(axis=0) * 0.5
    async with record_events(
        nats_url, "monitoring-test", ["aimass.monitoring.>", "aimass.routing.predictions.>"]
    ) as events:
        for deployment_id in ("steady", "drifted"):
            await env.deploy(deployment_id, sample_rate=1.0)
            await env.evaluation.CreateMonitor(
                epb.CreateMonitorRequest(
                    monitor_id=deployment_id, monitor=monitor(f"deployments/{deployment_id}")
                )
            )
        await asyncio.gather(
            send(env, "deployments/steady", steady), send(env, "deployments/drifted", drifted)
        )
        quiet = await wait_for_report(env, "monitors/steady", len(steady))
        loud = await wait_for_report(env, "monitors/drifted", len(drifted))
        fired = await events.wait_for(
            lambda log: any(e.topic == "aimass.monitoring.alert.fired" for e in log)
        )

    # Steady: every feature stable, nothing firing, no alert.
    report = quiet.last_report
    assert report.rows == len(steady)
    assert report.calls == (len(steady) + 15) // 16
    assert report.reference_dataset_version == env.dataset_version
    assert report.model_version == env.version
    assert len(report.features) == 30
    assert max(f.psi for f in report.features) < 0.25, report.features
    assert report.prediction_psi < 0.1
    assert report.error_rate == 0
    assert report.latency_p99_ms > 0
    assert list(quiet.firing_rules) == []
    assert not (await env.evaluation.ListAlerts(epb.ListAlertsRequest(parent=quiet.name))).alerts

    # Drifted: the PSI rule fires once, with an alert and an event naming the worst feature.
    report = loud.last_report
    assert max(f.psi for f in report.features) > 1.0
    assert list(loud.firing_rules) == ["input-drift"]
    alerts = (await env.evaluation.ListAlerts(epb.ListAlertsRequest(parent=loud.name))).alerts
    assert [a.rule for a in alerts] == ["input-drift"]
    assert alerts[0].value > 0.25
    assert alerts[0].feature
    alert_events = [e for e in fired if e.topic == "aimass.monitoring.alert.fired"]
    assert len(alert_events) == 1
    payload = events_pb2.AlertFired()
    alert_events[0].payload.Unpack(payload)
    assert payload.monitor == "monitors/drifted"
    assert payload.deployment == "deployments/drifted"
    assert payload.metric == "FEATURE_PSI"
    assert payload.alert == alerts[0].name

    # The webhook subscribed to alerts got it, signed.
    await asyncio.wait_for(receiver.arrived.wait(), 30)
    await runner.cleanup()
    headers, body = receiver.requests[0]
    assert headers["x-aimass-event-type"] == "aimass.monitoring.alert.fired"
    assert verify_signature(
        webhook.secret, headers["x-aimass-timestamp"], body, headers["x-aimass-signature"]
    )
    assert json.loads(body)["payload"]["alert"] == alerts[0].name

    # Another run keeps the rule firing without a second alert.
    again = await env.evaluation.RunMonitor(epb.RunMonitorRequest(name=loud.name))
    assert [r.firing for r in again.rules if r.rule == "input-drift"] == [True]
    alerts = (await env.evaluation.ListAlerts(epb.ListAlertsRequest(parent=loud.name))).alerts
    assert len(alerts) == 1

    # The captured Parquet holds exactly what was sent (float32) with the call's fields.
    logged = [e for e in fired if e.topic == "aimass.routing.predictions.logged"]
    files = []
    for envelope in logged:
        batch = events_pb2.PredictionsLogged()
        envelope.payload.Unpack(batch)
        if batch.deployment == "deployments/steady":
            files.append(batch)
    assert sum(f.rows for f in files) == len(steady)
    store = open_artifact_store(env.stack.settings.artifact_root)
    tables = []
    for index, batch in enumerate(files):
        path = env.stack.settings.home / f"logged-{index}.parquet"
        await store.get_file(batch.artifact_uri, path)
        tables.append(pq.read_table(path))
    captured = np.concatenate(
        [np.array(t.column("inputs.input").to_pylist(), dtype=np.float32) for t in tables]
    )
    sent = steady.astype(np.float32)
    # Calls run in order per deployment, so rows arrive in the order sent.
    np.testing.assert_array_equal(captured, sent)
    assert set(tables[0].column("request_id").to_pylist()) == {"test-req"}
    assert set(tables[0].column("model_version").to_pylist()) == {env.version}


async def test_sample_rate_outside_0_1_is_refused_and_nothing_is_created(monitoring):
    env = monitoring
    for rate in (1.5, -0.1, float("nan")):
        config = rpb.ServingConfig(prediction_logging=rpb.PredictionLogging(sample_rate=rate))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.routing.CreateDeployment(
                rpb.CreateDeploymentRequest(
                    deployment_id="bad",
                    deployment=rpb.Deployment(
                        routes=[rpb.Route(model=env.version, weight_percent=100)],
                        serving_config=config,
                    ),
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prediction_logging.sample_rate" in caught.value.details()
        assert field_violations(caught.value) == [
            "deployment.serving_config.prediction_logging.sample_rate"
        ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.routing.GetDeployment(rpb.GetDeploymentRequest(name="deployments/bad"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_monitors_are_refused_naming_the_field(monitoring):
    env = monitoring
    cases = {
        "monitor.deployment": epb.Monitor(deployment="steady"),
        "monitor.interval": epb.Monitor(
            deployment="deployments/d", interval=duration_pb2.Duration(nanos=1000)
        ),
        "monitor.rules[0].metric": epb.Monitor(
            deployment="deployments/d", rules=[epb.AlertRule(name="x", threshold=1)]
        ),
        "monitor.rules[0].threshold": epb.Monitor(
            deployment="deployments/d",
            rules=[epb.AlertRule(name="x", metric=epb.MONITOR_METRIC_ERROR_RATE, threshold=-1)],
        ),
    }
    for field, bad in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.evaluation.CreateMonitor(
                epb.CreateMonitorRequest(monitor_id="bad", monitor=bad)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(caught.value) == [field], caught.value.details()
    listed = await env.evaluation.ListMonitors(epb.ListMonitorsRequest())
    assert not listed.monitors


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                request = error_details_pb2.BadRequest()
                if detail.Unpack(request):
                    return [v.field for v in request.field_violations]
    return []


async def test_monitor_update_pause_list_and_delete(monitoring):
    env = monitoring
    created = await env.evaluation.CreateMonitor(
        epb.CreateMonitorRequest(monitor_id="m1", monitor=monitor("deployments/a"))
    )
    await env.evaluation.CreateMonitor(
        epb.CreateMonitorRequest(monitor_id="m2", monitor=monitor("deployments/b"))
    )
    assert created.name == "monitors/m1"
    assert created.bins == 10
    assert created.HasField("next_run_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.evaluation.CreateMonitor(
            epb.CreateMonitorRequest(monitor_id="m1", monitor=monitor("deployments/a"))
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS

    listed = await env.evaluation.ListMonitors(
        epb.ListMonitorsRequest(filter='deployment = "deployments/b"')
    )
    assert [m.name for m in listed.monitors] == ["monitors/m2"]

    paused = await env.evaluation.UpdateMonitor(
        epb.UpdateMonitorRequest(
            monitor=epb.Monitor(name="monitors/m1", paused=True, rules=[ERROR_RULE]),
            update_mask=field_mask_pb2.FieldMask(paths=["paused", "rules"]),
        )
    )
    assert paused.paused
    assert [r.name for r in paused.rules] == ["errors"]
    assert not paused.HasField("next_run_time")
    assert paused.etag != created.etag
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.evaluation.UpdateMonitor(
            epb.UpdateMonitorRequest(
                monitor=epb.Monitor(name="monitors/m1", deployment="deployments/z"),
                update_mask=field_mask_pb2.FieldMask(paths=["deployment"]),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.evaluation.DeleteMonitor(
            epb.DeleteMonitorRequest(name="monitors/m1", etag=created.etag)
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED

    # A run with nothing captured reports zero rows and judges nothing.
    report = await env.evaluation.RunMonitor(epb.RunMonitorRequest(name="monitors/m2"))
    assert report.rows == 0
    assert not any(r.firing for r in report.rules)

    await env.evaluation.DeleteMonitor(epb.DeleteMonitorRequest(name="monitors/m1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.evaluation.GetMonitor(epb.GetMonitorRequest(name="monitors/m1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    everything = await env.evaluation.ListAlerts(epb.ListAlertsRequest(parent="monitors/-"))
    assert not everything.alerts
