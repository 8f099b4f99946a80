"""Ingest rides the JetStream work queue: a data-service process SIGKILLed mid-ingest loses
its job to another replica, which finishes it without a second version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.core.db.migrate import upgrade
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc
from tests.data.conftest import TERMINAL, DataService, settings_for, write_csv
from tests.fixtures.stack import free_port

PROC = Path(__file__).with_name("ingest_proc.py")
DEADLINE_S = 60.0


def env_for(home: Path, root: Path, nats_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(
        {
            "AIMASS_HOME": str(home),
            "AIMASS_NATS_URL": nats_url,
            "AIMASS_PORTS__DATA": str(port),
            "AIMASS_DATA_ROOTS": json.dumps([str(root)]),
            "AIMASS_LOG_FORMAT": "console",
        }
    )
    return env


def start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(PROC), *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_until(what: str, done: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"data service exited with {proc.returncode}: {log.read_text()}")
        if done():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen: {log.read_text()}")


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="aimass.data.v1.DataService"), timeout=1
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_job_whose_worker_is_killed_is_finished_by_another(tmp_path: Path, nats_url: str) -> None:
    home, root = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    root.mkdir()
    upgrade(f"sqlite:///{home / 'aimass.db'}")
    write_csv(root / "d.csv", 120)
    marker, log = tmp_path / "converting", tmp_path / "data.log"
    first_port, second_port = free_port(), free_port()
    first = start(env_for(home, root, nats_url, first_port), log, "hang", str(marker))
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until("the first replica serving", lambda: serving(first_port), first, log)
        with grpc.insecure_channel(f"127.0.0.1:{first_port}") as channel:
            stub = data_pb2_grpc.DataServiceStub(channel)
            stub.CreateDataset(
                pb.CreateDatasetRequest(
                    dataset_id="d",
                    dataset=pb.Dataset(
                        config=pb.DatasetConfig(data_path="d.csv", label_column="label")
                    ),
                )
            )
            job = stub.IngestDataset(pb.IngestDatasetRequest(name="datasets/d"))
        wait_until("the conversion starting", marker.exists, first, log)
        first.kill()  # SIGKILL: no cleanup, no nak, the job is RUNNING with version 1
        first.wait()

        second = start(env_for(home, root, nats_url, second_port), log)
        wait_until("the second replica serving", lambda: serving(second_port), second, log)
        with grpc.insecure_channel(f"127.0.0.1:{second_port}") as channel:
            stub = data_pb2_grpc.DataServiceStub(channel)
            for event in stub.WatchIngestJob(
                pb.WatchIngestJobRequest(name=job.name), timeout=DEADLINE_S
            ):
                if event.status.state in TERMINAL:
                    break
            done = stub.GetIngestJob(pb.GetIngestJobRequest(name=job.name))
            versions = stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(parent="datasets/d"))
    finally:
        stop(first)
        if second is not None:
            stop(second)

    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
    assert done.dataset_version == "datasets/d/versions/1"
    assert [(v.version, v.state) for v in versions.dataset_versions] == [
        (1, pb.DATASET_VERSION_STATE_READY)
    ]
    assert sum(s.row_count for s in versions.dataset_versions[0].splits) == 120
    settings = settings_for(home, f"sqlite:///{home / 'aimass.db'}", nats_url, root)
    service = DataService(None, settings, root)  # type: ignore[arg-type]
    assert service.count(m.DatasetVersion) == 1
    assert len(service.stored_files()) == 3  # train, valid, test: nothing stored twice
