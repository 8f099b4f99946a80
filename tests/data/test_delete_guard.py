"""Deleting a dataset version asks the registry (over gRPC) whether a model version was
trained on it: refused while one is, refused with UNAVAILABLE when the registry is down."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from aimass.core.db import models as m
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc
from aimass.registry.v1 import registry_pb2 as rpb
from aimass.registry.v1 import registry_pb2_grpc
from tests.data.conftest import DataService, write_csv
from tests.fixtures.stack import serve_stack, stack_settings


async def test_a_version_in_a_model_lineage_cannot_be_deleted(
    migrated_db_url: str, nats_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    settings = stack_settings(tmp_path / "home", migrated_db_url, nats_url, data_roots=[root])
    async with serve_stack(settings, ["registry", "data"]) as stack:
        data = DataService(data_pb2_grpc.DataServiceStub(stack.channel("data")), settings, root)
        registry = registry_pb2_grpc.RegistryServiceStub(stack.channel("registry"))
        write_csv(root / "d.csv", 40)
        await data.create("d", data_path="d.csv", label_column="label")
        job = await data.ingest("d")
        await registry.CreateRegisteredModel(
            rpb.CreateRegisteredModelRequest(registered_model_id="mlp")
        )
        used = await registry.CreateModelVersion(
            rpb.CreateModelVersionRequest(
                parent="models/mlp",
                model_version=rpb.ModelVersion(
                    source=rpb.VersionSource(dataset_version=job.dataset_version)
                ),
            )
        )

        delete_version = pb.DeleteDatasetVersionRequest(name=job.dataset_version)
        delete_dataset = pb.DeleteDatasetRequest(name="datasets/d", force=True)
        for call, request in (
            (data.stub.DeleteDatasetVersion, delete_version),
            (data.stub.DeleteDataset, delete_dataset),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert used.name in err.value.details()
        assert data.count(m.DatasetVersion) == 1

        await registry.DeleteModelVersion(rpb.DeleteModelVersionRequest(name=used.name))
        await data.stub.DeleteDatasetVersion(
            pb.DeleteDatasetVersionRequest(name=job.dataset_version)
        )
        assert data.count(m.DatasetVersion) == 0
        assert data.stored_files() == []


async def test_without_a_reachable_registry_nothing_is_deleted(data: DataService) -> None:
    # The data fixture points the registry address at a port nothing listens on.
    write_csv(data.root / "d.csv", 40)
    await data.create("d", data_path="d.csv", label_column="label")
    job = await data.ingest("d")
    files = data.stored_files()

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await data.stub.DeleteDatasetVersion(
            pb.DeleteDatasetVersionRequest(name=job.dataset_version)
        )

    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "registry" in err.value.details()
    assert data.count(m.DatasetVersion) == 1
    assert data.stored_files() == files
