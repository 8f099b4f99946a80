"""Release bundles: export, download, import into another aimass, and tampered bundles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import grpc

from aimass.common.v1 import common_pb2
from aimass.registry.bundles import read_text_member, triton_config
from aimass.registry.v1 import registry_pb2 as pb
from tests.registry.conftest import Registry, collect, serve_registry, settings_for
from tests.registry.test_models_versions import SIGNATURE, expect_code


async def _release_of_a_version(registry: Registry) -> tuple[pb.ModelVersion, bytes, bytes]:
    """A version with two files, lineage and metrics, exported; returns it, its ONNX, the bundle."""
    await registry.create_model("digits")
    onnx = os.urandom(120_000)
    state = os.urandom(30_000)
    onnx_artifact = await registry.upload(onnx, "onnx", "model.onnx")
    state_artifact = await registry.upload(state, "state_dict", "model.pt")
    parent = await registry.create_version(
        "digits",
        source=pb.VersionSource(
            dataset_version="datasets/digits/versions/2", job="trainingJobs/t9"
        ),
    )
    version = await registry.create_version(
        "digits",
        description="int8 digits",
        artifacts=[
            common_pb2.Artifact(kind="onnx", uri=onnx_artifact.uri, file_name="model.onnx"),
            common_pb2.Artifact(kind="state_dict", uri=state_artifact.uri, file_name="model.pt"),
        ],
        signature=SIGNATURE,
        framework="onnx",
        opset=17,
        metrics=[common_pb2.Metric(name="accuracy", value=0.97, source="evaluation")],
        tags={"stage": "candidate"},
        model_card="# Digits int8\n\nQuantized.\n",
        source=pb.VersionSource(
            job="compressionJobs/c3", parent_version=parent.name, derivation="int8-dynamic"
        ),
    )
    release = await registry.stub.CreateRelease(
        pb.CreateReleaseRequest(
            parent=version.name, release_id="v1-0-0", release=pb.Release(description="first")
        )
    )
    assert release.name == f"{version.name}/releases/v1-0-0"
    bundle = await collect(
        registry.stub.DownloadRelease(pb.DownloadReleaseRequest(name=release.name))
    )
    assert hashlib.sha256(bundle).hexdigest() == release.bundle.sha256
    assert len(bundle) == release.bundle.size_bytes
    return version, onnx, bundle


async def _upload_bundle(registry: Registry, bundle: bytes) -> str:
    return (await registry.upload(bundle, "bundle", "bundle.tar.gz")).uri


async def test_bundle_round_trip_between_two_data_folders(
    registry: Registry, nats_url: str, tmp_path: Path
) -> None:
    version, onnx, bundle = await _release_of_a_version(registry)
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as archive:
        names = archive.getnames()
    assert set(names) == {
        "MANIFEST.sha256",
        "MODEL_CARD.md",
        "config.json",
        "metrics.json",
        "model/model.onnx",
        "model/model.pt",
    }
    config = json.loads(read_text_member(bundle, "config.json"))
    assert config["signature"]["inputs"][0]["name"] == "x"
    assert "data_type: TYPE_FP32" in config["triton"]["config_pbtxt"]
    assert "max_batch_size: 64" in config["triton"]["config_pbtxt"]
    manifest = read_text_member(bundle, "MANIFEST.sha256")
    assert f"{hashlib.sha256(onnx).hexdigest()}  model/model.onnx" in manifest
    await expect_code(
        registry.stub.CreateRelease(
            pb.CreateReleaseRequest(parent=version.name, release_id="v1-0-0", release=pb.Release())
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )

    # A second aimass: its own data folder, SQLite database and artifact store.
    other_home = tmp_path / "other"
    from aimass.core.db.migrate import upgrade

    other_db = f"sqlite:///{other_home / 'aimass.db'}"
    other_home.mkdir()
    upgrade(other_db)
    async with serve_registry(settings_for(other_home, other_db, nats_url)) as other:
        uri = await _upload_bundle(other, bundle)
        imported = await other.stub.ImportRelease(
            pb.ImportReleaseRequest(parent="models/digits-imported", bundle_uri=uri)
        )
        assert imported.name == "models/digits-imported/versions/1"
        assert imported.signature == version.signature
        assert imported.model_card == version.model_card
        assert imported.metrics == version.metrics
        assert dict(imported.tags) == dict(version.tags)
        assert imported.framework == "onnx"
        assert imported.opset == 17
        assert {a.kind: a.sha256 for a in imported.artifacts} == {
            a.kind: a.sha256 for a in version.artifacts
        }
        assert all(a.uri.startswith(other.settings.artifact_root) for a in imported.artifacts)
        lineage = dict(imported.source.imported_lineage)
        assert lineage["model_version"] == version.name
        assert lineage["parent_version"] == version.source.parent_version
        assert lineage["job"] == "compressionJobs/c3"
        assert lineage["derivation"] == "int8-dynamic"
        assert lineage["release"] == f"{version.name}/releases/v1-0-0"
        copied = await collect(
            other.stub.DownloadArtifact(pb.DownloadArtifactRequest(name=imported.name, kind="onnx"))
        )
        assert copied == onnx


def _repack(bundle: bytes, replace: dict[str, bytes]) -> bytes:
    """The bundle with some members' content replaced (the manifest left as it was)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as source,
        tarfile.open(fileobj=out, mode="w:gz") as target,
    ):
        for member in source.getmembers():
            data = replace.get(member.name) or source.extractfile(member).read()  # type: ignore[union-attr]
            member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    return out.getvalue()


