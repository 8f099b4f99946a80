"""No secret ever reaches a log line or an event.

The secured stack (tests/security/conftest.py) captures every log record, formatted by
aimass's JSON formatter, and every event published on ``aimass.>`` from before its first
service started. This flow creates API keys, calls services with keys and JWTs (good,
revoked, forged, expired), makes a webhook (its signing secret is generated and returned
once), uploads an artifact to the s3:// store (signed with the configured S3 secret) and
downloads it again; then searches everything said for each secret: the API keys (whole
and their secret part), the JWTs and the HS256 secret, the webhook secret, the S3 secret,
the database password and the internal token.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest

from aimass.access.v1 import access_pb2, webhooks_pb2, webhooks_pb2_grpc
from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2 as reg
from aimass.registry.v1 import registry_pb2_grpc
from tests.security.conftest import Secured, bearer, key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def _upload(
    stub: registry_pb2_grpc.RegistryServiceStub, data: bytes, md: tuple
) -> common_pb2.Artifact:
    header = reg.UploadArtifactHeader(
        kind="onnx",
        file_name="model.onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )

    async def messages() -> AsyncIterator[reg.UploadArtifactRequest]:
        yield reg.UploadArtifactRequest(header=header)
        yield reg.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=data))

    return await stub.UploadArtifact(messages(), metadata=md)


async def _refused(awaitable: object) -> grpc.StatusCode:
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _run_flow(secured: Secured) -> dict[str, str]:
    """Everything that handles a secret, good paths and refused ones; the secrets used."""
    developer = await secured.create_key("leak-dev", access_pb2.ROLE_DEVELOPER)
    viewer = await secured.create_key("leak-viewer", access_pb2.ROLE_VIEWER)
    registry = registry_pb2_grpc.RegistryServiceStub(secured.channel_of("registry"))
    data = data_pb2_grpc.DataServiceStub(secured.channel_of("data"))
    dev = key_metadata(developer)

    await registry.CreateRegisteredModel(
        reg.CreateRegisteredModelRequest(
            registered_model=reg.RegisteredModel(description="leak check"),
            registered_model_id="leak-model",
        ),
        metadata=dev,
    )
    artifact = await _upload(registry, b"not really onnx but bytes" * 100, dev)
    assert artifact.uri.startswith("s3://")
    version = await registry.CreateModelVersion(
        reg.CreateModelVersionRequest(
            parent="models/leak-model",
            model_version=reg.ModelVersion(artifacts=[artifact]),
        ),
        metadata=dev,
    )
    chunks = registry.DownloadArtifact(
        reg.DownloadArtifactRequest(name=version.name, kind="onnx"), metadata=dev
    )
    assert b"".join([c.data async for c in chunks]).startswith(b"not really")
    jwt = secured.hs_token(role="viewer")
    await data.ListDatasets(data_pb2.ListDatasetsRequest(), metadata=bearer(jwt))

    webhooks = webhooks_pb2_grpc.WebhookServiceStub(secured.channel_of("registry"))
    hook = await webhooks.CreateWebhook(
        webhooks_pb2.CreateWebhookRequest(
            webhook_id="leak-hook",
            webhook=webhooks_pb2.Webhook(
                url="http://127.0.0.1:9/hook", event_types=["aimass.registry.>"]
            ),
        ),
        metadata=key_metadata(secured.admin_key),
    )
    assert hook.secret

    # Refused calls log and count too; their credentials must not show either.
    assert (
        await _refused(
            registry.DeleteRegisteredModel(
                reg.DeleteRegisteredModelRequest(name="models/leak-model"),
                metadata=key_metadata(viewer),
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    await secured.access().RevokeApiKey(
        access_pb2.RevokeApiKeyRequest(name="apiKeys/leak-viewer"),
        metadata=key_metadata(secured.admin_key),
    )
    listing = reg.ListRegisteredModelsRequest()
    assert (
        await _refused(registry.ListRegisteredModels(listing, metadata=key_metadata(viewer)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    expired = secured.hs_token(role="admin", exp=1_000_000, iat=999_000)
    forged = jwt[:-6] + "AAAAAA"
    for token in (expired, forged):
        assert (
            await _refused(registry.ListRegisteredModels(listing, metadata=bearer(token)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    wrong_secret = developer[:-6] + "AAAAAA"
    assert (
        await _refused(registry.ListRegisteredModels(listing, metadata=key_metadata(wrong_secret)))
        == grpc.StatusCode.UNAUTHENTICATED
    )

    # Let the outbox relay publish what the flow committed.
    await secured.events.wait_for(
        lambda seen: any(e.topic.startswith("aimass.registry.version") for e in seen)
    )
    await asyncio.sleep(1.0)
    return {
        **secured.secrets,
        "webhook secret": hook.secret,
        "forged jwt": forged,
        "expired jwt": expired,
        "wrong api key": wrong_secret,
    }


def _needles(secrets: dict[str, str]) -> dict[str, str]:
    """Each secret, and for API keys (aimass_<id>_<secret>) also the secret part alone."""
    needles = dict(secrets)
    for what, value in secrets.items():
        if value.startswith("aimass_"):
            needles[f"{what} (secret part)"] = value.rsplit("_", 1)[-1]
        if value.count(".") == 2:
            needles[f"{what} (signature)"] = value.rsplit(".", 1)[-1]
    return {what: value for what, value in needles.items() if len(value) >= 12}


async def test_no_secret_reaches_a_log_line_or_an_event(secured):
    secrets = await _run_flow(secured)
    needles = _needles(secrets)
    assert len(needles) >= 12
    lines = list(secured.logs.lines)
    events = [(e.topic, e.SerializeToString()) for e in secured.events.envelopes]
    assert lines, "the capture saw no log record at all"
    assert any(topic.startswith("aimass.registry.") for topic, _ in events)
    leaks = [
        f"{what} in log line: {line[:300]}"
        for line in lines
        for what, value in needles.items()
        if value in line
    ] + [
        f"{what} in event {topic}"
        for topic, raw in events
        for what, value in needles.items()
        if value.encode() in raw
    ]
    assert not leaks, "\n".join(leaks)
