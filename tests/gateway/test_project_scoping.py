"""Per-project scoping of registered models: a key or JWT with a ``project`` creates models
in its project only and sees only its project's models and their versions (others answer
NOT_FOUND, as a missing model does); admin keys without a project see every model."""

from __future__ import annotations

import grpc
import pytest

from aimass.access.v1 import access_pb2
from aimass.registry.v1 import registry_pb2 as rpb
from tests.gateway.conftest import bearer, key_metadata, rpc_error

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_scoped_callers_see_and_create_only_their_projects_models(secured):
    registry = secured.registry()
    vision = key_metadata(
        (await secured.create_key("vision-dev", access_pb2.ROLE_DEVELOPER, project="vision")).secret
    )
    nlp = bearer(secured.hs_token(role="developer", project="nlp"))
    admin = key_metadata(secured.admin_key)

    created = await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="scoped-cnn"), metadata=vision
    )
    assert created.project == "vision"  # stamped from the key
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="scoped-bert"), metadata=nlp
    )
    await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(parent="models/scoped-cnn", model_version=rpb.ModelVersion()),
        metadata=vision,
    )

    async def names(metadata) -> set[str]:
        reply = await registry.ListRegisteredModels(
            rpb.ListRegisteredModelsRequest(page_size=100), metadata=metadata
        )
        return {m.name for m in reply.registered_models if m.name.startswith("models/scoped-")}

    assert await names(vision) == {"models/scoped-cnn"}
    assert await names(nlp) == {"models/scoped-bert"}
    assert await names(admin) == {"models/scoped-cnn", "models/scoped-bert"}

    # Another project's model, and its versions, look missing; its own are readable.
    for call in (
        registry.GetRegisteredModel(
            rpb.GetRegisteredModelRequest(name="models/scoped-cnn"), metadata=nlp
        ),
        registry.GetModelVersion(
            rpb.GetModelVersionRequest(name="models/scoped-cnn/versions/1"), metadata=nlp
        ),
        registry.CreateModelVersion(
            rpb.CreateModelVersionRequest(
                parent="models/scoped-cnn", model_version=rpb.ModelVersion()
            ),
            metadata=nlp,
        ),
        registry.DeleteRegisteredModel(
            rpb.DeleteRegisteredModelRequest(name="models/scoped-cnn"), metadata=nlp
        ),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert "models/scoped-cnn" in err.details()
    own = await registry.GetModelVersion(
        rpb.GetModelVersionRequest(name="models/scoped-cnn/versions/1"), metadata=vision
    )
    assert own.name == "models/scoped-cnn/versions/1"
    found = await registry.GetRegisteredModel(
        rpb.GetRegisteredModelRequest(name="models/scoped-bert"), metadata=admin
    )
    assert found.project == "nlp"

    # A scoped caller cannot create a model in another project.
    err = await rpc_error(
        registry.CreateRegisteredModel(
            rpb.CreateRegisteredModelRequest(
                registered_model_id="scoped-elsewhere",
                registered_model=rpb.RegisteredModel(project="nlp"),
            ),
            metadata=vision,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "registered_model.project" in err.details()
    err = await rpc_error(
        registry.GetRegisteredModel(
            rpb.GetRegisteredModelRequest(name="models/scoped-elsewhere"), metadata=admin
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND  # nothing half-written
