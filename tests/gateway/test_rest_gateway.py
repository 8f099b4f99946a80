"""The built-in REST gateway against real services: transcoding (path templates, body, query
parameters, NDJSON streaming), Envoy's status mapping, bad input, and the OpenAPI document."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
import yarl

from aimass.access.v1 import access_pb2
from aimass.common.v1 import common_pb2
from aimass.gateway.openapi import openapi_path
from aimass.registry.v1 import registry_pb2 as rpb
from tests.gateway.conftest import MAX_BODY, assert_throttled, key_metadata

pytestmark = pytest.mark.asyncio(loop_scope="module")


def admin(secured) -> dict[str, str]:
    return {"x-api-key": secured.admin_key}


async def test_create_get_list_update_through_rest(secured):
    http, headers = secured.http, admin(secured)
    async with http.post(
        secured.url("/v1/models?registeredModelId=rest-model"),
        json={"description": "made over REST", "tags": {"team": "vision"}},
        headers=headers,
    ) as reply:
        assert reply.status == 200, await reply.text()
        created = await reply.json()
        assert reply.headers["x-aimass-rpc"].endswith("RegistryService/CreateRegisteredModel")
    assert created["name"] == "models/rest-model"
    assert created["tags"] == {"team": "vision"}
    async with http.get(secured.url("/v1/models/rest-model"), headers=headers) as reply:
        assert (await reply.json())["description"] == "made over REST"
    async with http.get(
        secured.url("/v1/models?page_size=1&filter=tags.team%20%3D%20%22vision%22"),
        headers=headers,
    ) as reply:
        listed = await reply.json()
        assert [m["name"] for m in listed["registeredModels"]] == ["models/rest-model"]
    async with http.patch(
        secured.url("/v1/models/rest-model?updateMask=description"),
        json={"description": "changed", "etag": created["etag"]},
        headers=headers,
    ) as reply:
        assert reply.status == 200, await reply.text()
        assert (await reply.json())["description"] == "changed"


async def test_grpc_errors_become_envoys_http_statuses(secured):
    http, headers = secured.http, admin(secured)
    async with http.get(secured.url("/v1/models/missing-one"), headers=headers) as reply:
        assert reply.status == 404
        body = await reply.json()
        assert body["code"] == 5
        assert "missing-one" in body["message"]
    async with http.post(
        secured.url("/v1/models?registeredModelId=twice-rest"), json={}, headers=headers
    ) as reply:
        assert reply.status == 200
    async with http.post(
        secured.url("/v1/models?registeredModelId=twice-rest"), json={}, headers=headers
    ) as reply:
        assert reply.status == 409
    async with http.post(
        secured.url("/v1/models?registeredModelId=Not_Valid"), json={}, headers=headers
    ) as reply:
        assert reply.status == 400
        body = await reply.json()
        assert body["details"][0]["@type"].endswith("google.rpc.BadRequest")


async def test_auth_failures_are_401_403_and_429_with_retry_after(secured):
    http = secured.http
    async with http.get(secured.url("/v1/models")) as reply:
        assert reply.status == 401
    async with http.get(secured.url("/v1/models"), headers={"x-api-key": "aimass_x_nope"}) as reply:
        assert reply.status == 401
    viewer = (await secured.create_key("rest-viewer", access_pb2.ROLE_VIEWER)).secret
    async with http.post(
        secured.url("/v1/models?registeredModelId=by-viewer"),
        json={},
        headers={"x-api-key": viewer},
    ) as reply:
        assert reply.status == 403
    slow = (
        await secured.create_key("rest-slow", access_pb2.ROLE_VIEWER, rate_limit_per_s=0.2)
    ).secret
    await assert_throttled(lambda: http.get(secured.url("/v1/models"), headers={"x-api-key": slow}))
    token = secured.hs_token(role="viewer")
    async with http.get(
        secured.url("/v1/models"), headers={"authorization": f"Bearer {token}"}
    ) as reply:
        assert reply.status == 200


async def test_malformed_json_names_the_position(secured):
    async with secured.http.post(
        secured.url("/v1/models?registeredModelId=broken"),
        data=b'{"description": "x",\n  "tags": {"a": }}',
        headers={**admin(secured), "content-type": "application/json"},
    ) as reply:
        assert reply.status == 400
        message = (await reply.json())["message"]
    assert "line 2 column" in message
    assert "char" in message


async def test_unknown_fields_are_refused(secured):
    http, headers = secured.http, admin(secured)
    async with http.post(
        secured.url("/v1/models?registeredModelId=unknown-field"),
        json={"descriptionn": "typo"},
        headers=headers,
    ) as reply:
        assert reply.status == 400
        assert "descriptionn" in (await reply.json())["message"]
    async with http.get(secured.url("/v1/models?pageSise=3"), headers=headers) as reply:
        assert reply.status == 400
        assert "pageSise" in (await reply.json())["message"]
    async with http.get(secured.url("/v1/models?page_size=many"), headers=headers) as reply:
        assert reply.status == 400


async def test_oversized_bodies_get_413(secured):
    async with secured.http.post(
        secured.url("/v1/models?registeredModelId=huge"),
        json={"description": "x" * (MAX_BODY + 1)},
        headers=admin(secured),
    ) as reply:
        assert reply.status == 413


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/%2E%2E",
        "/v1/models/a%2Fb",
        "/v1/models/a%2fb/versions/1",
        "/v1/models/a%5Cb",
        "/v1/models/%2e%2e/versions/1",
        "/v1/models/./versions/1",
    ],
)
async def test_path_parameters_cannot_escape_their_resource(secured, path):
    # encoded=True: the client sends the path as written, without normalizing it.
    raw = yarl.URL(secured.url(path), encoded=True)
    async with secured.http.get(raw, headers=admin(secured)) as reply:
        assert reply.status == 400
        assert "path" in (await reply.json())["message"]


async def test_unknown_routes_and_methods(secured):
    async with secured.http.get(secured.url("/v1/nothing/here"), headers=admin(secured)) as reply:
        assert reply.status == 404
        assert "x-aimass-rpc" not in reply.headers
    async with secured.http.put(secured.url("/v1/models/m1"), headers=admin(secured)) as reply:
        assert reply.status == 405
        assert "GET" in reply.headers["Allow"]


async def test_server_streaming_is_newline_delimited_json(secured):
    payload = bytes(range(256)) * 40
    registry, metadata = secured.registry(), key_metadata(secured.admin_key)
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="streamed"), metadata=metadata
    )

    async def parts():
        yield rpb.UploadArtifactRequest(
            header=rpb.UploadArtifactHeader(
                kind="onnx", sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload)
            )
        )
        yield rpb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=payload))

    artifact = await registry.UploadArtifact(parts(), metadata=metadata)
    version = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(
            parent="models/streamed", model_version=rpb.ModelVersion(artifacts=[artifact])
        ),
        metadata=metadata,
    )
    async with secured.http.get(
        secured.url(f"/v1/{version.name}:downloadArtifact?kind=onnx"),
        headers=admin(secured),
    ) as reply:
        assert reply.status == 200, await reply.text()
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = (await reply.read()).splitlines()

    chunks = [json.loads(line) for line in lines]
    assert len(chunks) >= 1
    assert b"".join(base64.b64decode(c["data"]) for c in chunks) == payload


async def test_openapi_paths_expand_resource_names():
    path, params = openapi_path("/v1/{name=models/*/versions/*}:logMetrics")
    assert path == "/v1/models/{modelsId}/versions/{versionsId}:logMetrics"
    assert params == [("modelsId", "name"), ("versionsId", "name")]
    assert openapi_path("/v1/{parent=models/*}/versions")[0] == "/v1/models/{modelsId}/versions"


async def test_every_route_of_the_openapi_document_answers(secured):
    async with secured.http.get(secured.url("/openapi.json")) as reply:
        document = await reply.json()
    assert document["openapi"].startswith("3.")
    served = ("aimass.registry.", "aimass.data.", "aimass.access.")
    checked = 0
    for path, operations in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "probe", path)
        for verb, operation in operations.items():
            body = {} if "requestBody" in operation else None
            async with secured.http.request(
                verb.upper(), secured.url(concrete), json=body, headers=admin(secured)
            ) as reply:
                payload = await reply.read()
                # Matched a route and reached a gRPC service (or its status came back).
                assert reply.headers.get("x-aimass-rpc") == operation["x-grpc-method"], (
                    verb,
                    path,
                    reply.status,
                    payload[:200],
                )
                if operation["x-grpc-method"].lstrip("/").startswith(served):
                    # Served here: an answer from the service, never "unreachable".
                    assert reply.status not in (502, 503), (verb, path, payload[:200])
            checked += 1
    assert checked >= 80
