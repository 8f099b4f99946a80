"""The NATS server SIGKILLed mid-work and restarted on the same store directory.

Real processes: the data, registry and training services and a training worker, on a
SQLite database. A training job is running (past its first checkpoint) and an ingest job
has just been acknowledged when NATS dies; it comes back on the same port and store a
moment later. Both jobs finish, every event the stream held before the kill is still
there, no event is stored twice, and there is one dataset version and one model version.
Requests made while NATS is down are either accepted and carried out (a training job,
queued through the outbox) or refused cleanly with nothing half-made (an ingest, which
publishes to the queue directly: accepted only if NATS is back within the publish timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.core.protodict import message_from_dict
from aimass.data import config as data_config
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from tests.faults.procs import ServiceProcess, report, running, stored_events, wait_until
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import stack_settings
from tests.training.conftest import write_breast_cancer, write_digits

pytestmark = pytest.mark.slow

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}
DOWN_S = 2.0
# Rows of the CSV ingested across the kill: a few seconds of conversion.
WIDE_ROWS = 60_000
# Events published once per resource (a second copy would be a duplicate).
ONCE = (".created", ".ready", ".succeeded")
JOB_DEADLINE_S = 180.0
MODEL = {"mlp": {"hidden_sizes": [32]}}
TRAINING = {
    # Several times DOWN_S of work left after the first checkpoint, even on a fast machine.
    "epochs": 70,
    "batch_size": 32,
    "seed": 1,
    "checkpoint_interval_steps": 20,
    "optimizer": {"type": "sgd", "learning_rate": 0.01, "momentum": 0.9},
}


def write_wide_csv(path: Path, rows: int) -> None:
    features = np.random.default_rng(0).normal(size=(rows, 16)).round(4)
    labels = (features[:, 0] > 0).astype(int)
    header = ",".join(f"f{i}" for i in range(16)) + ",label"
    body = "\n".join(",".join(map(str, x)) + f",{y}" for x, y in zip(features, labels, strict=True))
    path.write_text(f"{header}\n{body}\n")


def start_ingest(stub: data_pb2_grpc.DataServiceStub, dataset_id: str, file_name: str) -> str:
    config = data_config.from_dict({"data_path": file_name, "label_column": "label", "seed": 0})
    stub.CreateDataset(
        data_pb2.CreateDatasetRequest(
            dataset=data_pb2.Dataset(config=config), dataset_id=dataset_id
        ),
        timeout=10,
    )
    job = stub.IngestDataset(
        data_pb2.IngestDatasetRequest(name=f"datasets/{dataset_id}"), timeout=10
    )
    return job.name


def try_ingest(
    stub: data_pb2_grpc.DataServiceStub, dataset_id: str, file_name: str
) -> tuple[str, grpc.StatusCode | None]:
    """The ingest job's name, or the status code the request was refused with."""
    try:
        return start_ingest(stub, dataset_id, file_name), None
    except grpc.RpcError as err:
        return "", err.code()


def create_training_job(
    stub: training_pb2_grpc.TrainingServiceStub, dataset_version: str, model: str, epochs: int
) -> str:
    spec = tpb.TrainingJob(dataset_version=dataset_version, target_model=model)
    message_from_dict(MODEL, spec.model)
    message_from_dict({**TRAINING, "epochs": epochs}, spec.training)
    return stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=spec), timeout=10).name


def ingest_job(stub: data_pb2_grpc.DataServiceStub, name: str) -> data_pb2.IngestJob:
    return stub.GetIngestJob(data_pb2.GetIngestJobRequest(name=name), timeout=10)


def training_job(stub: training_pb2_grpc.TrainingServiceStub, name: str) -> tpb.TrainingJob:
    return stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=name), timeout=10)


