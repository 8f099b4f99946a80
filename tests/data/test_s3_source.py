"""Ingest from ``s3://`` on a real S3 API (moto's server): with and without ``download``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2 as pb
from tests.data.conftest import serve_data, settings_for, write_csv
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def cached_objects(home: Path) -> list[Path]:
    return sorted(p for p in (home / "cache" / "s3").rglob("*") if p.is_file())


async def test_download_keeps_the_object_in_the_cache_and_never_fetches_it_twice(
    migrated_db_url: str, nats_url: str, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    client: Any = s3_server.client
    body = write_csv(tmp_path / "d.csv", 60).read_bytes()
    client.put_object(Bucket=s3_bucket, Key="raw/d.csv", Body=body)
    root = tmp_path / "data"
    root.mkdir()
    home = tmp_path / "home"
    settings = settings_for(home, migrated_db_url, nats_url, root, s3=s3_server.settings)
    async with serve_data(settings, root) as data:
        uri = f"s3://{s3_bucket}/raw/d.csv"
        await data.create("d", s3_uri=uri, download=True, label_column="label")
        first = await data.ingest("d")
        assert first.status.state == common_pb2.JOB_STATE_SUCCEEDED, first.status.reason
        [cached] = cached_objects(home)
        assert cached.read_bytes() == body
        fetched_at = cached.stat().st_mtime_ns

        again = await data.ingest("d")
        assert again.cache_hit
        assert again.dataset_version == first.dataset_version
        assert cached_objects(home) == [cached]
        assert cached.stat().st_mtime_ns == fetched_at  # not fetched again

        # A changed object has another ETag: fetched, and a new version.
        client.put_object(Bucket=s3_bucket, Key="raw/d.csv", Body=body + b"999,1.0,c0\n")
        changed = await data.ingest("d")
        assert changed.status.state == common_pb2.JOB_STATE_SUCCEEDED, changed.status.reason
        assert changed.dataset_version == "datasets/d/versions/2"
        version = await data.stub.GetDatasetVersion(
            pb.GetDatasetVersionRequest(name=changed.dataset_version)
        )
        assert version.total_rows == 61
        assert len(cached_objects(home)) == 2


async def test_without_download_nothing_stays_in_the_cache(
    migrated_db_url: str, nats_url: str, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    write_csv(tmp_path / "d.csv", 40)
    s3_server.client.upload_file(str(tmp_path / "d.csv"), s3_bucket, "d.csv")
    root = tmp_path / "data"
    root.mkdir()
    home = tmp_path / "home"
    settings = settings_for(home, migrated_db_url, nats_url, root, s3=s3_server.settings)
    async with serve_data(settings, root) as data:
        await data.create("d", s3_uri=f"s3://{s3_bucket}/d.csv", label_column="label")
        job = await data.ingest("d")
        assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
        assert sum(s.row_count for s in (await data.stub.GetDatasetVersion(
            pb.GetDatasetVersionRequest(name=job.dataset_version))).splits) == 40  # fmt: skip
        assert cached_objects(home) == []
        assert not list((home / "cache" / "work").iterdir())

        await data.create("missing", s3_uri=f"s3://{s3_bucket}/nope.csv")
        failed = await data.ingest("missing")
        assert failed.status.state == common_pb2.JOB_STATE_FAILED
        assert "config.s3_uri" in failed.status.reason
        assert "nope.csv" in failed.status.reason
