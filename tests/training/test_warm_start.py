"""Training jobs that start from weights (init_from) or learn from a teacher (distillation),
on a real stack with a worker: the registered version's state dict as the start, zero weights
kept at zero, a teacher version's ONNX soft targets, bad references failing with the field."""

from __future__ import annotations

import io

import grpc
import pytest
import torch

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import open_artifact_store
from aimass.training.v1 import training_pb2 as tpb
from tests.training.conftest import TrainingStack

MLP = {"mlp": {"hidden_sizes": [64]}}
SMALL = {"mlp": {"hidden_sizes": [8]}}


def metrics_of(job: tpb.TrainingJob) -> dict[str, float]:
    return {m.name: m.value for m in job.final_metrics}


async def test_init_from_a_version_keeps_zero_weights_and_distils(
    training_stack: TrainingStack, tmp_path
) -> None:
    ts = training_stack
    async with ts.worker():
        parent = await ts.wait(
            (await ts.create(ts.job(MLP, {"epochs": 5}, target_model="models/warm"))).name
        )
        assert parent.status.state == common_pb2.JOB_STATE_SUCCEEDED, parent.status.reason
        trained = metrics_of(parent)["valid_accuracy"]
        assert trained > 0.85

        # One step at a tiny learning rate: a fresh network would be near chance; the
        # registered weights keep their accuracy.
        warm = ts.job(MLP, {"max_steps": 1, "optimizer": {"learning_rate": 1e-7}})
        warm.init_from.model_version = parent.model_version
        done = await ts.wait((await ts.create(warm)).name)
        assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
        assert metrics_of(done)["valid_accuracy"] == pytest.approx(trained, abs=0.01)
        assert "started from the initial state of training_job.init_from" in await ts.logs(
            done.name
        )
        assert {a.kind for a in done.output_artifacts} == {"onnx", "state_dict"}

        # Zeroed weights stay zero through training with keep_zero_weights.
        stored = next(a for a in done.output_artifacts if a.kind == "state_dict")
        state = torch.load(io.BytesIO(await read(ts, stored.uri)), weights_only=True)
        state["layers.0.weight"][:, :32] = 0
        uri = await write(ts, state, tmp_path)
        masked = ts.job(MLP, {"epochs": 2})
        masked.init_from.state_dict_uri = uri
        masked.init_from.keep_zero_weights = True
        done = await ts.wait((await ts.create(masked)).name)
        assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
        stored = next(a for a in done.output_artifacts if a.kind == "state_dict")
        after = torch.load(io.BytesIO(await read(ts, stored.uri)), weights_only=True)
        assert bool((after["layers.0.weight"][:, :32] == 0).all())
        assert bool((after["layers.0.weight"][:, 32:] != 0).all())

        # A student of the registered teacher.
        student = ts.job(SMALL, {"epochs": 10, "optimizer": {"learning_rate": 3e-3}})
        student.distillation.teacher_model_version = parent.model_version
        student.distillation.temperature = 2
        done = await ts.wait((await ts.create(student)).name)
        assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
        assert metrics_of(done)["valid_accuracy"] > 0.8

        # A state dict of another network fails the job, naming the field.
        wrong = ts.job(SMALL, {"epochs": 1})
        wrong.init_from.model_version = parent.model_version
        done = await ts.wait((await ts.create(wrong)).name)
        assert done.status.state == common_pb2.JOB_STATE_FAILED
        assert done.status.reason.startswith("training_job.init_from: the state dict does not fit")


async def read(ts: TrainingStack, uri: str) -> bytes:
    store = open_artifact_store(ts.settings.artifact_root, ts.settings.s3)
    return b"".join([bytes(chunk) async for chunk in store.open_stream(uri)])


async def write(ts: TrainingStack, state: dict, tmp_path) -> str:
    path = tmp_path / "masked.pt"
    torch.save(state, path)
    store = open_artifact_store(ts.settings.artifact_root, ts.settings.s3)
    return (await store.put_file(path)).uri


async def test_warm_start_fields_are_checked_at_create(training_stack: TrainingStack) -> None:
    ts = training_stack
    cases = [
        ("init_from", lambda j: j.init_from.SetInParent(), "set model_version or state_dict_uri"),
        ("init_from.model_version", lambda j: setattr(j.init_from, "model_version", "models/x"),
         "must look like"),
        ("distillation", lambda j: j.distillation.SetInParent(), "set teacher_model_version"),
        ("distillation.alpha", lambda j: (setattr(j.distillation, "teacher_onnx_uri", "file:///t"),
                                          setattr(j.distillation, "alpha", 2)), "[0, 1]"),
    ]  # fmt: skip
    for field, change, message in cases:
        job = ts.job(MLP, {"epochs": 1})
        change(job)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ts.create(job)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"training_job.{field}" in refused.value.details()
        assert message in refused.value.details()