def _store_files(registry: Registry) -> set[str]:
    return {str(p) for p in registry.artifact_dir.rglob("*") if p.is_file()}


async def test_tampered_bundle_names_the_file_and_imports_nothing(registry: Registry) -> None:
    _version, onnx, bundle = await _release_of_a_version(registry)
    tampered = _repack(bundle, {"model/model.onnx": onnx[:-1] + b"\x00"})
    uri = await _upload_bundle(registry, tampered)
    before = _store_files(registry)
    await expect_code(
        registry.stub.ImportRelease(
            pb.ImportReleaseRequest(parent="models/stolen", bundle_uri=uri)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model/model.onnx",
        "sha256",
    )
    await expect_code(
        registry.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/stolen")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert _store_files(registry) == before

    # A tampered model card is caught as well, and named.
    card = _repack(bundle, {"MODEL_CARD.md": b"# trust me\n"})
    await expect_code(
        registry.stub.ImportRelease(
            pb.ImportReleaseRequest(
                parent="models/stolen", bundle_uri=await _upload_bundle(registry, card)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_CARD.md",
    )


async def test_bundle_with_path_traversal_is_refused(registry: Registry, tmp_path: Path) -> None:
    payload = b"owned"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in (
            ("../escaped.txt", payload),
            (
                "MANIFEST.sha256",
                f"{hashlib.sha256(payload).hexdigest()}  ../escaped.txt\n".encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    uri = await _upload_bundle(registry, out.getvalue())
    await expect_code(
        registry.stub.ImportRelease(pb.ImportReleaseRequest(parent="models/evil", bundle_uri=uri)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "../escaped.txt",
        "path traversal",
    )
    await expect_code(
        registry.stub.ImportRelease(
            pb.ImportReleaseRequest(
                parent="models/evil", bundle_uri=await _upload_bundle(registry, b"not a tar")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bundle_uri",
    )
    await expect_code(
        registry.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/evil")),
        grpc.StatusCode.NOT_FOUND,
    )


def test_triton_config_from_signature() -> None:
    fixed = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="ids", datatype="INT64", shape=[8])],
        outputs=[common_pb2.TensorSpec(name="text", datatype="BYTES", shape=[1])],
    )
    text = triton_config("ranker", fixed, ["onnx"])
    assert 'name: "ranker"' in text
    assert "max_batch_size: 0" in text
    assert "data_type: TYPE_INT64" in text
    assert "dims: [ 8 ]" in text
    assert "data_type: TYPE_STRING" in text
    assert "dynamic_batching" not in text
    batched = triton_config("digits", SIGNATURE, ["onnx"])
    assert "max_batch_size: 64" in batched
    assert "dims: [ 64 ]" in batched
    assert "dynamic_batching { }" in batched
