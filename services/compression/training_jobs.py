"""Fine-tuning and distillation steps as training jobs on the training workers.

:class:`RemoteTraining` is the runner's :data:`aimass.compression.recipe.Train`: the
recipe thread hands it a :class:`~aimass.compression.recipe.TrainRequest`, it creates a
training job through the training service's gRPC API and follows it to its end:

- fine-tune: ``model`` is the network's (possibly smaller, pruned) spec and
  ``init_from.state_dict_uri`` its current weights, put in the artifact store first;
  ``keep_zero_weights`` when unstructured pruning left masks;
- distill: ``model`` is the student's spec and ``distillation`` names the teacher, the
  registered parent (``teacher_model_version``) or the chain's current ONNX file
  (``teacher_onnx_uri``), with the teacher's parameter count so the training service
  refuses a student that is not smaller.

No target model: the job registers nothing; its ``output_artifacts`` hold the trained
state dict, which is loaded back into the step's network. A compression job cancelled
meanwhile cancels the training job; a training job that fails or is cancelled fails the
step with the training job named. The request id is the compression job and step, so a
redelivered compression job follows the training job its first attempt created.

:func:`train_in_process` runs the same training loop (:class:`aimass.training.trainer.
Trainer`, same warm start and loss) in this process, for benchmarks without a stack.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import torch

from aimass.common.v1 import common_pb2
from aimass.compression import recipe as rc
from aimass.compression import structural as sx
from aimass.core.artifacts import ArtifactStore
from aimass.core.errors import FailedPrecondition
from aimass.training.trainer import Trainer, TrainPlan
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc

POLL_S = 0.5
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED}  # fmt: skip


class TrainingStepFailed(Exception):
    """The training job of a step did not succeed; the message names it."""


def training_config(request: rc.TrainRequest) -> tpb.TrainingConfig:
    return tpb.TrainingConfig(
        epochs=request.epochs, batch_size=request.batch_size, seed=0,
        optimizer=tpb.Optimizer(type=tpb.OPTIMIZER_TYPE_ADAM, learning_rate=request.learning_rate),
    )  # fmt: skip


def training_job(
    request: rc.TrainRequest, dataset_version: str, init_uri: str, teacher_uri: str, owner: str
) -> tpb.TrainingJob:
    """The training job of a step (no target model: the compression job registers)."""
    assert request.model.spec is not None
    job = tpb.TrainingJob(
        description=f"{request.kind.replace('_', '-')} of {owner}, step {request.step_index + 1}",
        labels={"compression_job": owner.removeprefix("compressionJobs/")[:63],
                "compression_step": str(request.step_index + 1)},
        model=request.model.spec, training=training_config(request),
        dataset_version=dataset_version,
    )  # fmt: skip
    if request.kind == "fine_tune":
        job.init_from.state_dict_uri = init_uri
        job.init_from.keep_zero_weights = bool(request.model.masks)
    else:
        distillation = job.distillation
        if request.teacher_version:
            distillation.teacher_model_version = request.teacher_version
        else:
            distillation.teacher_onnx_uri = teacher_uri
        distillation.temperature = request.temperature
        distillation.alpha = request.alpha
        distillation.teacher_parameter_count = request.teacher_parameters
    return job


def _trained(request: rc.TrainRequest, state_path: Path) -> sx.TorchModel:
    """The step's network with the trained weights (masks kept)."""
    result = request.model.copy()
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    result.module.load_state_dict(state)
    result.module.eval()
    return result


