"""One registry per test module for the import tests (SQLite, a fresh NATS), and helpers to
upload a file and import it. The import logic does not touch SQL beyond create_version,
which the registry's own tests run on both databases."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.registry.v1 import registry_pb2 as pb
from tests.fixtures.nats import NatsServer
from tests.registry.conftest import Registry, serve_registry, settings_for


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def byom_registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    base = tmp_path_factory.mktemp("byom")
    nats = NatsServer(base / "nats")
    nats.start()
    db_url = f"sqlite:///{base / 'aimass.db'}"
    upgrade(db_url)
    try:
        async with serve_registry(settings_for(base / "home", db_url, nats.url)) as registry:
            yield registry
    finally:
        nats.stop()
        shutil.rmtree(base / "nats", ignore_errors=True)


async def import_file(
    registry: Registry,
    model_id: str,
    data: bytes,
    file_name: str,
    signature: common_pb2.Signature | None = None,
    **fields: Any,
) -> pb.ModelVersion:
    """Uploads ``data`` and imports it as a new version of ``model_id``."""
    artifact = await registry.upload(data, kind="upload", file_name=file_name)
    return await registry.stub.ImportModelVersion(
        pb.ImportModelVersionRequest(
            parent=f"models/{model_id}",
            source_uri=artifact.uri,
            file_name=file_name,
            signature=signature,
            **fields,
        )
    )


async def model_ids(registry: Registry) -> list[str]:
    listed = await registry.stub.ListRegisteredModels(pb.ListRegisteredModelsRequest())
    return [m.name.removeprefix("models/") for m in listed.registered_models]


def signature(*inputs: tuple[str, str, list[int]], output: str = "") -> common_pb2.Signature:
    """A Signature from (name, datatype, shape) inputs and an optional output name."""
    sig = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name=n, datatype=d, shape=s) for n, d, s in inputs]
    )
    if output:
        sig.outputs.add(name=output)
    return sig
