"""ONNX export of a built network, checked with onnxruntime against torch.

    result = export_onnx(built.module, built.signature, path, sample=inputs)
    result.max_abs_diff  # largest |onnxruntime - torch| over the sample

The graph has the signature's input and output names, a dynamic batch axis,
and opset 17. It is written with torch's TorchScript-based exporter
(``dynamo=False``): it needs no extra package (the dynamo exporter needs
onnxscript) and exports every network of the catalogue in well under a
second. The check runs the exported file in onnxruntime on ``sample`` (or
random inputs of the signature) and fails when outputs differ beyond
``atol + rtol * |torch|``.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimass.core.errors import AimassError
from aimass.core.nn.signature import ModelSignature

OPSET = 17
# torch's exporter keeps global state: one export at a time per process.
_EXPORT_LOCK = threading.Lock()


class OnnxCheckError(AimassError):
    """The exported graph does not reproduce the torch outputs (or does not load)."""


@dataclass(frozen=True)
class OnnxExport:
    """Where the graph went and how closely onnxruntime matched torch on the sample."""

    path: Path
    opset: int
    max_abs_diff: float
    sample_rows: int


def random_inputs(
    signature: ModelSignature, rows: int = 8, seed: int = 0, high: int = 2
) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped like the signature: normal floats, ids in [0, high)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in signature.inputs:
        shape = [rows if d == -1 else d for d in spec.shape]
        if spec.datatype == "INT64":
            tensors.append(torch.randint(0, high, shape, generator=generator))
        else:
            tensors.append(torch.randn(shape, generator=generator))
    return tuple(tensors)


def _dynamic_axes(signature: ModelSignature) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in (*signature.inputs, *signature.outputs):
        dynamic = {i: "batch" if i == 0 else f"{spec.name}_{i}" for i, d in enumerate(spec.shape)}
        axes[spec.name] = {i: name for i, name in dynamic.items() if spec.shape[i] == -1}
    return axes


def export_onnx(
    module: nn.Module,
    signature: ModelSignature,
    path: str | Path,
    *,
    sample: Sequence[torch.Tensor] | None = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> OnnxExport:
    """Writes ``module`` as ONNX to ``path`` (eval mode, CPU) and checks it in onnxruntime.

    Raises OnnxCheckError when the check fails; the file is then removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(sample) if sample is not None else random_inputs(signature)
    was_training = module.training
    module.eval()
    try:
        with _EXPORT_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=False,
                input_names=signature.input_names,
                output_names=signature.output_names,
                dynamic_axes=_dynamic_axes(signature),
                opset_version=OPSET,
            )
        if not check:
            return OnnxExport(path, OPSET, float("nan"), 0)
        with torch.no_grad():
            expected = module(*inputs).detach().float().numpy()
    finally:
        module.train(was_training)
    try:
        diff = _check(path, signature, inputs, expected, atol, rtol)
    except OnnxCheckError:
        path.unlink(missing_ok=True)
        raise
    return OnnxExport(path, OPSET, diff, int(inputs[0].shape[0]))


def onnx_session(path: str | Path, threads: int = 1) -> object:
    """An onnxruntime InferenceSession on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check(
    path: Path,
    signature: ModelSignature,
    inputs: Sequence[torch.Tensor],
    expected: np.ndarray,
    atol: float,
    rtol: float,
) -> float:
    try:
        session = onnx_session(path)
        feeds = {
            spec.name: tensor.numpy() for spec, tensor in zip(signature.inputs, inputs, strict=True)
        }
        (got,) = session.run(signature.output_names, feeds)  # type: ignore[attr-defined]
    except Exception as err:
        raise OnnxCheckError(f"onnxruntime cannot run the exported graph: {err}") from err
    if got.shape != expected.shape:
        raise OnnxCheckError(f"onnxruntime output shape {got.shape} != torch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not np.allclose(got, expected, atol=atol, rtol=rtol):
        raise OnnxCheckError(
            f"onnxruntime differs from torch by up to {diff:.3g} (atol {atol}, rtol {rtol})"
        )
    return diff
