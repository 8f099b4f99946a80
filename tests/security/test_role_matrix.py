"""Every RPC of every aimass service against every role and every kind of bad credential.

The RPCs come from the generated descriptors (nothing is listed by hand) and the expected
outcome from the policy as docs/access.md states it, written out again here rather than
read from aimass.core.auth.roles, so a wrong table in the code cannot agree with itself:
a google.api.http ``get`` is a read, any other verb a write, ``Predict*`` is predict,
deployment metadata / health and route tables are read-or-predict, the access package is
manage except LookupCallerIdentity (anyone authenticated), so are the training workers'
claim/report/complete/register RPCs, and a method without an HTTP rule is admin-only.
Each call carries an empty request: PERMISSION_DENIED and
UNAUTHENTICATED mean auth stopped it, any other outcome (INVALID_ARGUMENT, NOT_FOUND, OK...)
means auth let it through to the servicer.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor, message_factory

from aimass.access.v1 import access_pb2
from tests.security.conftest import Secured, bearer, key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="package")

ROLE_GRANTS = {
    "admin": {"read", "write", "predict", "manage"},
    "developer": {"read", "write", "predict"},
    "predictor": {"predict"},
    "viewer": {"read"},
}
PREDICT_SIDE_READS = {
    "GetRouteTable",
    "WatchRouteTable",
    "GetDeploymentMetadata",
    "GetDeploymentHealth",
}
CALL_TIMEOUT_S = 10.0
PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos" / "aimass"
PASSED, DENIED, UNAUTHENTICATED = "passed auth", "PERMISSION_DENIED", "UNAUTHENTICATED"


@dataclass(frozen=True)
class Rpc:
    service: descriptor.ServiceDescriptor
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"


def all_rpcs() -> list[Rpc]:
    """Every method of every service in the generated module of every proto under protos/."""
    rpcs = []
    for proto in sorted(PROTO_ROOT.glob("*/v1/*.proto")):
        package = proto.parent.parent.name
        pb2 = importlib.import_module(f"aimass.{package}.v1.{proto.stem}_pb2")
        for service in pb2.DESCRIPTOR.services_by_name.values():
            rpcs.extend(Rpc(service, method) for method in service.methods)
    return rpcs


# What training workers call to run jobs (docs/access.md): admin or the internal token.
TRAINING_WORKER_RPCS = {
    "ClaimTrainingJob",
    "ReportTrainingJobProgress",
    "CompleteTrainingJob",
    "RegisterWorker",
}


def accepted_permissions(rpc: Rpc) -> set[str] | None:
    """The permissions docs/access.md says admit the call; None: any authenticated caller."""
    if rpc.service.full_name.startswith("aimass.access."):
        return None if rpc.method.name == "LookupCallerIdentity" else {"manage"}
    if rpc.method.name in TRAINING_WORKER_RPCS:
        return {"manage"}
    if rpc.method.name.startswith("Predict"):
        return {"predict"}
    if rpc.method.name in PREDICT_SIDE_READS:
        return {"read", "predict"}
    options = rpc.method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return {"manage"}
    verb = options.Extensions[annotations_pb2.http].WhichOneof("pattern")
    return {"read"} if verb == "get" else {"write"}


def expected(role: str | None, rpc: Rpc) -> str:
    if role is None:
        return UNAUTHENTICATED
    accepted = accepted_permissions(rpc)
    return PASSED if accepted is None or accepted & ROLE_GRANTS[role] else DENIED


RPCS = all_rpcs()


def outcome_of(error: grpc.aio.AioRpcError | None) -> str:
    if error is None:
        return PASSED
    if error.code() == grpc.StatusCode.PERMISSION_DENIED:
        return DENIED
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return UNAUTHENTICATED
    return PASSED


async def call_empty(
    channel: grpc.aio.Channel, rpc: Rpc, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError | None:
    """Calls the RPC with an empty request (an empty stream for client streaming)."""
    request_type = message_factory.GetMessageClass(rpc.method.input_type)
    response_type = message_factory.GetMessageClass(rpc.method.output_type)
    codec = {
        "request_serializer": request_type.SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    options = {"metadata": metadata, "timeout": CALL_TIMEOUT_S}
    try:
        if rpc.method.client_streaming:
            await channel.stream_unary(rpc.path, **codec)(iter(()), **options)
        elif rpc.method.server_streaming:
            call = channel.unary_stream(rpc.path, **codec)(request_type(), **options)
            # The first message (or the end, or the error) is enough; never follow a watch.
            await call.read()
            call.cancel()
        else:
            await channel.unary_unary(rpc.path, **codec)(request_type(), **options)
    except grpc.aio.AioRpcError as err:
        return err
    return None


def served_by(secured: Secured) -> dict[str, str]:
    """{"aimass.data.v1.DataService": "data", ...} from what each process registered."""
    return {
        service.full_name: process
        for process, running in secured.stack.servers.items()
        for service in running.services
    }


async def test_every_service_in_the_protos_is_served_by_a_process(secured):
    served = served_by(secured)
    missing = sorted({rpc.service.full_name for rpc in RPCS} - served.keys())
    assert not missing, f"services in the protos that no process serves: {missing}"
    assert len(RPCS) > 50


def _credentials() -> Iterator[tuple[str, str | None, Callable]]:
    """(id, role the policy sees, async factory of the metadata)."""
    roles = {
        "admin": access_pb2.ROLE_ADMIN,
        "developer": access_pb2.ROLE_DEVELOPER,
        "predictor": access_pb2.ROLE_PREDICTOR,
        "viewer": access_pb2.ROLE_VIEWER,
    }
    for name, enum in roles.items():

        async def api_key(secured: Secured, name: str = name, enum: int = enum) -> tuple:
            return key_metadata(await secured.create_key(f"matrix-{name}", enum))

        yield f"{name}-api-key", name, api_key

    async def jwt_developer(secured: Secured) -> tuple:
        return bearer(secured.hs_token(role="developer"))

    async def no_credentials(secured: Secured) -> tuple:
        return ()

    async def revoked_key(secured: Secured) -> tuple:
        key = await secured.create_key("matrix-revoked", access_pb2.ROLE_ADMIN)
        await secured.access().RevokeApiKey(
            access_pb2.RevokeApiKeyRequest(name="apiKeys/matrix-revoked"),
            metadata=key_metadata(secured.admin_key),
        )
        return key_metadata(key)

    async def expired_jwt(secured: Secured) -> tuple:
        return bearer(secured.hs_token(role="admin", exp=1_000_000, iat=999_000))

    async def forged_jwt(secured: Secured) -> tuple:
        token = secured.hs_token(role="viewer")
        header, _, signature = token.split(".")
        claims = secured.hs_token(role="admin").split(".")[1]
        # A viewer's signature on an admin's claims.
        return bearer(f"{header}.{claims}.{signature}")

    async def unknown_key(secured: Secured) -> tuple:
        return key_metadata(secured.admin_key[:-6] + "AAAAAA")

    yield "developer-jwt", "developer", jwt_developer
    yield "no-credentials", None, no_credentials
    yield "revoked-api-key", None, revoked_key
    yield "expired-jwt", None, expired_jwt
    yield "forged-jwt", None, forged_jwt
    yield "unknown-api-key", None, unknown_key


CREDENTIALS = list(_credentials())


@pytest.mark.parametrize(
    ("role", "make_metadata"),
    [pytest.param(role, make, id=cid) for cid, role, make in CREDENTIALS],
)
async def test_every_rpc_answers_each_credential_as_the_policy_says(secured, role, make_metadata):
    metadata = await make_metadata(secured)
    served = served_by(secured)
    limit = asyncio.Semaphore(16)

    async def check(rpc: Rpc) -> tuple[str, str, str, str]:
        async with limit:
            error = await call_empty(
                secured.channel_of(served[rpc.service.full_name]), rpc, metadata
            )
        detail = f"{error.code().name}: {error.details()}" if error else "OK"
        return rpc.path, expected(role, rpc), outcome_of(error), detail

    results = await asyncio.gather(*(check(rpc) for rpc in RPCS if rpc.service.full_name in served))
    wrong = [f"{path}: expected {want}, got {got} ({detail})" for path, want, got, detail in results
             if want != got]  # fmt: skip
    assert not wrong, "\n".join(wrong)
    # The matrix covered both answers for every real role (no vacuous pass).
    if role is not None and role != "admin":
        assert {want for _, want, _, _ in results} == {PASSED, DENIED}
