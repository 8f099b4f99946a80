"""Webhooks against a local receiver: registered per event type, HMAC-signed bodies, retries
with backoff after failures, the delivery log, and the bad-input cases."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import pytest_asyncio
from aiohttp import web

from aimass.access.v1 import access_pb2, webhooks_pb2, webhooks_pb2_grpc
from aimass.core.auth.webhooks import subject_matches, verify_signature
from aimass.registry.v1 import registry_pb2 as rpb
from tests.gateway.conftest import key_metadata, rpc_error

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Receiver:
    """An HTTP endpoint that fails its first ``failures`` requests with 500."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if len(self.requests) <= self.failures:
            return web.Response(status=500, text="not yet")
        return web.Response(status=204)


@pytest_asyncio.fixture(loop_scope="module")
async def receiver():
    target = Receiver(failures=2)
    app = web.Application()
    app.router.add_post("/hook", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    target.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    yield target
    await runner.cleanup()


def _stub(secured) -> webhooks_pb2_grpc.WebhookServiceStub:
    return webhooks_pb2_grpc.WebhookServiceStub(secured.stack.channel("registry"))


async def _deliveries(secured, webhook: str) -> list[webhooks_pb2.WebhookDelivery]:
    reply = await _stub(secured).ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(parent=webhook),
        metadata=key_metadata(secured.admin_key),
    )
    return list(reply.webhook_deliveries)


async def test_subject_patterns_match_like_nats():
    assert subject_matches("aimass.registry.version.*", "aimass.registry.version.created")
    assert not subject_matches("aimass.registry.version.*", "aimass.registry.alias.moved")
    assert subject_matches("aimass.registry.>", "aimass.registry.alias.moved")
    assert not subject_matches("aimass.registry.>", "aimass.registry")
    assert not subject_matches("aimass.registry.version", "aimass.registry.version.created")


async def test_events_are_delivered_signed_and_retried_until_accepted(secured, receiver):
    metadata = key_metadata(secured.admin_key)
    created = await _stub(secured).CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(
            webhook_id="versions",
            webhook=webhooks_pb2.Webhook(
                url=receiver.url, event_types=["aimass.registry.version.*"]
            ),
        ),
        metadata=metadata,
    )
    assert created.secret
    got = await _stub(secured).GetWebhook(
        webhooks_pb2.GetWebhookRequest(name="webhooks/versions"), metadata=metadata
    )
    assert got.secret == ""
    await _stub(secured).CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(
            webhook_id="aliases-only",
            webhook=webhooks_pb2.Webhook(
                url=receiver.url, event_types=["aimass.registry.alias.moved"]
            ),
        ),
        metadata=metadata,
    )
    registry = secured.registry()
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="hooked"), metadata=metadata
    )
    version = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(parent="models/hooked", model_version=rpb.ModelVersion()),
        metadata=metadata,
    )
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        log = await _deliveries(secured, "webhooks/versions")
        if log and log[0].state != webhooks_pb2.DELIVERY_STATE_PENDING:
            break
        assert asyncio.get_running_loop().time() < deadline, log
        await asyncio.sleep(0.2)
    (delivery,) = log
    assert delivery.state == webhooks_pb2.DELIVERY_STATE_SUCCEEDED, delivery
    assert delivery.attempts == 3
    assert delivery.last_status_code == 204
    assert delivery.event_type == "aimass.registry.version.created"
    assert len(receiver.requests) == 3
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1, "every attempt sends the same body"
    headers, body = receiver.requests[-1]
    assert verify_signature(
        created.secret, headers["x-aimass-timestamp"], body, headers["x-aimass-signature"]
    )
    assert not verify_signature(
        "another-secret", headers["x-aimass-timestamp"], body, headers["x-aimass-signature"]
    )
    event = json.loads(body)
    assert event["id"] == headers["x-aimass-event-id"] == delivery.event_id
    assert event["payload"]["modelVersion"] == version.name
    assert await _deliveries(secured, "webhooks/aliases-only") == []


async def test_bad_webhooks_are_refused(secured):
    metadata = key_metadata(secured.admin_key)
    cases = [
        ("bad-url", webhooks_pb2.Webhook(url="ftp://x", event_types=["aimass.>"]), "url"),
        ("no-types", webhooks_pb2.Webhook(url="http://127.0.0.1:9/x"), "event_types"),
        (
            "bad-type",
            webhooks_pb2.Webhook(url="http://127.0.0.1:9/x", event_types=["other.>"]),
            "event_types",
        ),
        ("Bad_Id", webhooks_pb2.Webhook(url="http://127.0.0.1:9/x", event_types=["aimass.>"]),
         "webhook_id"),
    ]  # fmt: skip
    for webhook_id, webhook, field in cases:
        err = await rpc_error(
            _stub(secured).CreateWebhook(
                webhooks_pb2.CreateWebhookRequest(webhook_id=webhook_id, webhook=webhook),
                metadata=metadata,
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, webhook_id
        assert field in err.details()
    developer = (await secured.create_key("hook-dev", access_pb2.ROLE_DEVELOPER)).secret
    err = await rpc_error(
        _stub(secured).ListWebhooks(
            webhooks_pb2.ListWebhooksRequest(), metadata=key_metadata(developer)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
