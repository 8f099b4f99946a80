"""Running a version's ONNX artifact on a split with ONNX Runtime, batched.

The same file that will be served is what is scored. Features are the
dataset's feature columns concatenated in order (fixed-size lists such as
images flattened), cast to the model input's element type and reshaped to its
static dimensions (an [n, 64] digits table feeds an [n, 1, 8, 8] CNN). Outputs
are read by task:

- classification: [n, C] logits or probabilities (rows already in [0, 1]
  summing to 1 are taken as they are, anything else goes through softmax),
  or [n] / [n, 1] for a binary model (a probability, or a logit through the
  sigmoid). C must cover every label of the split.
- regression and ranking: one value per row, [n] or [n, 1].

Anything else is refused with FailedPrecondition naming the shape and the task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa

from aimass.core.errors import FailedPrecondition
from aimass.core.splits import column_to_numpy
from aimass.evaluation import metrics as mt

ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def open_session(path: Path, provider: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on one provider; FailedPrecondition when it is not available."""
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise FailedPrecondition(
            f"provider {provider}: ONNX Runtime here has only {ort.get_available_providers()}"
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=[name])
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise FailedPrecondition(f"the onnx artifact cannot be loaded: {err}") from err


def feature_matrix(table: pa.Table, feature_columns: Sequence[str]) -> np.ndarray:
    """The features as one [n, d] float64 array, columns in order, lists flattened."""
    parts = [
        column_to_numpy(table.column(name)).reshape(table.num_rows, -1).astype(np.float64)
        for name in feature_columns
    ]
    if not parts:
        raise FailedPrecondition("the split has no feature column")
    return np.concatenate(parts, axis=1)


def model_input(session: ort.InferenceSession, features: np.ndarray) -> tuple[str, np.ndarray]:
    """Input name and the features cast and reshaped to the model's single input."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise FailedPrecondition(f"the model has {len(inputs)} inputs {names}: one is supported")
    spec = inputs[0]
    dtype = ONNX_TYPES.get(spec.type)
    if dtype is None:
        raise FailedPrecondition(f"model input {spec.name!r} has type {spec.type}, not numeric")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in spec.shape[1:]]
    array = features.astype(dtype)
    if fixed and all(d is not None for d in fixed):
        width = int(np.prod(fixed))
        if width != features.shape[1]:
            raise FailedPrecondition(
                f"model input {spec.name!r} takes {width} values per row "
                f"(shape {list(spec.shape)}), the split has {features.shape[1]} features"
            )
        array = array.reshape(features.shape[0], *fixed)
    return spec.name, array


def run_batched(
    session: ort.InferenceSession,
    features: np.ndarray,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The first output of the model over all rows, ``batch_size`` rows per call."""
    name, array = model_input(session, features)
    outputs = []
    for start in range(0, array.shape[0], batch_size):
        if cancelled is not None and cancelled():
            raise Cancelled
        outputs.append(np.asarray(session.run(None, {name: array[start : start + batch_size]})[0]))
        if progress is not None:
            progress(min(start + batch_size, array.shape[0]))
    if not outputs:
        raise FailedPrecondition("the split has no rows")
    return np.concatenate(outputs, axis=0).astype(np.float64)


class Cancelled(Exception):
    """Raised between batches when the evaluation was cancelled."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _is_probability(values: np.ndarray, axis_sums: bool) -> bool:
    if values.size == 0 or values.min() < 0 or values.max() > 1:
        return False
    return not axis_sums or bool(np.allclose(values.sum(axis=1), 1.0, atol=1e-4))


def class_probabilities(output: np.ndarray, n_labels: int) -> np.ndarray:
    """[n, C] probabilities from a classifier's output; refuses shapes that do not fit."""
    if (output.ndim == 2 and output.shape[1] == 1) or output.ndim == 1:
        column = output.reshape(-1)
        p = column if _is_probability(column, False) else 1 / (1 + np.exp(-column))
        probabilities = np.stack([1 - p, p], axis=1)
    elif output.ndim == 2 and output.shape[1] >= 2:
        if _is_probability(output, True):
            probabilities = output / output.sum(axis=1, keepdims=True)
        else:
            probabilities = _softmax(output)
    else:
        raise FailedPrecondition(
            f"model output has shape {list(output.shape)}: a classifier must give [n, classes] "
            "or [n, 1] (binary)"
        )
    if probabilities.shape[1] < n_labels:
        raise FailedPrecondition(
            f"model output has {probabilities.shape[1]} classes per row (shape "
            f"{list(output.shape)}) but the split's labels need {n_labels}"
        )
    return probabilities


def single_values(output: np.ndarray, task: str) -> np.ndarray:
    """One value per row (regression, ranking); refuses any other shape."""
    if output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1):
        return output.reshape(-1)
    raise FailedPrecondition(
        f"model output has shape {list(output.shape)}: a {task} model must give one value "
        "per row ([n] or [n, 1])"
    )


def encode_labels(labels: np.ndarray, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class indices and class names. Integer labels are their own index ("0".."C-1");
    text labels index into ``classes`` (default: sorted distinct labels)."""
    if labels.dtype.kind in "iub":
        values = labels.astype(np.int64)
        if values.size and values.min() < 0:
            raise FailedPrecondition("classification labels must not be negative")
        count = int(values.max()) + 1 if values.size else 0
        return values, [str(i) for i in range(count)]
    if labels.dtype.kind == "f":
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise FailedPrecondition("classification labels are fractional: is the task right?")
        return encode_labels(labels.astype(np.int64), classes)
    names = list(classes) if classes else sorted({str(v) for v in labels.tolist()})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in labels.tolist()} - set(index))
    if unknown:
        raise FailedPrecondition(f"labels {unknown[:5]} are not among the classes {names}")
    return np.array([index[str(v)] for v in labels.tolist()], dtype=np.int64), names


def predictions(
    task: str,
    output: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    k: int,
    classes: list[str] | None = None,
) -> mt.Predictions:
    """Model output and the split's labels as the Predictions of ``task``."""
    if task == mt.CLASSIFICATION:
        y_true, names = encode_labels(labels, classes)
        probabilities = class_probabilities(output, len(names))
        names += [str(i) for i in range(len(names), probabilities.shape[1])]
        return mt.Predictions(task, y_true, probabilities, None, k, names)
    values = single_values(output, task)
    truth = labels.astype(np.float64)
    if task == mt.RANKING:
        if groups is None:
            raise FailedPrecondition("ranking needs a query column")
        if truth.size and truth.min() < 0:
            raise FailedPrecondition("ranking relevance labels must not be negative")
    return mt.Predictions(task, truth, values, groups, k)
