"""A real data service per test: its own build() on a migrated database (SQLite and
PostgreSQL), a file:// artifact store and a data root under tmp_path, and a fresh JetStream
server, served by grpc.aio on a free port."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from sqlalchemy import func, select

from aimass.common.v1 import common_pb2
from aimass.core.db.engine import Database
from aimass.core.service import start_service
from aimass.core.settings import Settings, load_settings
from aimass.data import config as cfg
from aimass.data.main import SERVICE_NAME, build
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc
from tests.fixtures.stack import EventLog, free_port, record_events

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}


@dataclass
class DataService:
    stub: data_pb2_grpc.DataServiceStub
    settings: Settings
    root: Path
    stub_target: str = ""

    @property
    def artifact_dir(self) -> Path:
        return Path(self.settings.artifact_root.removeprefix("file://"))

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.artifact_dir.rglob("*") if p.is_file())

    def count(self, model: Any) -> int:
        database = Database(self.settings.database_url)
        try:
            with database.session(read_only=True) as session:
                return int(session.scalar(select(func.count()).select_from(model)) or 0)
        finally:
            database.dispose()

    async def create(self, dataset_id: str, **config: Any) -> pb.Dataset:
        return await self.stub.CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(config=cfg.from_dict(config)), dataset_id=dataset_id
            )
        )

    async def ingest(self, dataset_id: str, **kwargs: Any) -> pb.IngestJob:
        """Starts an ingest and follows its Watch stream to the end; returns the final job."""
        job = await self.stub.IngestDataset(
            pb.IngestDatasetRequest(name=f"datasets/{dataset_id}", **kwargs)
        )
        async for event in self.stub.WatchIngestJob(pb.WatchIngestJobRequest(name=job.name)):
            if event.status.state in TERMINAL:
                break
        return await self.stub.GetIngestJob(pb.GetIngestJobRequest(name=job.name))

    async def read(
        self, version: str, split: int = common_pb2.DATASET_SPLIT_TRAIN, **kw: Any
    ) -> pa.Table:
        batches = []
        async for message in self.stub.ReadSplit(
            pb.ReadSplitRequest(name=version, split=split, **kw)
        ):
            batches.extend(pa.ipc.open_stream(message.arrow_ipc).read_all().to_batches())
        return pa.Table.from_batches(batches)


def settings_for(home: Path, db_url: str, nats_url: str, root: Path, **over: Any) -> Settings:
    return load_settings(
        **over,
        home=home,
        database_url=db_url,
        artifact_root=(home / "artifacts").as_uri(),
        nats_url=nats_url,
        log_format="console",
        data_roots=[root],
        # Nothing listens there: a test that needs the registry starts one (test_delete_guard).
        ports={"registry": free_port()},
    )


@pytest.fixture
async def data(migrated_db_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[DataService]:
    root = tmp_path / "data"
    root.mkdir()
    settings = settings_for(tmp_path / "home", migrated_db_url, nats_url, root)
    async with serve_data(settings, root) as service:
        yield service


@asynccontextmanager
async def serve_data(settings: Settings, root: Path) -> AsyncIterator[DataService]:
    """The data service's own build() on ``settings``, served on a free port."""
    running, _ctx = await start_service(SERVICE_NAME, build, settings, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield DataService(
            data_pb2_grpc.DataServiceStub(channel), settings, root, f"127.0.0.1:{running.port}"
        )
    finally:
        await channel.close()
        await running.stop(0)


@pytest.fixture
async def data_events(data: DataService) -> AsyncIterator[EventLog]:
    async with record_events(data.settings.nats_url, "data-test", ["aimass.data.>"]) as log:
        yield log


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_csv(path: Path, rows: int, classes: int = 3) -> Path:
    lines = ["x,y,label"] + [f"{i},{(i * 7) % 11 * 0.5},c{i % classes}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path
