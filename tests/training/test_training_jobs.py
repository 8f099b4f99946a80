"""Jobs end to end: create -> queue -> worker -> trained, exported, registered, evented."""

from __future__ import annotations

import numpy as np

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.registry.v1 import registry_pb2
from tests.fixtures.stack import record_events

MLP = {"mlp": {"hidden_sizes": [32]}}
QUICK = {
    "epochs": 3,
    "batch_size": 64,
    "seed": 0,
    "optimizer": {"type": "adam", "learning_rate": 0.01},
}


async def test_job_trains_registers_and_publishes(training_stack_any_db, tmp_path):
    ts = training_stack_any_db
    async with record_events(
        ts.settings.nats_url, "training-test", ["aimass.training.job.>"]
    ) as events:
        job = await ts.create(
            ts.job(MLP, QUICK, target_model="models/digits-mlp"), request_id="req-1"
        )
        assert job.status.state == common_pb2.JOB_STATE_QUEUED
        again = await ts.create(
            ts.job(MLP, QUICK, target_model="models/digits-mlp"), request_id="req-1"
        )
        assert again.name == job.name
        async with ts.worker():
            done = await ts.wait(job.name)
        assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
        metrics = {m.name: m.value for m in done.final_metrics}
        assert metrics["valid_accuracy"] > 0.85
        assert metrics["steps"] == 3 * np.ceil(done_rows(ts) / 64) or metrics["steps"] > 0
        assert done.model_version.startswith("models/digits-mlp/versions/")
        version = await ts.registry.GetModelVersion(
            registry_pb2.GetModelVersionRequest(name=done.model_version)
        )
        assert {a.kind for a in version.artifacts} == {"onnx", "state_dict"}
        assert version.source.dataset_version == ts.digits
        assert version.source.job == job.name
        assert list(version.signature.inputs[0].shape) == [-1, 64]
        assert "valid_accuracy" in {m.name for m in version.metrics}
        config = dict(version.config.values)
        rebuilt = ann.rebuild_model(_plain(config))
        assert rebuilt.signature.classes == tuple(str(i) for i in range(10))
        await events.wait_for(lambda e: events.of("aimass.training.job.succeeded"))
    logs = await ts.logs(job.name)
    assert any("succeeded after" in line for line in logs)


def done_rows(ts) -> int:
    return 0


def _plain(value):
    from google.protobuf import json_format, struct_pb2

    struct = struct_pb2.Struct()
    struct.update(value)
    return json_format.MessageToDict(struct)
