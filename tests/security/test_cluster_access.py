"""Access control shared across processes: revocation events and cluster-wide rate limits.

Two servers in this process stand for two service processes: each has its own
AccessControl with its own NATS connection and key cache (trusted for five minutes, so
only the revocation event can make a revoked key fail there in time), both over the
secured stack's database and NATS. Keys are created and revoked through the stack's
AccessService, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import grpc
import pytest
from nats.aio.client import Client

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.core.auth import hook as hook_module
from aimass.core.auth.api import access_service
from aimass.core.auth.cluster import RATE_LIMIT_BUCKET
from aimass.core.auth.hook import AccessControl
from aimass.core.auth.keys import SqlKeyStore
from aimass.core.auth.ratelimit import take_shared
from aimass.core.db.engine import Database
from aimass.core.errors import ResourceExhausted
from aimass.core.server import RunningServer, create_server
from tests.fixtures.stack import free_port
from tests.security.conftest import Secured, key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="package")

LONG_CACHE_S = 300.0
# Far below the cache's 300 s: only the event can explain a refusal this early.
REVOCATION_DEADLINE_S = 10.0


@asynccontextmanager
async def two_processes(
    secured: Secured, **auth: float
) -> AsyncIterator[list[tuple[AccessControl, grpc.aio.Channel]]]:
    """Two AccessService servers, each with its own hook (cache, buckets, NATS link)."""
    settings = secured.settings.model_copy(
        update={
            "auth": secured.settings.auth.model_copy(update={"key_cache_s": LONG_CACHE_S, **auth})
        }
    )
    database = Database(settings.database_url)
    async with AsyncExitStack() as exits:
        exits.callback(database.dispose)
        started = []
        for _ in range(2):
            hook = AccessControl(settings.auth, SqlKeyStore(database), nats_url=settings.nats_url)
            # Another process would not see this one's forget_key() after a revocation here.
            hook_module._hooks.discard(hook)
            await hook.start()
            exits.push_async_callback(hook.close)
            assert hook.cluster.connected, "the hook did not reach NATS"
            server: RunningServer = await create_server(
                "registry", [access_service(SqlKeyStore(database))], settings, port=0, auth=hook
            )
            exits.push_async_callback(server.stop, 0)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            exits.push_async_callback(channel.close)
            started.append((hook, channel))
        yield started


async def whoami(channel: grpc.aio.Channel, key: str) -> grpc.StatusCode:
    stub = access_pb2_grpc.AccessServiceStub(channel)
    try:
        await stub.LookupCallerIdentity(
            access_pb2.LookupCallerIdentityRequest(), metadata=key_metadata(key), timeout=10
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_revoked_key_fails_in_every_process_before_its_cache_expires(
    secured: Secured,
) -> None:
    key = await secured.create_key("cluster-revoked", access_pb2.ROLE_VIEWER)
    async with two_processes(secured) as processes:
        for _, channel in processes:
            assert await whoami(channel, key) == grpc.StatusCode.OK  # now cached for 300 s
        await secured.access().RevokeApiKey(
            access_pb2.RevokeApiKeyRequest(name="apiKeys/cluster-revoked"),
            metadata=key_metadata(secured.admin_key),
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REVOCATION_DEADLINE_S
        for _, channel in processes:
            while (code := await whoami(channel, key)) == grpc.StatusCode.OK:
                assert loop.time() < deadline, "the revocation never reached this process"
                await asyncio.sleep(0.02)
            assert code == grpc.StatusCode.UNAUTHENTICATED
    events = secured.events.of("aimass.access.key.revoked")
    assert [e.subject for e in events] == ["apiKeys/cluster-revoked"]


async def test_two_processes_share_one_keys_budget(secured: Secured) -> None:
    # 0.05 tokens/s and a 60 s burst: a budget of 3 calls, the next token 20 s away.
    key = await secured.create_key("cluster-limited", access_pb2.ROLE_VIEWER, rate_limit_per_s=0.05)
    async with two_processes(secured, rate_limit_burst_s=60.0) as processes:
        codes = [await whoami(processes[i % 2][1], key) for i in range(8)]
    # Per-process buckets would have let 3 through in each process, 6 in all.
    assert codes.count(grpc.StatusCode.OK) == 3, codes
    assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5, codes


async def test_concurrent_takers_on_two_connections_never_spend_a_token_twice(
    secured: Secured,
) -> None:
    clients = []
    key = f"cas-{uuid.uuid4().hex}"
    try:
        for _ in range(2):
            client = Client()
            await client.connect(secured.settings.nats_url)
            clients.append(client)
        buckets = [await c.jetstream().key_value(RATE_LIMIT_BUCKET) for c in clients]
        # 40 tokens, refilled at a rate too small to matter while this runs; 30 takers
        # of 3 each want more than there is.
        takes = [take_shared(buckets[i % 2], key, 1e-6, 40.0, 3.0) for i in range(30)]
        results = await asyncio.gather(*takes, return_exceptions=True)
        left = json.loads((await buckets[0].get(key)).value or b"")["tokens"]
    finally:
        for client in clients:
            await client.close()
    granted = sum(r[0] for r in results if isinstance(r, tuple))
    # A taker that lost every compare-and-set gives up (the limiter then falls back to its
    # local bucket); none may spend a token another one spent: granted + left is the budget.
    assert granted > 0
    assert granted + left == pytest.approx(40.0, abs=0.01), results


async def test_without_nats_a_process_starts_at_once_and_limits_with_its_own_bucket(
    secured: Secured,
) -> None:
    # Nothing listens on this port: the link keeps trying in the background.
    settings = secured.settings.auth.model_copy(
        update={"rate_limit_per_s": 0.05, "rate_limit_burst_s": 60.0}
    )
    hook = AccessControl(settings, None, nats_url=f"nats://127.0.0.1:{free_port()}")
    try:
        await asyncio.wait_for(hook.start(), 1.5)
        assert not hook.cluster.connected
        metadata = {"authorization": f"Bearer {secured.hs_token(role='viewer')}"}
        method = "/aimass.access.v1.AccessService/LookupCallerIdentity"
        outcomes = []
        for _ in range(5):
            try:
                await hook.authenticate(method, metadata)
                outcomes.append("ok")
            except ResourceExhausted:
                outcomes.append("limited")
    finally:
        await hook.close()
    # The per-process bucket: a burst of 3 (0.05/s for 60 s), then refusals.
    assert outcomes == ["ok", "ok", "ok", "limited", "limited"]
