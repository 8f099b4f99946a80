"""A worker killed with SIGKILL mid-job: the job is redelivered to another worker process,
resumes from its last checkpoint, ends with the metrics of an uninterrupted run, and exactly
one model version is registered."""

from __future__ import annotations

import asyncio
import signal
import time

from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2
from aimass.training.v1 import training_pb2 as tpb
from tests.training.conftest import worker_process

SPEC = {"mlp": {"hidden_sizes": [32], "dropout": 0.1}}
CONFIG = {
    "epochs": 8,
    "batch_size": 32,
    "seed": 3,
    "checkpoint_interval_steps": 25,
    "optimizer": {"type": "sgd", "learning_rate": 0.01, "momentum": 0.9},
}


async def wait_for_checkpoint(ts, name: str, timeout_s: float = 90.0) -> tpb.TrainingJob:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        job = await ts.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=name))
        if job.checkpoints and job.checkpoints[-1].step >= 50:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} wrote no checkpoint in {timeout_s}s")


async def test_killed_worker_job_resumes_elsewhere_with_same_result(training_stack):
    ts = training_stack
    job = await ts.create(ts.job(SPEC, CONFIG, target_model="models/resumed"))
    with worker_process(ts.settings, "victim", "--ack-wait", "3") as victim:
        running = await wait_for_checkpoint(ts, job.name)
        assert running.status.state == common_pb2.JOB_STATE_RUNNING
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed = time.monotonic()
    with worker_process(ts.settings, "rescuer", "--ack-wait", "3"):
        resumed = await ts.wait(job.name, timeout_s=150)
        recovered_s = time.monotonic() - killed
        started = time.monotonic()
        reference = await ts.create(ts.job(SPEC, CONFIG))
        uninterrupted = await ts.wait(reference.name, timeout_s=150)
        whole_run_s = time.monotonic() - started
    # Printed, not asserted: redelivery after ack_wait (3 s), resume, the remaining epochs.
    print(
        f"\n[fault] training worker killed mid-epoch: job done {recovered_s:.3f}s after the"
        f" kill; an uninterrupted run of the same job took {whole_run_s:.3f}s"
    )
    assert resumed.status.state == common_pb2.JOB_STATE_SUCCEEDED, resumed.status.reason
    assert resumed.status.attempt == 2
    assert uninterrupted.status.state == common_pb2.JOB_STATE_SUCCEEDED
    logs = "\n".join(await ts.logs(job.name))
    assert "resumed from the checkpoint of step" in logs
    got = {m.name: m.value for m in resumed.final_metrics}
    want = {m.name: m.value for m in uninterrupted.final_metrics}
    for key in ("train_loss", "valid_loss", "valid_accuracy", "steps"):
        assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), key
    versions = await ts.registry.ListModelVersions(
        registry_pb2.ListModelVersionsRequest(parent="models/resumed")
    )
    assert [v.name for v in versions.model_versions] == [resumed.model_version]
