"""A real stack for training tests: data, registry and training services on a migrated
database, a real NATS, datasets ingested through the data service, and workers (in-process
or real `python -m aimass.training.worker` processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.core.protodict import message_from_dict
from aimass.core.settings import Settings
from aimass.data import config as data_config
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from aimass.training.worker import TrainingWorker
from tests.fixtures.stack import Stack, serve_stack, stack_settings

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}
REPO = Path(__file__).resolve().parents[2]


def write_digits(path: Path) -> Path:
    digits = load_digits()
    header = ",".join(f"p{i}" for i in range(64)) + ",label"
    pairs = zip(digits.data, digits.target, strict=True)
    rows = [",".join(str(int(v)) for v in x) + f",{y}" for x, y in pairs]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def write_breast_cancer(path: Path) -> Path:
    data = load_breast_cancer()
    header = ",".join(f"f{i}" for i in range(30)) + ",label"
    pairs = zip(data.data, data.target, strict=True)
    rows = [",".join(f"{v:.6g}" for v in x) + f",{y}" for x, y in pairs]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@dataclass
class TrainingStack:
    stack: Stack
    settings: Settings
    digits: str
    workers: list[Any] = field(default_factory=list)

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(self.stack.channel("training"))

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.stack.channel("registry"))

    @property
    def data(self) -> data_pb2_grpc.DataServiceStub:
        return data_pb2_grpc.DataServiceStub(self.stack.channel("data"))

    async def ingest(self, dataset_id: str, file_name: str, label: str = "label") -> str:
        config = data_config.from_dict(
            {"data_path": file_name, "label_column": label, "seed": 0, "stratify": True}
        )
        await self.data.CreateDataset(
            data_pb2.CreateDatasetRequest(
                dataset=data_pb2.Dataset(config=config), dataset_id=dataset_id
            )
        )
        job = await self.data.IngestDataset(
            data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}")
        )
        async for event in self.data.WatchIngestJob(data_pb2.WatchIngestJobRequest(name=job.name)):
            if event.status.state in TERMINAL:
                break
        job = await self.data.GetIngestJob(data_pb2.GetIngestJobRequest(name=job.name))
        assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
        return job.dataset_version

    def job(self, model: dict, training: dict, **fields: Any) -> tpb.TrainingJob:
        job = tpb.TrainingJob(dataset_version=fields.pop("dataset_version", self.digits), **fields)
        message_from_dict(model, job.model)
        message_from_dict(training, job.training)
        return job

    async def create(self, job: tpb.TrainingJob, **kw: Any) -> tpb.TrainingJob:
        return await self.training.CreateTrainingJob(
            tpb.CreateTrainingJobRequest(training_job=job, **kw)
        )

    async def wait(self, name: str, timeout_s: float = 120.0) -> tpb.TrainingJob:
        async def follow() -> None:
            request = tpb.WatchTrainingJobRequest(name=name)
            async for event in self.training.WatchTrainingJob(request):
                if event.status.state in TERMINAL:
                    return

        await asyncio.wait_for(follow(), timeout_s)
        return await self.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=name))

    async def logs(self, name: str) -> list[str]:
        response = await self.training.ListTrainingJobLogs(
            tpb.ListTrainingJobLogsRequest(parent=name)
        )
        return [entry.message for entry in response.log_entries]

    @contextlib.asynccontextmanager
    async def worker(self, **kw: Any) -> AsyncIterator[TrainingWorker]:
        """An in-process worker (its own NATS connection and channels; no database)."""
        worker = TrainingWorker(worker_settings(self.settings), threads=1, **kw)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(url)
    return url


async def _stack(db_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[TrainingStack]:
    root = tmp_path / "data"
    root.mkdir()
    write_digits(root / "digits.csv")
    write_breast_cancer(root / "breast_cancer.csv")
    settings = stack_settings(tmp_path / "home", db_url, nats_url, data_roots=[root])
    async with serve_stack(settings, ["data", "registry", "training"]) as stack:
        ts = TrainingStack(stack, settings, digits="")
        ts.digits = await ts.ingest("digits", "digits.csv")
        yield ts


@pytest.fixture
async def training_stack(sqlite_db_url, nats_url, tmp_path) -> AsyncIterator[TrainingStack]:
    """The stack on SQLite (most tests); see ``training_stack_any_db`` for both backends."""
    async for ts in _stack(sqlite_db_url, nats_url, tmp_path):
        yield ts


@pytest.fixture
async def training_stack_any_db(
    migrated_db_url, nats_url, tmp_path
) -> AsyncIterator[TrainingStack]:
    async for ts in _stack(migrated_db_url, nats_url, tmp_path):
        yield ts


# Workers never open the database: every worker of these tests gets one that cannot be
# reached, so any database access by a worker fails the test that drives it.
UNREACHABLE_DATABASE_URL = "postgresql+psycopg://nobody:nothing@127.0.0.1:9/none"


def worker_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"database_url": UNREACHABLE_DATABASE_URL})


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIMASS_HOME": str(settings.home),
            "AIMASS_DATABASE_URL": UNREACHABLE_DATABASE_URL,
            "AIMASS_ARTIFACT_ROOT": settings.artifact_root,
            "AIMASS_NATS_URL": settings.nats_url,
            "AIMASS_LOG_FORMAT": "console",
            "OMP_NUM_THREADS": "1",
        }
    )
    for name in ("data", "registry", "training"):
        env[f"AIMASS_PORTS__{name.upper()}"] = str(settings.ports.of(name))
    return env


@contextlib.contextmanager
def worker_process(settings: Settings, name: str, *args: str) -> Iterator[subprocess.Popen]:
    """A real worker process (`python -m aimass.training.worker`), stopped at the end."""
    log = open(Path(settings.home) / f"{name}.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "aimass.training.worker", "--name", name, "--threads", "1", *args],
        env=worker_env(settings),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
