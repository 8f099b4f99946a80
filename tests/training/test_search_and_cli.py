"""Hyperparameter search as child jobs (best trial registered), and the CLI: `aimass train`
follows a job to its end, `aimass jobs list/show/logs/cancel`."""

from __future__ import annotations

import asyncio

import yaml
from typer.testing import CliRunner

from aimass.cli.main import app
from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2
from aimass.training.v1 import training_pb2 as tpb


async def test_grid_search_runs_trials_and_registers_the_best(training_stack):
    ts = training_stack
    job = ts.job(
        {"mlp": {"hidden_sizes": [16]}},
        {"epochs": 2, "batch_size": 64, "seed": 0},
        target_model="models/searched",
    )
    search = {
        "objective_metric": "valid_accuracy",
        "parameters": [
            {"path": "training.optimizer.learning_rate", "values": [0.00001, 0.01]},
            {"path": "model.mlp.hidden_sizes", "values": [[8], [32]]},
        ],
    }
    from aimass.core.protodict import message_from_dict

    message_from_dict(search, job.hyperparameter_search)
    parent = await ts.create(job)
    assert parent.status.state == common_pb2.JOB_STATE_RUNNING
    trials = await ts.training.ListTrainingJobs(
        tpb.ListTrainingJobsRequest(filter=f'parent_job = "{parent.name}"')
    )
    assert len(trials.training_jobs) == 4
    assert {t.parent_job for t in trials.training_jobs} == {parent.name}
    async with ts.worker(), ts.worker():
        done = await ts.wait(parent.name, timeout_s=180)
    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
    finished = await ts.training.ListTrainingJobs(
        tpb.ListTrainingJobsRequest(filter=f'parent_job = "{parent.name}"')
    )
    states = {t.name: (t.status.state, t.status.reason) for t in finished.training_jobs}
    assert all(s == common_pb2.JOB_STATE_SUCCEEDED for s, _ in states.values()), states
    scores = {
        t.name: {m.name: m.value for m in t.final_metrics}["valid_accuracy"]
        for t in finished.training_jobs
    }
    assert done.best_trial == max(scores, key=scores.get)
    best = next(t for t in finished.training_jobs if t.name == done.best_trial)
    assert best.trial_parameters["training.optimizer.learning_rate"] == 0.01
    versions = await ts.registry.ListModelVersions(
        registry_pb2.ListModelVersionsRequest(parent="models/searched")
    )
    assert len(versions.model_versions) == 1
    assert versions.model_versions[0].source.job == done.best_trial


async def test_cli_train_follows_the_job_and_jobs_commands(training_stack, tmp_path, monkeypatch):
    ts = training_stack
    address = ts.stack.address("training")
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset_version": ts.digits,
                "target_model": "models/cli",
                "model": {"mlp": {"hidden_sizes": [16]}},
                "training": {"optimizer": {"type": "adam", "learning_rate": 0.01}, "epochs": 2},
            }
        )
    )
    runner = CliRunner()
    async with ts.worker():
        result = await asyncio.to_thread(
            runner.invoke, app, ["train", str(config), "--address", address]
        )
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output
    assert "registered models/cli/versions/1" in result.output
    listed = await asyncio.to_thread(runner.invoke, app, ["jobs", "list", "--address", address])
    assert "SUCCEEDED" in listed.output
    name = (await ts.training.ListTrainingJobs(tpb.ListTrainingJobsRequest())).training_jobs[0].name
    shown = await asyncio.to_thread(
        runner.invoke, app, ["jobs", "show", name, "--address", address]
    )
    assert "models/cli/versions/1" in shown.output
    logs = await asyncio.to_thread(runner.invoke, app, ["jobs", "logs", name, "--address", address])
    assert "succeeded after" in logs.output
    cancelled = await asyncio.to_thread(
        runner.invoke, app, ["jobs", "cancel", name, "--address", address]
    )
    assert "SUCCEEDED" in cancelled.output


def test_cli_refuses_a_bad_config_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"training": {"optimizer": {"type": "adagrad"}}}))
    result = CliRunner().invoke(app, ["train", str(config), "--address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "training.optimizer.type" in result.output
