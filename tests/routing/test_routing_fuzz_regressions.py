"""Requests the RPC fuzzer (tests/fuzz) found answered with INTERNAL, or half written,
now refused cleanly with the field named and nothing stored."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from aimass.routing.v1 import routing_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")
BACKEND_LABEL = "aimass.io/backend"


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value


async def servers(stack) -> list[str]:
    listed = await stack.routing.ListInferenceServers(pb.ListInferenceServersRequest())
    return sorted(s.name for s in listed.inference_servers)


async def test_bad_backend_label_and_unknown_kind_store_nothing(stack):
    before = await servers(stack)
    bad_label = pb.InferenceServer(grpc_address="127.0.0.1:9", labels={BACKEND_LABEL: "nope"})
    err = await refused(
        stack.routing.CreateInferenceServer(
            pb.CreateInferenceServerRequest(inference_server_id="odd", inference_server=bad_label)
        )
    )
    assert f"inference_server.labels[{BACKEND_LABEL!r}]" in err.details()
    unknown_kind = pb.InferenceServer(kind=77, grpc_address="127.0.0.1:9")
    err = await refused(
        stack.routing.CreateInferenceServer(
            pb.CreateInferenceServerRequest(
                inference_server_id="odd", inference_server=unknown_kind
            )
        )
    )
    assert "inference_server.kind" in err.details()
    assert await servers(stack) == before


async def test_update_to_a_bad_backend_label_changes_nothing(stack):
    created = await stack.routing.CreateInferenceServer(
        pb.CreateInferenceServerRequest(
            inference_server_id="far",
            inference_server=pb.InferenceServer(grpc_address="127.0.0.1:9"),
        )
    )
    update = pb.InferenceServer(name=created.name, labels={BACKEND_LABEL: "nope"})
    err = await refused(
        stack.routing.UpdateInferenceServer(
            pb.UpdateInferenceServerRequest(
                inference_server=update, update_mask=field_mask_pb2.FieldMask(paths=["labels"])
            )
        )
    )
    assert BACKEND_LABEL in err.details()
    kept = await stack.routing.GetInferenceServer(pb.GetInferenceServerRequest(name=created.name))
    assert dict(kept.labels) == {}
    assert kept.etag == created.etag
