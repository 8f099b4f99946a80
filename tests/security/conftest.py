"""One secured stack for the security tests: every service (and the pipeline) with auth on.

The stack runs on PostgreSQL reached with a password in its URL, an s3:// artifact root
with its own access key and secret (moto), an HS256 secret, an internal token and an admin
key from the same bootstrap `aimass up` uses. Every log record (root at INFO, aimass.* at
DEBUG) is formatted by aimass's JsonFormatter into ``Secured.logs.lines`` and every event
on ``aimass.>`` lands in ``Secured.events`` from before the first service starts, so the
secrets test can search everything the stack said.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from joserfc import jwt
from joserfc.jwk import OctKey
from sqlalchemy import text
from sqlalchemy.engine import URL

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.core.auth.bootstrap import ensure_admin_key, read_admin_key
from aimass.core.db.migrate import upgrade
from aimass.core.logging import JsonFormatter
from aimass.core.settings import S3Settings, Settings
from tests.fixtures.nats import NatsServer
from tests.fixtures.postgres import _admin_engine
from tests.fixtures.s3 import S3Server
from tests.fixtures.stack import EventLog, Stack, free_port, record_events, serve_stack
from tests.fixtures.stack import stack_settings as base_stack_settings

HS_SECRET = "hs256-secret-Vq7mZ2pL9xR4tK8wN3bC6yH1jF5dS0aG"
ISSUER = "https://issuer.security.aimass.test"
INTERNAL_TOKEN = "internal-token-Jk3nB8vC2xZ7qW5eR9tY1uI4oP6aS0dF"
DB_PASSWORD = "db-password-Xw4rT9yU2iO7pA3sD8fG1hJ6kL5zC0vB"
S3_ACCESS_KEY = "AKIASECURITYTESTKEY7Q"
S3_SECRET = "s3-secret-Mn5bV8cX2zL7kJ4hG9fD1sA6qW3eR0tY"
PROCESSES = ["registry", "data", "training", "evaluation", "compression", "routing", "pipeline"]


class CapturedLogs(logging.Handler):
    """Every record, formatted exactly as a service writes it with log_format=json."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter("security-test"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Secured:
    settings: Settings
    stack: Stack
    admin_key: str
    events: EventLog
    logs: CapturedLogs
    secrets: dict[str, str] = field(default_factory=dict)

    def channel_of(self, process: str) -> grpc.aio.Channel:
        return self.stack.channel(process)

    def access(self) -> access_pb2_grpc.AccessServiceStub:
        return access_pb2_grpc.AccessServiceStub(self.stack.channel("registry"))

    async def create_key(self, key_id: str, role: int, **fields: Any) -> str:
        created = await self.access().CreateApiKey(
            access_pb2.CreateApiKeyRequest(
                api_key=access_pb2.ApiKey(role=role, **fields), api_key_id=key_id
            ),
            metadata=key_metadata(self.admin_key),
        )
        self.secrets[f"api key {key_id}"] = created.secret
        return created.secret

    def hs_token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "someone@example.com", "iat": now, "exp": now + 600}
        body.update(claims)
        token = jwt.encode({"alg": "HS256"}, body, OctKey.import_key(HS_SECRET))
        self.secrets[f"jwt {claims}"] = token
        return token


def key_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="package")
def security_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("sec-nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def security_db_url(pg_server_url: URL) -> Iterator[str]:
    """A fresh PostgreSQL database whose URL carries a password (the server may ignore it)."""
    name = f"aimass_sec_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(pg_server_url)
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_server_url.set(database=name, password=DB_PASSWORD)
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def secured(
    tmp_path_factory: pytest.TempPathFactory,
    security_nats: NatsServer,
    security_db_url: str,
    s3_server: S3Server,
) -> AsyncIterator[Secured]:
    logs = CapturedLogs()
    root = logging.getLogger()
    # INFO, the level services run at, and aimass's own loggers down to DEBUG: a secret in
    # a debug line would reach the logs of anyone who turns debugging on.
    level, ours = root.level, logging.getLogger("aimass")
    ours_level = ours.level
    root.setLevel(logging.INFO)
    ours.setLevel(logging.DEBUG)
    root.addHandler(logs)
    try:
        async with (
            record_events(security_nats.url, "security-events", ["aimass.>"]) as events,
            _stack(tmp_path_factory, security_nats, security_db_url, s3_server) as sec,
        ):
            yield Secured(sec.settings, sec.stack, sec.admin_key, events, logs, dict(sec.secrets))
    finally:
        root.removeHandler(logs)
        root.setLevel(level)
        ours.setLevel(ours_level)


@dataclass
class _Started:
    settings: Settings
    stack: Stack
    admin_key: str
    secrets: dict[str, str]


@asynccontextmanager
async def _stack(
    tmp_path_factory: pytest.TempPathFactory, nats: NatsServer, db_url: str, s3_server: S3Server
) -> AsyncIterator[_Started]:
    home = tmp_path_factory.mktemp("sec-home")
    bucket = f"sec-{uuid.uuid4().hex[:10]}"
    s3_server.client.create_bucket(Bucket=bucket)
    upgrade(db_url)
    settings = base_stack_settings(
        home,
        db_url,
        nats.url,
        artifact_root=f"s3://{bucket}/artifacts",
        s3=S3Settings(
            endpoint_url=s3_server.endpoint_url,
            region=s3_server.settings.region,
            access_key_id=S3_ACCESS_KEY,
            secret_access_key=S3_SECRET,
            part_size_mb=5,
        ),
        ports={"pipeline": free_port()},
        auth={
            "enabled": True,
            "hs256_secret": HS_SECRET,
            "jwt_issuer": ISSUER,
            "internal_token": INTERNAL_TOKEN,
            "key_cache_s": 0.0,
        },
    )
    ensure_admin_key(home, db_url)
    admin_key = read_admin_key(home)
    assert admin_key
    secrets = {
        "admin key": admin_key,
        "hs256 secret": HS_SECRET,
        "internal token": INTERNAL_TOKEN,
        "database password": DB_PASSWORD,
        "s3 secret": S3_SECRET,
    }
    async with serve_stack(settings, PROCESSES) as stack:
        yield _Started(settings, stack, admin_key, secrets)
