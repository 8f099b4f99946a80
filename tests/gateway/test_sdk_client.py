"""The Python SDK (aimass.client) against the secured stack: the same resources awaited and
blocking, credentials from AIMASS_API_KEY, job handles that wait, and typed errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimass.client import AsyncClient, Client, ClientError
from aimass.common.v1 import common_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _addresses(secured) -> dict[str, str]:
    return {name: secured.stack.address(name) for name in secured.stack.servers}


async def test_async_client_models_and_datasets(secured):
    async with AsyncClient(api_key=secured.admin_key, addresses=_addresses(secured)) as client:
        created = await client.models.create("sdk-model", description="from the SDK")
        assert created.name == "models/sdk-model"
        fetched = await client.models.get("sdk-model")
        assert fetched.description == "from the SDK"
        updated = await client.models.update("sdk-model", etag=fetched.etag, description="new")
        assert updated.description == "new"
        assert "models/sdk-model" in [m.name for m in await client.models.list()]
        csv = secured.settings.home / "data" / "sdk.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
        await client.datasets.create("sdk-data", data_path=str(csv), label_column="label")
        job = await client.datasets.ingest("sdk-data")
        events = []
        final = await job.wait(on_event=events.append)
        assert final.status.state == common_pb2.JOB_STATE_SUCCEEDED, final.status.reason
        assert events
        version = await client.datasets.get_version(final.dataset_version)
        assert version.total_rows == 40
        identity = await client.api_keys.whoami()
        assert identity.subject.startswith("apiKeys/admin")
        hook = await client.webhooks.create("sdk-hook", "http://127.0.0.1:9/x", ["aimass.data.>"])
        assert hook.secret
        assert "webhooks/sdk-hook" in [w.name for w in await client.webhooks.list()]
        await client.webhooks.delete("sdk-hook")


async def test_errors_carry_the_code_and_the_message(secured):
    async with AsyncClient(api_key=secured.admin_key, addresses=_addresses(secured)) as client:
        with pytest.raises(ClientError) as caught:
            await client.models.get("no-such-model")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in caught.value.message
    async with AsyncClient(api_key="aimass_nobody_x", addresses=_addresses(secured)) as client:
        with pytest.raises(ClientError) as caught:
            await client.models.list()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_unavailable_is_retried_then_reported(secured, tmp_path):
    from tests.fixtures.stack import free_port

    nowhere = {"registry": f"127.0.0.1:{free_port()}"}
    async with AsyncClient(api_key=secured.admin_key, addresses=nowhere, retries=2) as client:
        with pytest.raises(ClientError) as caught:
            await client.models.list()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_sync_client_reads_the_key_from_the_environment(secured, monkeypatch):
    developer = (await secured.create_key("sdk-sync", 2)).secret
    monkeypatch.setenv("AIMASS_API_KEY", developer)
    addresses = _addresses(secured)
    csv = secured.settings.home / "data" / "sdk-sync.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(30)))

    def blocking() -> tuple[str, list[str], str]:
        with Client(addresses=addresses) as client:
            assert client.config.api_key == developer
            client.models.create("sdk-sync-model")
            names = [m.name for m in client.models.list()]
            client.datasets.create("sdk-sync-data", data_path=str(csv), label_column="label")
            job = client.datasets.ingest("sdk-sync-data")
            final = job.wait()
            return client.api_keys.whoami().subject, names, final.name

    subject, names, job_name = await asyncio.to_thread(blocking)
    assert subject == "apiKeys/sdk-sync"
    assert "models/sdk-sync-model" in names
    assert job_name.startswith("ingestJobs/")
