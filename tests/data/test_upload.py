"""Uploads over gRPC: chunked, resumable by offset, sha256 checked, then ingested."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.data.v1 import data_pb2 as pb
from tests.data.conftest import DataService, sha256

CHUNK = 1000


def chunks(data: bytes, start: int, stop: int) -> list[pb.UploadDataRequest]:
    return [
        pb.UploadDataRequest(
            chunk=common_pb2.ByteChunk(offset=o, data=data[o : min(o + CHUNK, stop)])
        )
        for o in range(start, stop, CHUNK)
    ]


async def send(
    data: DataService, header: pb.UploadHeader, parts: list[pb.UploadDataRequest]
) -> pb.Upload:
    async def messages() -> AsyncIterator[pb.UploadDataRequest]:
        yield pb.UploadDataRequest(header=header)
        for part in parts:
            yield part

    return await data.stub.UploadData(messages())


def content() -> bytes:
    return ("v,label\n" + "".join(f"{i},{i % 2}\n" for i in range(600))).encode()


async def test_a_broken_upload_resumes_from_its_offset_and_ingests(data: DataService) -> None:
    body = content()
    header = pb.UploadHeader(file_name="d.csv", size_bytes=len(body), sha256=sha256(body))
    first = await send(data, header, chunks(body, 0, 3000))
    assert first.state == pb.UPLOAD_STATE_ACTIVE
    assert first.committed_offset == 3000
    got = await data.stub.GetUpload(pb.GetUploadRequest(name=first.name))
    assert got.committed_offset == 3000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(data, pb.UploadHeader(upload=first.name), chunks(body, 2000, 2500))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "chunk.offset" in err.value.details()
    done = await send(data, pb.UploadHeader(upload=first.name), chunks(body, 3000, len(body)))
    assert done.state == pb.UPLOAD_STATE_COMPLETE
    assert done.uri
    config = pb.DatasetConfig(upload=done.name, label_column="label")
    await data.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(config=config), dataset_id="u")
    )
    job = await data.ingest("u")
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    version = await data.stub.GetDatasetVersion(
        pb.GetDatasetVersionRequest(name=job.dataset_version)
    )
    assert version.total_rows == 600


async def test_a_sha256_mismatch_fails_the_upload_and_keeps_nothing(data: DataService) -> None:
    body = content()
    header = pb.UploadHeader(file_name="d.csv", size_bytes=len(body), sha256=sha256(b"other"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await send(data, header, chunks(body, 0, len(body)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.sha256" in err.value.details()
    assert data.stored_files() == []
    assert not list((data.settings.home / "cache").rglob("*.part"))
    assert data.count(m.Upload) == 1  # kept as FAILED so the client can see why
