"""The training loop itself: reproducible given the seed, 2-process DDP (gloo) follows the
1-process loss curve with the same global batch, schedules, early stopping, bf16."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.datasets import load_digits

from aimass.core import nn as ann
from aimass.core.protodict import message_from_dict
from aimass.training.ddp import run_distributed
from aimass.training.sources import TableSource
from aimass.training.trainer import Trainer, TrainingFailed, TrainPlan, lr_factor
from aimass.training.v1 import training_pb2 as tpb

torch.set_num_threads(1)


class Hooks:
    def __init__(self):
        self.metrics_seen, self.checkpoints, self.lines = [], [], []

    def metrics(self, step, epoch, values):
        self.metrics_seen.append((step, values))

    def log(self, message):
        self.lines.append(message)

    def checkpoint(self, step, epoch, path, metrics):
        self.checkpoints.append((step, path.read_bytes()))

    def should_stop(self):
        return False


@pytest.fixture(scope="module")
def digits_source():
    d = load_digits()
    table = pa.table({**{f"p{i}": d.data[:, i] / 16 for i in range(64)}, "label": d.target})
    source = TableSource({"train": table.slice(0, 600), "valid": table.slice(1500, 200)})
    return source, ann.data_signature_from_table(table, "label")


def plan(data, tmp_path, spec, config, **kw):
    return TrainPlan(
        job="trainingJobs/t",
        spec=ann.spec_from_dict(spec).SerializeToString(),
        config=message_from_dict(config, tpb.TrainingConfig()).SerializeToString(),
        data_signature=data.to_dict(),
        work_dir=str(tmp_path),
        threads=1,
        export=kw.pop("export", False),
        **kw,
    )


MLP = {"mlp": {"hidden_sizes": [32]}}


def test_same_seed_same_run_other_seed_other_run(digits_source, tmp_path):
    source, data = digits_source
    config = {"epochs": 2, "batch_size": 32, "seed": 7}
    spec = {"mlp": {"hidden_sizes": [32], "dropout": 0.2}}
    a = Trainer(plan(data, tmp_path, spec, config), source, Hooks()).run()
    b = Trainer(plan(data, tmp_path, spec, config), source, Hooks()).run()
    c = Trainer(plan(data, tmp_path, spec, {**config, "seed": 8}), source, Hooks()).run()
    assert a.losses == b.losses
    assert a.metrics == b.metrics
    assert a.losses != c.losses


def test_two_process_ddp_follows_the_one_process_curve(digits_source, tmp_path):
    source, data = digits_source
    single = Trainer(
        plan(data, tmp_path, MLP, {"epochs": 2, "batch_size": 64, "seed": 1}), source, Hooks()
    ).run()
    double = run_distributed(
        plan(data, tmp_path, MLP, {"epochs": 2, "batch_size": 32, "seed": 1}),
        source,
        Hooks(),
        world=2,
    )
    assert len(double.losses) == len(single.losses) == 2 * 10
    np.testing.assert_allclose(double.losses, single.losses, rtol=1e-5, atol=1e-6)
    assert double.metrics["valid_accuracy"] == pytest.approx(single.metrics["valid_accuracy"])


def test_resume_from_a_checkpoint_gives_the_uninterrupted_run(digits_source, tmp_path):
    source, data = digits_source
    spec = {"mlp": {"hidden_sizes": [32], "dropout": 0.3}}
    config = {
        "epochs": 3,
        "batch_size": 32,
        "seed": 2,
        "checkpoint_interval_steps": 7,
        "schedule": {"type": "cosine", "warmup_steps": 5},
    }
    hooks = Hooks()
    full = Trainer(plan(data, tmp_path, spec, config), source, hooks).run()
    step, blob = hooks.checkpoints[3]
    saved = tmp_path / "resume.pt"
    saved.write_bytes(blob)
    resumed = Trainer(
        plan(data, tmp_path, spec, config, resume_from=str(saved)), source, Hooks()
    ).run()
    assert resumed.losses == full.losses
    assert resumed.metrics == full.metrics
    assert step == 28


def test_max_steps_expresses_the_classic_10000_sgd_iterations():
    config = message_from_dict(
        {"max_steps": 10000, "optimizer": {"type": "sgd"}}, tpb.TrainingConfig()
    )
    assert config.max_steps == 10000
    assert config.epochs == 0


def test_early_stopping_restores_the_best(digits_source, tmp_path):
    source, data = digits_source
    config = {
        "epochs": 40,
        "batch_size": 64,
        "seed": 0,
        "optimizer": {"learning_rate": 0.05},
        "early_stopping": {"metric": "valid_loss", "patience": 2, "restore_best": True},
    }
    hooks = Hooks()
    result = Trainer(plan(data, tmp_path, MLP, config), source, hooks).run()
    assert result.stopped_early
    assert result.epochs < 40
    assert any("restored the weights" in line for line in hooks.lines)


def test_bf16_autocast_and_step_schedule_run(digits_source, tmp_path):
    source, data = digits_source
    config = {
        "max_steps": 12,
        "batch_size": 32,
        "precision": "bf16_mixed",
        "gradient_clip_norm": 1.0,
        "schedule": {"type": "step", "step_size": 5, "gamma": 0.5},
        "optimizer": {"type": "adamw", "weight_decay": 0.01},
    }
    result = Trainer(plan(data, tmp_path, MLP, config, export=True), source, Hooks()).run()
    assert result.steps == 12
    assert result.onnx_max_abs_diff < 1e-4
    factor = lr_factor(message_from_dict(config, tpb.TrainingConfig()), 12)
    assert [factor(s) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]


def test_unknown_early_stopping_metric_fails(digits_source, tmp_path):
    source, data = digits_source
    config = {"epochs": 1, "early_stopping": {"metric": "valid_f7"}}
    with pytest.raises(TrainingFailed, match="valid_f7"):
        Trainer(plan(data, tmp_path, MLP, config), source, Hooks()).run()
