"""Fine-tuning and distillation steps run as training jobs on a training worker: the job is
visible in the training service (its spec, initial state or teacher, its worker), the recipe
goes on with what it trained, and cancel and failure travel between the two jobs."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.protodict import message_from_dict
from aimass.registry.v1 import registry_pb2
from aimass.training.v1 import training_pb2 as tpb
from tests.compression.conftest import MLP, TrainingEnv, digits


def training_job_of(report: pb.StepReport) -> str:
    return report.params["training_job"]


async def test_prune_then_fine_tune_on_a_training_worker_then_int8(
    train_env: TrainingEnv, tmp_path
) -> None:
    dataset = await digits(train_env)
    parent = await train_env.train_and_register("digits-mlp", dataset, MLP, epochs=8, tmp=tmp_path)
    recipe = pb.Recipe(
        steps=[
            pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=0.5)),
            pb.CompressionStep(fine_tune=pb.FineTune(epochs=2, learning_rate=1e-3)),
            pb.CompressionStep(quantize_static=pb.QuantizeStatic(calibration_rows=256)),
        ],
        accuracy_budget=pb.AccuracyBudget(metric="accuracy", max_drop=0.05),
    )
    job = await train_env.run_job(parent.name, recipe)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    pruned, tuned, int8 = job.step_reports
    assert tuned.status == pb.STEP_STATUS_APPLIED, tuned.reason
    assert int8.status == pb.STEP_STATUS_APPLIED, int8.reason
    # Fine-tuning recovered what pruning lost, and INT8 quantized the fine-tuned network.
    assert tuned.metrics_after[0].value > pruned.metrics_after[0].value
    assert job.chosen_step == "int8-static"

    training = await train_env.training_job(training_job_of(tuned))
    assert training.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert list(training.model.mlp.hidden_sizes) == [64, 32]  # the pruned spec
    assert training.init_from.state_dict_uri  # the pruned weights, not a fresh network
    assert not training.init_from.keep_zero_weights
    assert training.dataset_version == dataset
    assert training.training.epochs == 2
    assert training.labels["compression_job"] == job.name.removeprefix("compressionJobs/")
    assert not training.target_model  # nothing registered
    assert not training.model_version
    assert {a.kind for a in training.output_artifacts} == {"onnx", "state_dict"}
    logs = await train_env.training_logs(training.name)
    assert any("on worker compression-w1" in line for line in logs), logs
    assert any("initial state" in line for line in logs), logs

    child = await train_env.registry.GetModelVersion(
        registry_pb2.GetModelVersionRequest(name=job.model_version)
    )
    assert list(child.config.values["model"]["mlp"]["hidden_sizes"]) == [64, 32]
    assert child.source.parent_version == parent.name


async def test_distillation_student_is_a_training_job(train_env: TrainingEnv, tmp_path) -> None:
    dataset = await digits(train_env)
    parent = await train_env.train_and_register("digits-mlp", dataset, MLP, epochs=8, tmp=tmp_path)
    recipe = pb.Recipe(
        steps=[pb.CompressionStep(distill=pb.Distill(scale_factor=0.25, epochs=15,
                                                     learning_rate=3e-3, temperature=3))],
        accuracy_budget=pb.AccuracyBudget(metric="accuracy", max_drop=0.05),
    )  # fmt: skip
    job = await train_env.run_job(parent.name, recipe)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    (report,) = job.step_reports
    assert report.status == pb.STEP_STATUS_APPLIED, report.reason
    assert report.params["student_parameters"] <= 0.25 * report.params["teacher_parameters"]
    training = await train_env.training_job(training_job_of(report))
    assert training.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert training.distillation.teacher_model_version == parent.name
    assert training.distillation.temperature == 3
    assert training.distillation.alpha == 0.5
    assert training.distillation.teacher_parameter_count == report.params["teacher_parameters"]
    assert list(training.model.mlp.hidden_sizes) == [32, 16]
    assert not training.HasField("init_from")  # a student starts fresh
    assert job.model_version


async def test_a_student_not_smaller_than_its_teacher_is_refused(
    train_env: TrainingEnv, tmp_path
) -> None:
    dataset = await digits(train_env)
    parent = await train_env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)
    job = tpb.TrainingJob(dataset_version=dataset)
    message_from_dict({"mlp": {"hidden_sizes": [256, 256]}}, job.model)
    message_from_dict({"epochs": 1}, job.training)
    job.distillation.teacher_model_version = parent.name
    # With the teacher's size given, the training service refuses at creation...
    job.distillation.teacher_parameter_count = 10_000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await train_env.training.CreateTrainingJob(tpb.CreateTrainingJobRequest(training_job=job))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_job.model" in refused.value.details()
    assert "smaller than its teacher" in refused.value.details()
    # ... without it, the worker compares with the teacher's ONNX weights and fails the job.
    job.distillation.teacher_parameter_count = 0
    created = await train_env.training.CreateTrainingJob(
        tpb.CreateTrainingJobRequest(training_job=job)
    )
    done = await wait_training(train_env, created.name)
    assert done.status.state == common_pb2.JOB_STATE_FAILED
    assert "not fewer than the teacher's" in done.status.reason, done.status.reason


async def wait_training(env: TrainingEnv, name: str) -> tpb.TrainingJob:
    for _ in range(600):
        job = await env.training_job(name)
        if job.status.state in (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
                                common_pb2.JOB_STATE_CANCELLED):  # fmt: skip
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} did not end")


async def test_a_failed_training_job_fails_the_step_and_names_it(
    train_env: TrainingEnv, tmp_path
) -> None:
    dataset = await digits(train_env)
    parent = await train_env.train_and_register("digits-mlp", dataset, MLP, epochs=2, tmp=tmp_path)
    # A learning rate this large overflows the weights: the training job fails (loss not finite).
    overflow = pb.FineTune(epochs=3, learning_rate=1e30)
    recipe = pb.Recipe(steps=[pb.CompressionStep(fine_tune=overflow)])
    job = await train_env.run_job(parent.name, recipe)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    (report,) = job.step_reports
    assert report.status == pb.STEP_STATUS_FAILED
    assert report.reason.startswith("TrainingStepFailed: training job trainingJobs/"), report.reason
    assert " FAILED: loss is " in report.reason
    assert job.model_version == ""


async def test_cancelling_the_compression_job_cancels_its_training_job(
    train_env: TrainingEnv, tmp_path
) -> None:
    dataset = await digits(train_env)
    parent = await train_env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)
    recipe = pb.Recipe(steps=[pb.CompressionStep(fine_tune=pb.FineTune(epochs=1000))])
    job = await train_env.compression.CreateCompressionJob(
        pb.CreateCompressionJobRequest(
            compression_job=pb.CompressionJob(parent_version=parent.name, recipe=recipe)
        )
    )
    label = job.name.removeprefix("compressionJobs/")
    running = None
    for _ in range(600):
        listed = await train_env.training.ListTrainingJobs(
            tpb.ListTrainingJobsRequest(filter=f'labels.compression_job = "{label}"')
        )
        running = next((j for j in listed.training_jobs
                        if j.status.state == common_pb2.JOB_STATE_RUNNING), None)  # fmt: skip
        if running is not None:
            break
        await asyncio.sleep(0.2)
    assert running is not None, "the fine-tune never ran as a training job"
    await train_env.compression.CancelCompressionJob(pb.CancelCompressionJobRequest(name=job.name))
    done = await train_env.wait(job.name)
    assert done.status.state == common_pb2.JOB_STATE_CANCELLED, done.status.reason
    training = await wait_training(train_env, running.name)
    assert training.status.state == common_pb2.JOB_STATE_CANCELLED