def model_versions_in_db(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM model_versions")).scalar_one())
    finally:
        engine.dispose()


def test_jobs_in_flight_survive_a_nats_crash(tmp_path: Path, nats_server: NatsServer) -> None:
    home, root = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    root.mkdir()
    write_digits(root / "digits.csv")
    write_breast_cancer(root / "cancer.csv")
    write_wide_csv(root / "wide.csv", WIDE_ROWS)
    db_url = f"sqlite:///{home / 'aimass.db'}"
    upgrade(db_url)
    settings = stack_settings(home, db_url, nats_server.url, data_roots=[root])
    services = [ServiceProcess.service(n, settings) for n in ("registry", "data", "training")]
    worker = ServiceProcess(
        "aimass.training.worker", settings, args=("--name", "w1", "--threads", "1")
    )
    with running(*services, worker):
        for proc in (*services, worker):
            proc.start(wait=False)  # side by side: each spends seconds importing
        for service in services:
            service.wait_serving()
        with (
            grpc.insecure_channel(settings.service_address("data")) as data_channel,
            grpc.insecure_channel(settings.service_address("training")) as training_channel,
            grpc.insecure_channel(settings.service_address("registry")) as registry_channel,
        ):
            data = data_pb2_grpc.DataServiceStub(data_channel)
            training = training_pb2_grpc.TrainingServiceStub(training_channel)
            registry = registry_pb2_grpc.RegistryServiceStub(registry_channel)

            digits_job = start_ingest(data, "digits", "digits.csv")
            wait_until(
                "digits ingested",
                lambda: ingest_job(data, digits_job).status.state in TERMINAL,
                JOB_DEADLINE_S,
            )
            digits = ingest_job(data, digits_job)
            assert digits.status.state == common_pb2.JOB_STATE_SUCCEEDED, digits.status.reason

            train = create_training_job(
                training, digits.dataset_version, "models/m", TRAINING["epochs"]
            )
            wait_until(
                "the training job past its first checkpoint",
                lambda: bool(training_job(training, train).checkpoints),
                JOB_DEADLINE_S,
                worker,
            )
            wide_job = start_ingest(data, "wide", "wide.csv")
            wait_until(
                "the ingest job running",
                lambda: ingest_job(data, wide_job).status.state == common_pb2.JOB_STATE_RUNNING,
                JOB_DEADLINE_S,
            )
            before = {e.id for e in asyncio.run(stored_events(nats_server.url))}

            nats_server.stop(kill=True)
            killed = time.monotonic()
            ingest_running_at_kill = ingest_job(data, wide_job).status.state not in TERMINAL
            # Requests while NATS is down: training queues its job through the outbox (so it
            # is accepted at once); ingest publishes to the queue directly (accepted once NATS
            # is back within the publish timeout, else refused with UNAVAILABLE).
            with ThreadPoolExecutor(1) as pool:
                late = pool.submit(try_ingest, data, "late", "cancer.csv")
                queued = create_training_job(training, digits.dataset_version, "models/q", 2)
                time.sleep(max(0.0, DOWN_S - (time.monotonic() - killed)))
                nats_server.start()
                restarted = time.monotonic()
                late_job, late_code = late.result(60)
            ingest_running_at_restart = ingest_job(data, wide_job).status.state not in TERMINAL
            # Mid-work across the whole outage.
            assert training_job(training, train).status.state == common_pb2.JOB_STATE_RUNNING

            wait_until(
                "the ingest job finishing after the restart",
                lambda: ingest_job(data, wide_job).status.state in TERMINAL,
                JOB_DEADLINE_S,
            )
            ingest_s = time.monotonic() - restarted
            wait_until(
                "the training job finishing after the restart",
                lambda: training_job(training, train).status.state in TERMINAL,
                JOB_DEADLINE_S,
                worker,
            )
            train_s = time.monotonic() - restarted
            trained = training_job(training, train)
            wait_until(
                "the job queued during the outage finishing",
                lambda: training_job(training, queued).status.state in TERMINAL,
                JOB_DEADLINE_S,
                worker,
            )
            queued_done = training_job(training, queued)
            if late_job:
                wait_until(
                    "the ingest accepted during the outage finishing",
                    lambda: ingest_job(data, late_job).status.state in TERMINAL,
                    JOB_DEADLINE_S,
                )
            late_outcome = (
                common_pb2.JobState.Name(ingest_job(data, late_job).status.state)
                if late_job
                else f"refused {late_code}"
            )
            late_versions = data.ListDatasetVersions(
                data_pb2.ListDatasetVersionsRequest(parent="datasets/late"), timeout=10
            )
            wide = ingest_job(data, wide_job)
            versions = data.ListDatasetVersions(
                data_pb2.ListDatasetVersionsRequest(parent="datasets/wide"), timeout=10
            )
            models = registry.ListModelVersions(
                registry_pb2.ListModelVersionsRequest(parent="models/m"), timeout=10
            )
            # The system serves again: a new ingest goes through end to end.
            again = start_ingest(data, "again", "cancer.csv")
            wait_until(
                "an ingest after the restart",
                lambda: ingest_job(data, again).status.state in TERMINAL,
                JOB_DEADLINE_S,
            )
            assert ingest_job(data, again).status.state == common_pb2.JOB_STATE_SUCCEEDED
        after = asyncio.run(stored_events(nats_server.url))

    assert wide.status.state == common_pb2.JOB_STATE_SUCCEEDED, wide.status.reason
    assert trained.status.state == common_pb2.JOB_STATE_SUCCEEDED, trained.status.reason
    assert [(v.version, v.state) for v in versions.dataset_versions] == [
        (1, data_pb2.DATASET_VERSION_STATE_READY)
    ]
    assert [v.name for v in models.model_versions] == [trained.model_version]
    assert queued_done.status.state == common_pb2.JOB_STATE_SUCCEEDED, queued_done.status.reason
    assert model_versions_in_db(db_url) == 2  # models/m and models/q, one each
    # Accepted: done with one version. Refused: cleanly, and nothing half-made.
    if late_job:
        assert late_outcome == "JOB_STATE_SUCCEEDED"
        assert len(late_versions.dataset_versions) == 1
    else:
        assert late_code == grpc.StatusCode.UNAVAILABLE
        assert list(late_versions.dataset_versions) == []
    ids = Counter(e.id for e in after)
    assert before <= set(ids), "events stored before the kill were lost"
    assert [i for i, n in ids.items() if n > 1] == []
    keyed = Counter((e.topic, e.subject) for e in after if e.topic.endswith(ONCE))
    assert [k for k, n in keyed.items() if n > 1] == []
    report(
        f"NATS SIGKILLed mid-training (attempt {trained.status.attempt}) and mid-ingest "
        f"(running at the kill: {ingest_running_at_kill}, at the restart: "
        f"{ingest_running_at_restart}), back after {DOWN_S:.0f}s; ingest requested while"
        f" down: {late_outcome}",
        ingest_done_after_restart=ingest_s,
        training_done_after_restart=train_s,
        nats_down=restarted - killed,
    )