class RemoteTraining:
    """Runs the steps' training jobs on the training service, for one compression job."""

    def __init__(
        self, channel: grpc.aio.Channel, artifacts: ArtifactStore, owner: str,
        default_dataset: str, work: Path, loop: asyncio.AbstractEventLoop, project: str = "",
    ) -> None:  # fmt: skip
        self.project = project  # the compression job's: its training jobs belong there too
        self.stub = training_pb2_grpc.TrainingServiceStub(channel)
        self.artifacts, self.owner, self.default_dataset = artifacts, owner, default_dataset
        self.work, self.loop = work, loop

    def __call__(self, request: rc.TrainRequest, cancelled: Callable[[], bool]) -> rc.Trained:
        """Called from the recipe thread: runs :meth:`train` on the event loop and waits."""
        return asyncio.run_coroutine_threadsafe(self.train(request, cancelled), self.loop).result()

    async def train(self, request: rc.TrainRequest, cancelled: Callable[[], bool]) -> rc.Trained:
        init_uri = teacher_uri = ""
        if request.kind == "fine_tune":
            init_uri = await self._put_state(request)
        elif not request.teacher_version:
            assert request.teacher_onnx is not None
            teacher_uri = (await self.artifacts.put_file(request.teacher_onnx)).uri
        dataset = request.dataset_version or self.default_dataset
        job = training_job(request, dataset, init_uri, teacher_uri, self.owner)
        job.project = self.project
        created = await self._call(
            "CreateTrainingJob",
            self.stub.CreateTrainingJob(tpb.CreateTrainingJobRequest(
                training_job=job,
                request_id=f"{self.owner.removeprefix('compressionJobs/')}-{request.step_index}",
            )),
        )  # fmt: skip
        done = await self._follow(created.name, cancelled)
        return rc.Trained(await self._load(request, done), done.name)

    async def _put_state(self, request: rc.TrainRequest) -> str:
        path = self.work / f"step-{request.step_index}-init.pt"
        await asyncio.to_thread(torch.save, request.model.module.state_dict(), path)
        return (await self.artifacts.put_file(path)).uri

    async def _follow(self, name: str, cancelled: Callable[[], bool]) -> tpb.TrainingJob:
        """Polls the job until it ends; cancels it when the compression job is cancelled."""
        cancel_sent = False
        while True:
            job = await self._call(
                "GetTrainingJob", self.stub.GetTrainingJob(tpb.GetTrainingJobRequest(name=name))
            )
            state = job.status.state
            if state == common_pb2.JOB_STATE_SUCCEEDED:
                return job
            if state in TERMINAL:
                word = common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
                raise TrainingStepFailed(
                    f"training job {name} {word}: {job.status.reason or 'no reason given'}"
                )
            if not cancel_sent and await asyncio.to_thread(cancelled):
                await self._call(
                    "CancelTrainingJob",
                    self.stub.CancelTrainingJob(tpb.CancelTrainingJobRequest(name=name)),
                )
                cancel_sent = True
            await asyncio.sleep(POLL_S)

    async def _load(self, request: rc.TrainRequest, job: tpb.TrainingJob) -> sx.TorchModel:
        stored = next((a for a in job.output_artifacts if a.kind == "state_dict"), None)
        if stored is None:
            raise TrainingStepFailed(f"training job {job.name} succeeded without a state dict")
        path = self.work / f"step-{request.step_index}-trained.pt"
        await self.artifacts.get_file(stored.uri, path)
        return await asyncio.to_thread(_trained, request, path)

    @staticmethod
    async def _call(method: str, call: Any) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise FailedPrecondition(
                f"training service {method}: {err.code().name}: {err.details()}"
            ) from err


# ------------------------------------------------------------------- in process


class _Tables:
    def __init__(self, tables: dict[str, pa.Table]) -> None:
        self.tables = tables

    def read(self, split: str) -> pa.Table:
        return self.tables.get(split, self.tables["train"].slice(0, 0))


class _Silent:
    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None:
        return None

    def log(self, message: str) -> None:
        return None

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def train_in_process(tables: dict[str, pa.Table]) -> rc.Train:
    """A :data:`~aimass.compression.recipe.Train` running the training loop here (benchmarks)."""

    def train(request: rc.TrainRequest, cancelled: Callable[[], bool]) -> rc.Trained:
        assert request.model.spec is not None
        with tempfile.TemporaryDirectory(prefix="aimass-train-") as tmp:
            work = Path(tmp)
            init = teacher = ""
            if request.kind == "fine_tune":
                init = str(work / "init.pt")
                torch.save(request.model.module.state_dict(), init)
            else:
                assert request.teacher_onnx is not None
                teacher = str(request.teacher_onnx)
            plan = TrainPlan(
                job="in-process", spec=request.model.spec.SerializeToString(),
                config=training_config(request).SerializeToString(),
                data_signature=request.model.data.to_dict(), work_dir=tmp, threads=0,
                init_state=init, keep_zero_weights=bool(request.model.masks),
                teacher_onnx=teacher, temperature=request.temperature, alpha=request.alpha,
            )  # fmt: skip
            result = Trainer(plan, _Tables(tables), _Silent()).run()
            return rc.Trained(_trained(request, Path(result.state_dict_path)), "")

    return train


__all__ = ["RemoteTraining", "TrainingStepFailed", "train_in_process"]
