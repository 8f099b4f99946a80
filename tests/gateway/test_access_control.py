"""Access control enforced by the shared interceptor, over gRPC straight to the service ports:
API keys (created, listed, revoked, expired, hashed), JWTs (HS256, RS256 from JWKS, forged),
roles per method, rate limits, and keys kept out of logs."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import select, update

from aimass.access.v1 import access_pb2
from aimass.core.auth.bootstrap import ensure_admin_key
from aimass.core.auth.hook import forget_key
from aimass.core.auth.roles import PREDICTOR, READ, WRITE, allowed, method_permissions
from aimass.core.db.engine import Database
from aimass.core.db.models import ApiKey
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2 as rpb
from tests.gateway.conftest import bearer, key_metadata, new_rsa_key, rpc_error

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIST_MODELS = rpb.ListRegisteredModelsRequest()


async def test_a_call_without_credentials_is_unauthenticated_but_health_is_open(secured):
    err = await rpc_error(secured.registry().ListRegisteredModels(LIST_MODELS))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in err.details()
    health = health_pb2_grpc.HealthStub(secured.stack.channel("data"))
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_bootstrap_admin_key_reaches_every_service(secured):
    identity = await secured.access().LookupCallerIdentity(
        access_pb2.LookupCallerIdentityRequest(), metadata=key_metadata(secured.admin_key)
    )
    assert identity.role == access_pb2.ROLE_ADMIN
    assert identity.subject.startswith("apiKeys/admin")
    datasets = data_pb2_grpc.DataServiceStub(secured.stack.channel("data"))
    await datasets.ListDatasets(data_pb2.ListDatasetsRequest(), metadata=bearer(secured.admin_key))


async def test_keys_are_created_listed_without_secret_and_stored_hashed(secured):
    created = await secured.create_key(
        "listed-viewer", access_pb2.ROLE_VIEWER, description="for the listing test"
    )
    assert created.secret.startswith("aimass_listed-viewer_")
    assert created.creator.startswith("apiKeys/admin")
    listed = await secured.access().ListApiKeys(
        access_pb2.ListApiKeysRequest(), metadata=key_metadata(secured.admin_key)
    )
    names = {key.name: key for key in listed.api_keys}
    assert "apiKeys/listed-viewer" in names
    assert all(key.secret == "" for key in listed.api_keys)
    database = Database(secured.settings.database_url)
    try:
        with database.session(read_only=True) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == "listed-viewer"))
            stored = " ".join(str(value) for value in vars(row).values())
    finally:
        database.dispose()
    secret_part = created.secret.rsplit("_", 1)[1]
    assert secret_part not in stored
    assert row.key_hash != created.secret


async def test_bad_key_requests_name_the_field(secured):
    err = await rpc_error(secured.create_key("Bad_Id", access_pb2.ROLE_VIEWER))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "api_key_id" in err.details()
    err = await rpc_error(secured.create_key("no-role", access_pb2.ROLE_UNSPECIFIED))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "api_key.role" in err.details()
    await secured.create_key("twice", access_pb2.ROLE_VIEWER)
    err = await rpc_error(secured.create_key("twice", access_pb2.ROLE_VIEWER))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_predictor_key_cannot_write_or_read_and_cannot_manage_keys(secured):
    key = (await secured.create_key("predict-only", access_pb2.ROLE_PREDICTOR)).secret
    err = await rpc_error(
        secured.registry().CreateRegisteredModel(
            rpb.CreateRegisteredModelRequest(registered_model_id="nope"),
            metadata=key_metadata(key),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "predictor" in err.details()
    err = await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        secured.access().ListApiKeys(access_pb2.ListApiKeysRequest(), metadata=key_metadata(key))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Training is not served here; its table says the same for CreateTrainingJob.
    table = method_permissions()
    create_job = table["/aimass.training.v1.TrainingService/CreateTrainingJob"]
    assert create_job == {WRITE}
    assert not allowed(PREDICTOR, create_job)
    assert allowed(PREDICTOR, table["/aimass.routing.v1.PredictionService/Predict"])


async def test_a_viewer_reads_but_does_not_write(secured):
    key = (await secured.create_key("read-only", access_pb2.ROLE_VIEWER)).secret
    await secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
    err = await rpc_error(
        secured.registry().CreateRegisteredModel(
            rpb.CreateRegisteredModelRequest(registered_model_id="viewer-made"),
            metadata=key_metadata(key),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert method_permissions()["/aimass.registry.v1.RegistryService/GetModelVersion"] == {READ}


async def test_a_developer_key_writes(secured):
    key = (await secured.create_key("dev", access_pb2.ROLE_DEVELOPER)).secret
    model = await secured.registry().CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="dev-made"),
        metadata=key_metadata(key),
    )
    assert model.name == "models/dev-made"


async def test_a_revoked_key_stops_working_everywhere(secured):
    key = (await secured.create_key("to-revoke", access_pb2.ROLE_VIEWER)).secret
    datasets = data_pb2_grpc.DataServiceStub(secured.stack.channel("data"))
    await datasets.ListDatasets(data_pb2.ListDatasetsRequest(), metadata=key_metadata(key))
    revoked = await secured.access().RevokeApiKey(
        access_pb2.RevokeApiKeyRequest(name="apiKeys/to-revoke"),
        metadata=key_metadata(secured.admin_key),
    )
    assert revoked.HasField("revoke_time")
    for call in (
        datasets.ListDatasets(data_pb2.ListDatasetsRequest(), metadata=key_metadata(key)),
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key)),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in err.details()


async def test_an_expired_key_and_an_unknown_key_are_refused(secured):
    key = (await secured.create_key("expiring", access_pb2.ROLE_VIEWER)).secret
    await secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
    database = Database(secured.settings.database_url)
    try:
        with database.session() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.name == "expiring")
                .values(expire_time=datetime.now(UTC) - timedelta(seconds=1))
            )
    finally:
        database.dispose()
    forget_key("expiring")
    err = await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in err.details()
    forged = key[:-4] + "AAAA"
    err = await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(forged))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata("not-a-key"))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_jwts_signed_with_the_secret_or_the_jwks_key_map_to_roles(secured):
    developer = secured.hs_token(role="developer")
    identity = await secured.access().LookupCallerIdentity(
        access_pb2.LookupCallerIdentityRequest(), metadata=bearer(developer)
    )
    assert identity.role == access_pb2.ROLE_DEVELOPER
    assert identity.subject == "someone@example.com"
    viewer = secured.rs_token(roles=["unrelated", "viewer"], project="vision")
    identity = await secured.access().LookupCallerIdentity(
        access_pb2.LookupCallerIdentityRequest(), metadata=bearer(viewer)
    )
    assert (identity.role, identity.project) == (access_pb2.ROLE_VIEWER, "vision")
    err = await rpc_error(
        secured.registry().CreateRegisteredModel(
            rpb.CreateRegisteredModelRequest(registered_model_id="jwt-viewer"),
            metadata=bearer(viewer),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda s: s.rs_token(key=new_rsa_key(), role="admin"), id="foreign-rsa-key"),
        pytest.param(lambda s: s.hs_token(role="admin")[:-3] + "abc", id="tampered-signature"),
        pytest.param(
            lambda s: s.hs_token(role="admin", iss="https://evil.test"), id="wrong-issuer"
        ),
        pytest.param(lambda s: s.hs_token(role="admin", exp=1_000_000), id="expired"),
        pytest.param(lambda s: s.hs_token(role="superuser"), id="unknown-role"),
        pytest.param(lambda s: s.hs_token(role="admin", sub=None), id="no-subject"),
        pytest.param(
            lambda s: "eyJhbGciOiJub25lIn0." + s.hs_token(role="admin").split(".")[1] + ".",
            id="alg-none",
        ),
        pytest.param(lambda s: "a.b", id="garbage"),
    ],
)
async def test_forged_or_invalid_jwts_are_unauthenticated(secured, make_token):
    err = await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=bearer(make_token(secured)))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_over_its_rate_gets_resource_exhausted_with_retry_info(secured):
    key = (await secured.create_key("slow", access_pb2.ROLE_VIEWER, rate_limit_per_s=0.5)).secret
    outcomes = []
    for _ in range(4):
        try:
            await secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
            outcomes.append("ok")
        except grpc.aio.AioRpcError as err:
            outcomes.append(err)
    assert outcomes[0] == "ok"
    refused = [o for o in outcomes if o != "ok"]
    assert refused, "a key limited to 0.5 requests/s (burst 1) got 4 calls through"
    err = refused[0]
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert infos
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() > 0


async def test_keys_never_appear_in_logs(secured, caplog):
    caplog.set_level(logging.DEBUG)
    key = (await secured.create_key("logged", access_pb2.ROLE_PREDICTOR)).secret
    await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key))
    )
    await rpc_error(
        secured.registry().ListRegisteredModels(LIST_MODELS, metadata=key_metadata(key + "x"))
    )
    await secured.http.get(secured.url("/v1/models"), headers={"x-api-key": key})
    secret = key.rsplit("_", 1)[1]
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secured.admin_key.rsplit("_", 1)[1] not in record.getMessage()


async def test_the_admin_key_file_is_written_once_and_recreated_when_deleted(tmp_path, secured):
    home = tmp_path / "home"
    url = secured.settings.database_url
    path, created = ensure_admin_key(home, url)
    first = path.read_text()
    assert created
    assert (path.stat().st_mode & 0o777) == 0o600
    assert ensure_admin_key(home, url) == (path, False)
    assert path.read_text() == first
    path.unlink()
    _, created = ensure_admin_key(home, url)
    assert created
    assert path.read_text() != first
    assert path.read_text().startswith("aimass_admin-")


async def test_training_worker_rpcs_need_manage() -> None:
    from aimass.core.auth.roles import DEVELOPER, allowed, method_permissions

    table = method_permissions()
    for name in ("ClaimTrainingJob", "ReportTrainingJobProgress", "CompleteTrainingJob"):
        accepted = table[f"/aimass.training.v1.TrainingService/{name}"]
        assert not allowed(DEVELOPER, accepted), name
    assert allowed(DEVELOPER, table["/aimass.training.v1.TrainingService/CreateTrainingJob"])
