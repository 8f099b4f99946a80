"""Registered models and versions through the gRPC API: CRUD, artifacts, etags, bad input."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2 as pb
from tests.registry.conftest import Registry, collect

SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 64])],
    outputs=[common_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])],
)


async def expect_code(call, code: grpc.StatusCode, *fragments: str) -> str:
    """Awaits ``call``; asserts it failed with ``code`` and a message holding ``fragments``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in (info.value.details() or ""), info.value.details()
    return info.value.details() or ""


async def test_model_crud_etag_and_bad_names(registry: Registry) -> None:
    stub = registry.stub
    created = await registry.create_model(
        "digits", description="mlp", tags={"team": "vision"}, owner="ana"
    )
    assert created.name == "models/digits"
    assert created.owner == "ana"
    assert created.etag
    await registry.create_model("speech", tags={"team": "audio"})

    got = await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/digits"))
    assert got == created

    await expect_code(registry.create_model("digits"), grpc.StatusCode.ALREADY_EXISTS, "digits")
    for bad in ("Digits", "9lives", "a_b", "x" * 64, ""):
        await expect_code(
            registry.create_model(bad), grpc.StatusCode.INVALID_ARGUMENT, "registered_model_id"
        )
    for bad in ("digits", "models/", "models/digits/versions", "models/Bad"):
        await expect_code(
            stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name",
        )
    await expect_code(
        stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/nope")),
        grpc.StatusCode.NOT_FOUND,
        "models/nope",
    )

    listed = await stub.ListRegisteredModels(
        pb.ListRegisteredModelsRequest(filter='tags.team = "vision"')
    )
    assert [m.name for m in listed.registered_models] == ["models/digits"]
    first = await stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(page_size=1))
    second = await stub.ListRegisteredModels(
        pb.ListRegisteredModelsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [m.name for m in (*first.registered_models, *second.registered_models)] == [
        "models/digits",
        "models/speech",
    ]
    assert second.next_page_token == ""

    update = pb.UpdateRegisteredModelRequest(
        registered_model=pb.RegisteredModel(
            name="models/digits", description="v2 mlp", etag=created.etag
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]),
    )
    updated = await stub.UpdateRegisteredModel(update)
    assert updated.description == "v2 mlp"
    assert updated.tags["team"] == "vision"
    assert updated.etag != created.etag
    # The same request again carries the old etag: someone else's change won.
    await expect_code(stub.UpdateRegisteredModel(update), grpc.StatusCode.ABORTED, "etag")
    await expect_code(
        stub.UpdateRegisteredModel(
            pb.UpdateRegisteredModelRequest(
                registered_model=pb.RegisteredModel(name="models/digits"),
                update_mask=field_mask_pb2.FieldMask(paths=["latest_version"]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    await expect_code(
        stub.DeleteRegisteredModel(
            pb.DeleteRegisteredModelRequest(name="models/digits", etag=created.etag)
        ),
        grpc.StatusCode.ABORTED,
    )
    await stub.DeleteRegisteredModel(pb.DeleteRegisteredModelRequest(name="models/speech"))
    # A model goes with all its versions, parents and children alike.
    parent = await registry.create_version("digits")
    await registry.create_version("digits", source=pb.VersionSource(parent_version=parent.name))
    await stub.DeleteRegisteredModel(
        pb.DeleteRegisteredModelRequest(name="models/digits", etag=updated.etag)
    )
    await expect_code(
        stub.GetModelVersion(pb.GetModelVersionRequest(name=parent.name)),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_code(
        stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/speech")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_versions_with_uploaded_artifacts(registry: Registry) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    onnx = os.urandom(300_000)
    state = os.urandom(70_000)
    onnx_artifact = await registry.upload(onnx, "onnx", "model.onnx")
    assert onnx_artifact.sha256 == hashlib.sha256(onnx).hexdigest()
    assert onnx_artifact.size_bytes == len(onnx)
    state_artifact = await registry.upload(state, "state_dict", "model.pt")

    version = await registry.create_version(
        "digits",
        description="first",
        artifacts=[
            common_pb2.Artifact(kind="onnx", uri=onnx_artifact.uri, file_name="model.onnx"),
            # By reference, with the sum the caller expects.
            common_pb2.Artifact(
                kind="state_dict", uri=state_artifact.uri, sha256=state_artifact.sha256
            ),
        ],
        signature=SIGNATURE,
        framework="pytorch",
        opset=17,
        metrics=[common_pb2.Metric(name="accuracy", value=0.97, source="evaluation")],
        tags={"stage": "candidate"},
        model_card="# Digits\n",
        source=pb.VersionSource(
            dataset_version="datasets/digits/versions/1", job="trainingJobs/t1"
        ),
    )
    assert version.name == "models/digits/versions/1"
    assert version.version == 1
    assert {a.kind: a.sha256 for a in version.artifacts} == {
        "onnx": hashlib.sha256(onnx).hexdigest(),
        "state_dict": hashlib.sha256(state).hexdigest(),
    }
    assert version.creator == "anonymous"
    got = await stub.GetModelVersion(pb.GetModelVersionRequest(name=version.name))
    assert got.signature == SIGNATURE
    assert got.metrics[0].value == pytest.approx(0.97)
    assert got.source.dataset_version == "datasets/digits/versions/1"

    downloaded = await collect(
        stub.DownloadArtifact(pb.DownloadArtifactRequest(name=version.name, kind="onnx"))
    )
    assert hashlib.sha256(downloaded).hexdigest() == version.artifacts[0].sha256
    tail = await collect(
        stub.DownloadArtifact(
            pb.DownloadArtifactRequest(name=version.name, kind="onnx", offset=100_000)
        )
    )
    assert tail == onnx[100_000:]

    # Idempotent create: a retry with the same request id returns the same version.
    again = [
        await registry.create_version("digits", request_id="req-1", description="retry")
        for _ in range(2)
    ]
    assert again[0].name == again[1].name == "models/digits/versions/2"
    model = await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/digits"))
    assert model.latest_version == 2

    mask = field_mask_pb2.FieldMask(paths=["tags", "model_card"])
    edited = await stub.UpdateModelVersion(
        pb.UpdateModelVersionRequest(
            model_version=pb.ModelVersion(
                name=version.name, tags={"stage": "qa"}, model_card="# v1", etag=got.etag
            ),
            update_mask=mask,
        )
    )
    assert dict(edited.tags) == {"stage": "qa"}
    assert edited.model_card == "# v1"
    assert edited.artifacts == got.artifacts
    await expect_code(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=version.name, etag=got.etag), update_mask=mask
            )
        ),
        grpc.StatusCode.ABORTED,
        version.name,
    )
    await expect_code(
        stub.UpdateModelVersion(
            pb.UpdateModelVersionRequest(
                model_version=pb.ModelVersion(name=version.name),
                update_mask=field_mask_pb2.FieldMask(paths=["artifacts"]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    logged = await stub.LogVersionMetrics(
        pb.LogVersionMetricsRequest(
            name=version.name,
            metrics=[
                common_pb2.Metric(name="accuracy", value=0.98, source="evaluation"),
                common_pb2.Metric(name="latency_ms", value=1.5, source="benchmark"),
            ],
        )
    )
    assert {m.name: round(m.value, 3) for m in logged.metrics} == {
        "accuracy": 0.98,
        "latency_ms": 1.5,
    }


async def test_version_bad_input(registry: Registry) -> None:
    stub = registry.stub
    await registry.create_model("digits")
    data = b"weights" * 100
    artifact = await registry.upload(data)

    await expect_code(
        registry.create_version(
            "nope", artifacts=[common_pb2.Artifact(kind="onnx", uri=artifact.uri)]
        ),
        grpc.StatusCode.NOT_FOUND,
        "models/nope",
    )
    missing_uri = artifact.uri.rsplit("/sha256/", 1)[0] + "/sha256/00/00/" + "0" * 64
    await expect_code(
        registry.create_version(
            "digits", artifacts=[common_pb2.Artifact(kind="onnx", uri=missing_uri)]
        ),
        grpc.StatusCode.NOT_FOUND,
        "model_version.artifacts[0].uri",
    )
    await expect_code(
        registry.create_version(
            "digits",
            artifacts=[common_pb2.Artifact(kind="onnx", uri=artifact.uri, sha256="a" * 64)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.artifacts[0].sha256",
    )
    await expect_code(
        registry.create_version(
            "digits",
            signature=common_pb2.Signature(
                inputs=[common_pb2.TensorSpec(name="x", datatype="FLOAT", shape=[1])]
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.signature.inputs[0].datatype",
    )
    await expect_code(
        registry.create_version(
            "digits", source=pb.VersionSource(parent_version="models/digits/versions/7")
        ),
        grpc.StatusCode.NOT_FOUND,
        "parent_version",
    )
    # None of the refused creates used up a version number.
    first = await registry.create_version("digits")
    assert first.version == 1
    for name in ("models/digits/versions/2", "models/digits/versions/0", "models/x/versions/1"):
        code = (
            grpc.StatusCode.NOT_FOUND
            if not name.endswith("/0")
            else grpc.StatusCode.INVALID_ARGUMENT
        )
        await expect_code(stub.GetModelVersion(pb.GetModelVersionRequest(name=name)), code)
    await expect_code(
        stub.GetModelVersion(pb.GetModelVersionRequest(name="models/digits/versions/one")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "name",
    )
    await expect_code(
        collect(stub.DownloadArtifact(pb.DownloadArtifactRequest(name=first.name, kind="onnx"))),
        grpc.StatusCode.NOT_FOUND,
        "onnx",
    )
    # An upload whose content does not match the declared sum stores nothing.
    header = pb.UploadArtifactHeader(kind="onnx", sha256="b" * 64)

    async def bad_upload():
        yield pb.UploadArtifactRequest(header=header)
        yield pb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=b"abc"))

    await expect_code(stub.UploadArtifact(bad_upload()), grpc.StatusCode.INVALID_ARGUMENT, "sha256")


def _flip_last_byte(stored: Path, data: bytes) -> None:
    """Corrupts a stored object at rest, as a failing disk would."""
    stored.chmod(0o644)
    stored.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


async def test_corrupted_artifact_fails_the_download(registry: Registry) -> None:
    await registry.create_model("digits")
    data = os.urandom(50_000)
    artifact = await registry.upload(data)
    version = await registry.create_version(
        "digits", artifacts=[common_pb2.Artifact(kind="onnx", uri=artifact.uri)]
    )
    await asyncio.to_thread(_flip_last_byte, Path(artifact.uri.removeprefix("file://")), data)
    await expect_code(
        collect(
            registry.stub.DownloadArtifact(
                pb.DownloadArtifactRequest(name=version.name, kind="onnx")
            )
        ),
        grpc.StatusCode.DATA_LOSS,
        "corrupt",
    )
