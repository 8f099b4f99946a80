"""Background work acting for a project: the internal token plus ``x-aimass-project``.

A pipeline run's stages and a training worker's registration run with the stack's internal
token; inside :func:`acting_for_project` the token travels with the project, and the
callee's hook scopes the internal principal to it, so every service treats the call as it
would a key of that project. Only the internal token may name a project this way.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from aimass.core.auth.hook import (
    INTERNAL_HEADER,
    PROJECT_HEADER,
    AccessControl,
    acting_for_project,
    internal_headers,
    outgoing_credentials,
)
from aimass.core.errors import Unauthenticated
from aimass.core.interceptors import Principal
from aimass.core.settings import AuthSettings
from tests.fixtures.stack import free_port

TOKEN = "internal-token-for-acting-tests-0123456789abcdef"
HS_SECRET = "hs256-secret-acting-tests-0123456789abcdefghij"
ISSUER = "https://issuer.acting.aimass.test"
METHOD = "/aimass.data.v1.DataService/GetDataset"


def access_control() -> AccessControl:
    settings = AuthSettings(
        enabled=True, internal_token=TOKEN, hs256_secret=HS_SECRET, jwt_issuer=ISSUER
    )
    # Nothing listens there: per-process buckets, which these calls never exhaust.
    return AccessControl(settings, None, nats_url=f"nats://127.0.0.1:{free_port()}")


def developer_jwt(project: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "dev@example.com", "iat": now, "exp": now + 600,
              "role": "developer", "project": project}  # fmt: skip
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(HS_SECRET))


async def authenticate(metadata: dict[str, str]) -> tuple[Principal, dict[str, str]]:
    """The principal, and what the served call would forward (in a context of its own)."""
    hook = access_control()

    async def serve() -> tuple[Principal, dict[str, str]]:
        principal = await hook.authenticate(METHOD, metadata)
        return principal, outgoing_credentials()

    try:
        return await asyncio.create_task(serve())
    finally:
        await hook.close()


def test_the_internal_token_carries_the_project_only_inside_acting_for_project() -> None:
    assert internal_headers(TOKEN) == {INTERNAL_HEADER: TOKEN}
    with acting_for_project("alpha"):
        assert internal_headers(TOKEN) == {INTERNAL_HEADER: TOKEN, PROJECT_HEADER: "alpha"}
        with acting_for_project(""):  # an unscoped run inside: no project
            assert internal_headers(TOKEN) == {INTERNAL_HEADER: TOKEN}
    assert internal_headers(TOKEN) == {INTERNAL_HEADER: TOKEN}


@pytest.mark.asyncio
async def test_the_internal_token_acting_for_a_project_is_scoped_to_it() -> None:
    principal, forwarded = await authenticate({INTERNAL_HEADER: TOKEN, PROJECT_HEADER: "alpha"})
    assert (principal.subject, principal.role, principal.project) == (
        "aimass-internal",
        "admin",
        "alpha",
    )
    # A service calling another while serving this call forwards the project too.
    assert forwarded == {INTERNAL_HEADER: TOKEN, PROJECT_HEADER: "alpha"}
    unscoped, forwarded = await authenticate({INTERNAL_HEADER: TOKEN})
    assert unscoped.project == ""
    assert forwarded == {INTERNAL_HEADER: TOKEN}


@pytest.mark.asyncio
async def test_a_user_credential_cannot_pick_its_project_with_the_header() -> None:
    principal, forwarded = await authenticate(
        {"authorization": f"Bearer {developer_jwt('beta')}", PROJECT_HEADER: "alpha"}
    )
    assert principal.project == "beta"
    assert PROJECT_HEADER not in forwarded


@pytest.mark.asyncio
async def test_the_project_header_with_a_wrong_internal_token_is_refused() -> None:
    with pytest.raises(Unauthenticated):
        await authenticate({INTERNAL_HEADER: "not-the-token", PROJECT_HEADER: "alpha"})
