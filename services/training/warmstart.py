"""A training job that does not start from scratch: initial weights and a distillation teacher.

- ``init_from``: the job's network (``model``, possibly the smaller spec of a pruned
  network) is loaded with a state dict; with ``keep_zero_weights`` the weights that are
  exactly zero stay zero after every optimizer step (the masks of unstructured pruning).
- ``distillation``: a teacher's ONNX file, run once over the train split with ONNX
  Runtime, gives the soft targets; the loss of a step is ``alpha`` * the soft-target loss
  (KL divergence at a temperature, times T^2, for classifiers; squared error to the
  teacher's output otherwise) + (1 - ``alpha``) * the label loss.

The compression service fine-tunes pruned networks and distills students through these
(:mod:`aimass.compression.training_jobs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import onnx
import torch

from aimass.core import nn as ann
from aimass.core.errors import FailedPrecondition, Unavailable
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.training.v1 import training_pb2 as tpb

if TYPE_CHECKING:  # the training loop imports this module; it needs no artifact store (S3)
    from aimass.core.artifacts import ArtifactStore

Masks = dict[str, torch.Tensor]
TEACHER_BATCH = 1024


class WarmStartFailed(Exception):
    """The initial state or the teacher does not fit the job; the message names the field."""


def load_initial_state(module: torch.nn.Module, path: Path, keep_zero_weights: bool) -> Masks:
    """Loads the state dict at ``path`` into ``module``; the masks to keep (may be empty)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise WarmStartFailed(
            "training_job.init_from: the state dict does not fit training_job.model "
            f"(a pruned network needs its smaller spec): {' '.join(first[:3])}"
        ) from err
    if not keep_zero_weights:
        return {}
    return {
        name: (p.detach() != 0)
        for name, p in module.named_parameters()
        if p.dim() > 1 and bool((p.detach() == 0).any())
    }


def apply_masks(module: torch.nn.Module, masks: Masks) -> None:
    if not masks:
        return
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            mask = masks.get(name)
            if mask is not None:
                parameter.mul_(mask.to(parameter.device))


def onnx_parameter_count(path: Path) -> int:
    """Elements of the float initializers of an ONNX file (the teacher's weights)."""
    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)


def soft_targets(path: Path, inputs: tuple[torch.Tensor, ...], outputs: int) -> torch.Tensor:
    """The teacher's outputs over every row of ``inputs`` (float32, rows x outputs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds_meta = session.get_inputs()
    if len(feeds_meta) != len(inputs):
        raise WarmStartFailed(
            f"training_job.distillation: the teacher takes {len(feeds_meta)} inputs, "
            f"the dataset gives {len(inputs)}"
        )
    rows = int(inputs[0].shape[0])
    chunks = []
    for start in range(0, rows, TEACHER_BATCH):
        feeds = {}
        for meta, tensor in zip(feeds_meta, inputs, strict=True):
            array = tensor[start : start + TEACHER_BATCH].cpu().numpy()
            feeds[meta.name] = array.astype(np.int64 if "int64" in meta.type else np.float32)
        chunks.append(np.asarray(session.run(None, feeds)[0], dtype=np.float32))
    result = torch.from_numpy(np.concatenate(chunks)).reshape(rows, -1)
    if result.shape[1] != outputs:
        raise WarmStartFailed(
            f"training_job.distillation: the teacher has {result.shape[1]} outputs, "
            f"the student {outputs}"
        )
    return result


def distillation_loss_sum(
    outputs: torch.Tensor,
    teacher: torch.Tensor,
    label_loss_sum: torch.Tensor,
    signature: ann.ModelSignature,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * soft-target loss + (1 - alpha) * label loss, both summed over the rows."""
    if signature.loss == "cross_entropy":
        soft = torch.nn.functional.kl_div(
            torch.nn.functional.log_softmax(outputs / temperature, dim=1),
            torch.nn.functional.softmax(teacher / temperature, dim=1),
            reduction="sum",
        ) * (temperature**2)
    else:  # one logit or a regression value: match the teacher's output
        soft = torch.nn.functional.mse_loss(outputs, teacher, reduction="sum")
    return alpha * soft + (1 - alpha) * label_loss_sum


async def fetch_files(
    job: tpb.TrainingJob, work_dir: Path, artifacts: ArtifactStore, registry: grpc.aio.Channel
) -> dict[str, Any]:
    """The TrainPlan fields of the job's warm start, its files downloaded into ``work_dir``."""
    fields: dict[str, Any] = {}
    if job.HasField("init_from"):
        init = job.init_from
        path = work_dir / "init_state.pt"
        if init.WhichOneof("source") == "model_version":
            await _download_version(registry, init.model_version, "state_dict", path)
        else:
            await artifacts.get_file(init.state_dict_uri, path)
        fields.update(init_state=str(path), keep_zero_weights=init.keep_zero_weights)
    if job.HasField("distillation"):
        distillation = job.distillation
        path = work_dir / "teacher.onnx"
        if distillation.WhichOneof("teacher") == "teacher_model_version":
            await _download_version(registry, distillation.teacher_model_version, "onnx", path)
        else:
            await artifacts.get_file(distillation.teacher_onnx_uri, path)
        fields.update(
            teacher_onnx=str(path),
            temperature=distillation.temperature or 4.0,
            alpha=distillation.alpha or 0.5,
        )
    return fields


async def _download_version(channel: grpc.aio.Channel, name: str, kind: str, path: Path) -> None:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    request = registry_pb2.DownloadArtifactRequest(name=name, kind=kind)
    try:
        with path.open("wb") as handle:
            async for chunk in stub.DownloadArtifact(request):
                handle.write(chunk.data)
    except grpc.aio.AioRpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(f"registry DownloadArtifact: {err.details()}") from err
        raise FailedPrecondition(
            f"training_job: the {kind} artifact of {name} cannot be read: {err.details()}"
        ) from err
