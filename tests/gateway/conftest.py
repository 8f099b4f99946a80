"""One secured stack per test module: registry (with the AccessService) and data, auth on,
an admin key written by the same bootstrap `aimass up` uses, JWTs (HS256 secret and an RS256
JWKS file), and the built-in REST gateway in front, all in this process on free ports."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.core.auth.bootstrap import ensure_admin_key, read_admin_key
from aimass.core.db.migrate import upgrade
from aimass.core.settings import Settings
from aimass.gateway.app import Gateway
from aimass.gateway.descriptors import Descriptors, descriptor_set_from_modules
from aimass.gateway.server import start_gateway
from aimass.registry.v1 import registry_pb2_grpc
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import Stack, serve_stack, stack_settings

HS_SECRET = "an-hs256-secret-that-is-long-enough-0123456789"
ISSUER = "https://issuer.aimass.test"
INTERNAL_TOKEN = "internal-token-for-tests-0123456789"
MAX_BODY = 64 * 1024


@dataclass
class Secured:
    settings: Settings
    stack: Stack
    admin_key: str
    rsa_key: RSAKey
    gateway_url: str
    http: aiohttp.ClientSession

    def access(self) -> access_pb2_grpc.AccessServiceStub:
        return access_pb2_grpc.AccessServiceStub(self.stack.channel("registry"))

    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.stack.channel("registry"))

    async def create_key(self, key_id: str, role: int, **fields: Any) -> access_pb2.ApiKey:
        return await self.access().CreateApiKey(
            access_pb2.CreateApiKeyRequest(
                api_key=access_pb2.ApiKey(role=role, **fields), api_key_id=key_id
            ),
            metadata=key_metadata(self.admin_key),
        )

    def hs_token(self, **claims: Any) -> str:
        return jwt.encode({"alg": "HS256"}, _claims(claims), OctKey.import_key(HS_SECRET))

    def rs_token(self, key: RSAKey | None = None, **claims: Any) -> str:
        key = key or self.rsa_key
        return jwt.encode({"alg": "RS256", "kid": key.kid}, _claims(claims), key)

    def url(self, path: str) -> str:
        return self.gateway_url + path


async def assert_throttled(send: Callable[[], Awaitable[aiohttp.ClientResponse]]) -> None:
    """Three calls of a key allowed 0.2 per second: the first passes, a later one gets 429
    with a Retry-After of at least a second."""
    statuses, retry_after = [], None
    for _ in range(3):
        async with await send() as reply:
            statuses.append(reply.status)
            retry_after = reply.headers.get("Retry-After", retry_after)
    assert statuses[0] == 200
    assert 429 in statuses
    assert retry_after is not None
    assert int(retry_after) >= 1


def _claims(claims: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "sub": "someone@example.com", "iat": now, "exp": now + 600}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def key_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def new_rsa_key() -> RSAKey:
    key = RSAKey.generate_key(2048, private=True)
    key.ensure_kid()
    return key


def _write_jwks(path: Path, key: RSAKey) -> Path:
    path.write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    return path


@pytest.fixture(scope="module")
def nats_module(tmp_path_factory: pytest.TempPathFactory):
    server = NatsServer(tmp_path_factory.mktemp("gw-nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory, nats_module) -> AsyncIterator[Secured]:
    home = tmp_path_factory.mktemp("gw-home")
    db_url = f"sqlite:///{home / 'aimass.db'}"
    upgrade(db_url)
    rsa_key = new_rsa_key()
    settings = stack_settings(
        home,
        db_url,
        nats_module.url,
        auth={
            "enabled": True,
            "hs256_secret": HS_SECRET,
            "jwt_issuer": ISSUER,
            "jwks_file": _write_jwks(home / "jwks.json", rsa_key),
            "internal_token": INTERNAL_TOKEN,
        },
    )
    ensure_admin_key(home, db_url)
    admin_key = read_admin_key(home)
    assert admin_key
    async with serve_stack(settings, ["registry", "data"]) as stack:
        gateway = Gateway(
            settings,
            Descriptors(descriptor_set_from_modules()),
            addresses={name: stack.address(name) for name in stack.servers},
            max_body_bytes=MAX_BODY,
        )
        runner, port = await start_gateway(settings, gateway, port=0)
        async with aiohttp.ClientSession() as http:
            try:
                yield Secured(settings, stack, admin_key, rsa_key, f"http://127.0.0.1:{port}", http)
            finally:
                await runner.cleanup()


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    """The error an RPC fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value
