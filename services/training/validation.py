"""Checks of a CreateTrainingJob request: every problem an error that names the field.

The dataset version must exist and be READY (asked of the data service), the
config's numbers must be in range, and the model spec must build against the
dataset's schema (a catalogue spec is built here once, on a zero batch; user
code is imported only by the workers, where its errors land in the job's logs).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from aimass.core import nn as ann
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb

JOB = "training_job"
MAX_PROCESSES = 64
MAX_HOSTS = 64


def _at_least(value: float, low: float, field: str) -> None:
    if value < low:
        raise InvalidArgument(f"{JOB}.{field}", f"must be >= {low}, got {value}")


def check_config(config: tpb.TrainingConfig) -> None:
    """The training config's fields, each in range."""
    opt = config.optimizer
    if opt.type not in tpb.OptimizerType.values():
        raise InvalidArgument(
            f"{JOB}.training.optimizer.type",
            f"unknown optimizer {opt.type}; use sgd, adam or adamw",
        )
    _at_least(opt.learning_rate, 0, "training.optimizer.learning_rate")
    _at_least(opt.weight_decay, 0, "training.optimizer.weight_decay")
    if not 0 <= opt.momentum < 1:
        raise InvalidArgument(f"{JOB}.training.optimizer.momentum", "must be in [0, 1)")
    for beta in ("beta1", "beta2"):
        if not 0 <= getattr(opt, beta) < 1:
            raise InvalidArgument(f"{JOB}.training.optimizer.{beta}", "must be in [0, 1)")
    if config.schedule.type not in tpb.ScheduleType.values():
        raise InvalidArgument(f"{JOB}.training.schedule.type", "unknown schedule")
    _at_least(config.schedule.warmup_steps, 0, "training.schedule.warmup_steps")
    _at_least(config.schedule.step_size, 0, "training.schedule.step_size")
    if not 0 <= config.schedule.gamma <= 1:
        raise InvalidArgument(f"{JOB}.training.schedule.gamma", "must be in (0, 1]")
    _at_least(config.epochs, 0, "training.epochs")
    _at_least(config.max_steps, 0, "training.max_steps")
    if config.epochs == 0 and config.max_steps == 0:
        raise InvalidArgument(f"{JOB}.training.epochs", "set epochs or max_steps (or both)")
    _at_least(config.batch_size, 0, "training.batch_size")
    _at_least(config.gradient_clip_norm, 0, "training.gradient_clip_norm")
    _at_least(config.checkpoint_interval_steps, 0, "training.checkpoint_interval_steps")
    _at_least(config.keep_checkpoints, 0, "training.keep_checkpoints")
    _at_least(config.early_stopping.patience, 0, "training.early_stopping.patience")
    if config.precision not in tpb.Precision.values():
        raise InvalidArgument(f"{JOB}.training.precision", "unknown precision")


def check_job_fields(job: tpb.TrainingJob) -> None:
    if not job.dataset_version:
        raise InvalidArgument(f"{JOB}.dataset_version", "is required")
    parts = job.dataset_version.split("/")
    if len(parts) != 4 or parts[0] != "datasets" or parts[2] != "versions":
        raise InvalidArgument(
            f"{JOB}.dataset_version",
            f"must look like 'datasets/{{dataset}}/versions/{{version}}', got "
            f"{job.dataset_version!r}",
        )
    if job.target_model and (
        not job.target_model.startswith("models/") or job.target_model.count("/") != 1
    ):
        raise InvalidArgument(f"{JOB}.target_model", "must look like 'models/{model}'")
    if not -100 <= job.priority <= 100:
        raise InvalidArgument(f"{JOB}.priority", "must be in [-100, 100]")
    processes, hosts = job.resources.processes, job.resources.hosts
    if not 0 <= processes <= MAX_PROCESSES:
        raise InvalidArgument(f"{JOB}.resources.processes", f"must be in [0, {MAX_PROCESSES}]")
    if not 0 <= hosts <= MAX_HOSTS:
        raise InvalidArgument(f"{JOB}.resources.hosts", f"must be in [0, {MAX_HOSTS}]")
    if not ann.architecture_of(job.model):
        raise InvalidArgument(
            f"{JOB}.model", f"set one architecture: {', '.join(ann.ARCHITECTURES)}"
        )
    check_config(job.training)
    check_warm_start(job)


def _version_name(value: str, field: str) -> None:
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions":
        raise InvalidArgument(
            f"{JOB}.{field}",
            f"must look like 'models/{{model}}/versions/{{version}}', got {value!r}",
        )


def check_warm_start(job: tpb.TrainingJob) -> None:
    """init_from and distillation: a source each, numbers in range."""
    if job.HasField("init_from"):
        source = job.init_from.WhichOneof("source")
        if source is None:
            raise InvalidArgument(f"{JOB}.init_from", "set model_version or state_dict_uri")
        if source == "model_version":
            _version_name(job.init_from.model_version, "init_from.model_version")
    if job.HasField("distillation"):
        distillation = job.distillation
        teacher = distillation.WhichOneof("teacher")
        if teacher is None:
            raise InvalidArgument(
                f"{JOB}.distillation", "set teacher_model_version or teacher_onnx_uri"
            )
        if teacher == "teacher_model_version":
            _version_name(distillation.teacher_model_version, "distillation.teacher_model_version")
        if distillation.temperature < 0:
            raise InvalidArgument(f"{JOB}.distillation.temperature", "must be > 0 (0: 4)")
        if not 0 <= distillation.alpha <= 1:
            raise InvalidArgument(f"{JOB}.distillation.alpha", "must be in [0, 1]")
        _at_least(distillation.teacher_parameter_count, 0, "distillation.teacher_parameter_count")


async def fetch_dataset_version(channel: grpc.aio.Channel, name: str) -> Any:
    """The READY dataset version ``name`` from the data service."""
    stub = data_pb2_grpc.DataServiceStub(channel)
    try:
        version = await stub.GetDatasetVersion(data_pb2.GetDatasetVersionRequest(name=name))
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(f"{JOB}.dataset_version: {name} does not exist") from err
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidArgument(f"{JOB}.dataset_version", err.details() or "invalid") from err
        raise Unavailable(f"data service: {err.details()}") from err
    if version.state != data_pb2.DATASET_VERSION_STATE_READY:
        state = data_pb2.DatasetVersionState.Name(version.state).removeprefix(
            "DATASET_VERSION_STATE_"
        )
        raise FailedPrecondition(f"{JOB}.dataset_version: {name} is {state}, not READY")
    return version


def _prefixed(err: InvalidArgument) -> InvalidArgument:
    violation = err.violations[0]
    field = violation.field
    if not field.startswith(JOB):
        field = f"{JOB}.{field}"
    return InvalidArgument(field, violation.description)


async def check_spec(job: tpb.TrainingJob, version: Any) -> ann.DataSignature:
    """Builds the network once against the dataset (not for user code); the DataSignature."""
    data = ann.data_signature_from_version(version)
    if ann.architecture_of(job.model) == "user_code":
        if ":" not in job.model.user_code.factory:
            raise InvalidArgument(
                f"{JOB}.model.user_code.factory", "must look like 'package.module:factory'"
            )
        return data
    try:
        built = await asyncio.to_thread(ann.build_model, job.model, data)
    except InvalidArgument as err:
        raise _prefixed(err) from err
    teacher = job.distillation.teacher_parameter_count
    if teacher and built.parameter_count >= teacher:
        raise InvalidArgument(
            f"{JOB}.model",
            f"a distillation student must be smaller than its teacher: it has "
            f"{built.parameter_count} parameters, the teacher {teacher}",
        )
    return data
