"""Dataset paths, upload names, artifact URIs and release bundle members stay inside their roots.

Each attempt goes through the public gRPC API of a real data or registry service (auth
off: this is about paths, not credentials) and must be refused with INVALID_ARGUMENT or
NOT_FOUND, never read a byte from outside the roots, and never leave a file or a row
behind. The outside world is a canary file next to (not under) the roots.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2 as reg
from aimass.registry.v1 import registry_pb2_grpc
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import serve_stack, stack_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

CANARY = b"canary: outside every root\n"
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@dataclass
class Confined:
    data: data_pb2_grpc.DataServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    home: Path
    data_root: Path
    artifact_root: Path
    canary: Path

    def files_named(self, name: str) -> list[Path]:
        return [p for p in self.home.parent.rglob(name) if p != self.canary]


@pytest.fixture(scope="module")
def nats_confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("conf-nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def confined(
    tmp_path_factory: pytest.TempPathFactory, nats_confined: NatsServer
) -> AsyncIterator[Confined]:
    top = tmp_path_factory.mktemp("confined")
    home, canary = top / "home", top / "outside" / "secret.csv"
    canary.parent.mkdir(parents=True)
    canary.write_bytes(CANARY)
    data_root, artifact_root = home / "data", home / "artifacts"
    data_root.mkdir(parents=True)
    db_url = f"sqlite:///{top / 'aimass.db'}"
    upgrade(db_url)
    settings = stack_settings(
        home, db_url, nats_confined.url, data_roots=[data_root],
        artifact_root=artifact_root.as_uri(),
    )  # fmt: skip
    async with serve_stack(settings, ["registry", "data"]) as stack:
        yield Confined(
            data_pb2_grpc.DataServiceStub(stack.channel("data")),
            registry_pb2_grpc.RegistryServiceStub(stack.channel("registry")),
            home,
            data_root,
            artifact_root,
            canary,
        )


async def refused(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    assert caught.value.code() in REFUSED, (caught.value.code(), caught.value.details())
    return caught.value


def escaping_paths(c: Confined) -> list[str]:
    outside = str(c.canary)
    climb = "../" * 12 + outside.lstrip("/")
    return [
        outside,  # absolute, outside the roots
        "../outside/secret.csv",
        climb,
        "sub/../../outside/secret.csv",
        "..%2f..%2foutside%2fsecret.csv",  # percent-encoded slashes: a literal name, not a path
        "%2e%2e/%2e%2e/outside/secret.csv",
        "..\\..\\outside\\secret.csv",
        c.canary.as_uri(),  # file:// to elsewhere
        "link-out.csv",  # a symlink in the data root pointing outside it
        "linked-dir/secret.csv",  # a file under a symlinked folder that points outside
    ]


@pytest.fixture(scope="module")
def links(confined: Confined) -> None:
    (confined.data_root / "link-out.csv").symlink_to(confined.canary)
    (confined.data_root / "linked-dir").symlink_to(confined.canary.parent, target_is_directory=True)


async def test_dataset_paths_cannot_leave_the_data_roots(confined, links):
    for index, path in enumerate(escaping_paths(confined)):
        config = data_pb2.DatasetConfig(data_path=path, label_column="label")
        request = data_pb2.CreateDatasetRequest(
            dataset=data_pb2.Dataset(config=config), dataset_id=f"escape-{index}"
        )
        error = await refused(confined.data.CreateDataset(request))
        assert "data_path" in error.details(), (path, error.details())
    listed = await confined.data.ListDatasets(data_pb2.ListDatasetsRequest())
    assert list(listed.datasets) == []


async def test_a_path_inside_the_root_is_accepted(confined, links):
    # The same API does accept a plain file under the root: the refusals above are about paths.
    (confined.data_root / "ok.csv").write_text("x,label\n1,0\n2,1\n")
    config = data_pb2.DatasetConfig(data_path="ok.csv", label_column="label")
    created = await confined.data.CreateDataset(
        data_pb2.CreateDatasetRequest(dataset=data_pb2.Dataset(config=config), dataset_id="ok")
    )
    assert created.name == "datasets/ok"


async def _upload_data(c: Confined, header: data_pb2.UploadHeader, body: bytes) -> data_pb2.Upload:
    async def messages() -> AsyncIterator[data_pb2.UploadDataRequest]:
        yield data_pb2.UploadDataRequest(header=header)
        if body:
            chunk = common_pb2.ByteChunk(offset=0, data=body)
            yield data_pb2.UploadDataRequest(chunk=chunk)

    return await c.data.UploadData(messages())


async def test_upload_names_cannot_place_files_outside(confined):
    body = b"x,label\n1,0\n"
    sha = hashlib.sha256(body).hexdigest()
    for name in (
        "../../escaped-upload.csv",
        "/tmp/escaped-upload.csv",
        "a/../../escaped-upload.csv",
    ):
        header = data_pb2.UploadHeader(file_name=name, size_bytes=len(body), sha256=sha)
        upload = await _upload_data(confined, header, body)
        # The name is kept as a display name (its last segment); the bytes go to the store.
        assert upload.file_name == "escaped-upload.csv"
        assert upload.uri.startswith(confined.artifact_root.as_uri())
    assert confined.files_named("escaped-upload.csv") == []
    assert not await asyncio.to_thread(Path("/tmp/escaped-upload.csv").exists)
    for upload_name in ("uploads/../../../escape", "uploads/..%2F..%2Fescape", "../uploads/x"):
        header = data_pb2.UploadHeader(upload=upload_name, size_bytes=len(body), sha256=sha)
        await refused(_upload_data(confined, header, body))


def escaping_uris(c: Confined) -> list[str]:
    root = c.artifact_root.as_uri()
    fake_sha = "ab" * 32
    return [
        c.canary.as_uri(),
        "file:///etc/passwd",
        f"{root}/../outside/secret.csv",
        f"{root}/sha256/../../../outside/secret.csv",
        f"{root}/sha256%2F..%2F..%2F..%2Foutside%2Fsecret.csv",
        f"{root}/%2e%2e/%2e%2e/outside/secret.csv",
        f"{root}/sha256/ab/ab/{fake_sha}",  # a symlink planted in the store pointing outside
        f"file://otherhost{c.canary}",
        "s3://another-bucket/secret.csv",
        f"{root}\\..\\..\\outside\\secret.csv",
        f"{root}/sha256/ab/ab/{fake_sha}\x00.csv",
    ]


async def test_artifact_uris_cannot_reach_outside_the_store(confined):
    planted = confined.artifact_root / "sha256" / "ab" / "ab" / ("ab" * 32)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(confined.canary)
    await confined.registry.CreateRegisteredModel(
        reg.CreateRegisteredModelRequest(registered_model_id="paths")
    )
    for uri in escaping_uris(confined):
        artifact = common_pb2.Artifact(kind="onnx", uri=uri)
        request = reg.CreateModelVersionRequest(
            parent="models/paths", model_version=reg.ModelVersion(artifacts=[artifact])
        )
        await refused(confined.registry.CreateModelVersion(request))
        imported = reg.ImportModelVersionRequest(
            parent="models/paths", source_uri=uri, format=reg.MODEL_FORMAT_ONNX, file_name="m.onnx"
        )
        await refused(confined.registry.ImportModelVersion(imported))
        await refused(
            confined.registry.ImportRelease(
                reg.ImportReleaseRequest(parent="models/paths", bundle_uri=uri)
            )
        )
    versions = await confined.registry.ListModelVersions(
        reg.ListModelVersionsRequest(parent="models/paths")
    )
    assert list(versions.model_versions) == []


async def test_download_names_cannot_climb_out(confined):
    for name in ("models/../../etc/versions/1", "models/paths/versions/..%2F..", "/etc/passwd"):
        stream = confined.registry.DownloadArtifact(reg.DownloadArtifactRequest(name=name))
        await refused(stream.read())


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, body in members:
            info.size = len(body) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(body) if info.isfile() else None)
    return buffer.getvalue()


def _file(name: str, body: bytes = b"escaped\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), body


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def evil_bundles(c: Confined) -> dict[str, bytes]:
    escape = c.home.parent / "escaped-from-bundle.txt"
    manifest = _file("MANIFEST.sha256", b"")
    return {
        "dot-dot member": _tar([_file("../../../../../../" + str(escape).lstrip("/")), manifest]),
        "absolute member": _tar([_file(str(escape)), manifest]),
        "symlink member": _tar([_link("model/model.onnx", str(c.canary)), manifest]),
        "hardlink member": _tar([_link("model/model.onnx", str(c.canary), tarfile.LNKTYPE)]),
        "symlinked folder then a file through it": _tar(
            [_link("model", str(escape.parent)), _file("model/escaped-from-bundle.txt")]
        ),
        "manifest naming an outside path": _tar(
            [
                _file("config.json", b"{}"),
                _file(
                    "MANIFEST.sha256",
                    f"{hashlib.sha256(CANARY).hexdigest()}  ../outside/secret.csv\n".encode(),
                ),
            ]
        ),
        "encoded slashes": _tar([_file("..%2f..%2fescaped-from-bundle.txt"), manifest]),
    }


async def _upload_artifact(c: Confined, body: bytes) -> str:
    header = reg.UploadArtifactHeader(
        kind="bundle",
        file_name="release.tar.gz",
        sha256=hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
    )

    async def messages() -> AsyncIterator[reg.UploadArtifactRequest]:
        yield reg.UploadArtifactRequest(header=header)
        yield reg.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=body))

    return (await c.registry.UploadArtifact(messages())).uri


@pytest.mark.parametrize("case", [
    "dot-dot member", "absolute member", "symlink member", "hardlink member",
    "symlinked folder then a file through it", "manifest naming an outside path",
    "encoded slashes",
])  # fmt: skip
async def test_release_bundles_cannot_write_or_read_outside(confined, case):
    await confined.registry.CreateRegisteredModel(
        reg.CreateRegisteredModelRequest(registered_model_id=f"bundle-{abs(hash(case)) % 10**6}")
    )
    uri = await _upload_artifact(confined, evil_bundles(confined)[case])
    error = await refused(
        confined.registry.ImportRelease(
            reg.ImportReleaseRequest(
                parent=f"models/bundle-{abs(hash(case)) % 10**6}", bundle_uri=uri
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bundle" in error.details()
    assert confined.files_named("escaped-from-bundle.txt") == []
    assert confined.canary.read_bytes() == CANARY
