"""A job across two hosts: two worker processes on this machine act as two hosts (one
process each, gloo over loopback). The job is split into per-host tasks on the work queue,
host 0 publishes its rendezvous address through the training service, host 1 joins, and
the run follows the loss curve of one process with the same global batch."""

from __future__ import annotations

import asyncio

import pytest

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.training.sources import ServiceSplitSource
from aimass.training.trainer import Trainer
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.validation import fetch_dataset_version
from tests.training.conftest import worker_process
from tests.training.test_trainer_loop import Hooks, plan

SPEC = {"mlp": {"hidden_sizes": [32]}}
CONFIG = {"epochs": 3, "seed": 5, "optimizer": {"type": "sgd", "learning_rate": 0.05}}


async def epoch_losses(ts, name: str) -> list[float]:
    request = tpb.WatchTrainingJobRequest(name=name)
    return [
        event.metrics["train_loss"]
        async for event in ts.training.WatchTrainingJob(request)
        if "train_loss" in event.metrics
    ]


async def one_process_run(ts, tmp_path) -> tuple[list[float], dict[str, float]]:
    """The same data (read through ReadSplit), one process, the same global batch."""
    version = await fetch_dataset_version(ts.stack.channel("data"), ts.digits)
    data = ann.data_signature_from_version(version)
    hooks = Hooks()
    source = ServiceSplitSource(ts.stack.address("data"), ts.digits)
    config = {**CONFIG, "batch_size": 64}
    trainer = Trainer(plan(data, tmp_path, SPEC, config), source, hooks)
    result = await asyncio.to_thread(trainer.run)
    losses = [values["train_loss"] for _, values in hooks.metrics_seen if "train_loss" in values]
    return losses, {**result.metrics, "steps": float(result.steps)}


async def test_two_hosts_follow_the_one_process_curve(training_stack, tmp_path):
    ts = training_stack
    spread = ts.job(SPEC, {**CONFIG, "batch_size": 32}, resources={"hosts": 2, "processes": 1})
    with worker_process(ts.settings, "host-a"), worker_process(ts.settings, "host-b"):
        job = await ts.create(spread)
        done = await ts.wait(job.name, timeout_s=150)
    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
    assert done.status.attempt == 1
    logs = "\n".join(await ts.logs(job.name))
    assert "host 0 of 2: ranks 0..0 of 2" in logs
    assert "host 1 of 2: ranks 1..1 of 2" in logs
    assert "rendezvous tcp://127.0.0.1:" in logs
    want, expected = await one_process_run(ts, tmp_path)
    got = await epoch_losses(ts, job.name)
    assert len(got) == len(want) == 3
    assert got == pytest.approx(want, rel=1e-5)
    final = {m.name: m.value for m in done.final_metrics}
    assert final["steps"] == expected["steps"]
    assert final["valid_loss"] == pytest.approx(expected["valid_loss"], rel=1e-5)
    assert final["valid_accuracy"] == pytest.approx(expected["valid_accuracy"])
