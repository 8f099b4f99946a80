"""Arrow tables -> the tensors a built network takes, following its ModelSignature.

    inputs, labels = table_to_tensors(table, built.signature)
    logits = built.module(*inputs)

Feature columns are concatenated in signature order (fixed-size list columns
such as images spread over their width); class labels become indices into
``signature.classes`` (compared as text, so the integer 3 and the string "3"
are the same class); regression and ranking labels become float32 ``[n, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aimass.core.errors import InvalidArgument
from aimass.core.nn.signature import CLASSIFICATION, ModelSignature


def _column(table: Any, name: str) -> np.ndarray:
    from aimass.core.splits import column_to_numpy

    if name not in table.column_names:
        raise InvalidArgument("dataset_version", f"the split has no column {name!r}")
    return column_to_numpy(table.column(name)).reshape(table.num_rows, -1)


def input_arrays(table: Any, signature: ModelSignature) -> list[np.ndarray]:
    """One numpy array per signature input (float32 or int64), rows in table order."""
    arrays = []
    for spec in signature.inputs:
        parts = [_column(table, name) for name in spec.columns]
        dtype = np.int64 if spec.datatype == "INT64" else np.float32
        array = np.concatenate(parts, axis=1).astype(dtype) if parts else np.zeros((0,), dtype)
        if len(spec.shape) == 1:
            array = array.reshape(-1)
        arrays.append(np.ascontiguousarray(array))
    return arrays


def label_array(table: Any, signature: ModelSignature) -> np.ndarray:
    """Labels as class indices (int64 ``[n]``) or float32 targets (``[n, 1]``)."""
    raw = _column(table, signature.label_column).reshape(-1)
    if signature.task == CLASSIFICATION:
        index = {label: i for i, label in enumerate(signature.classes)}
        texts = [_label_text(v) for v in raw.tolist()]
        unknown = sorted({t for t in texts if t not in index})
        if unknown:
            raise InvalidArgument(
                "dataset_version",
                f"label values {unknown[:5]} are not among the model's classes",
            )
        indices = np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
        if signature.loss == "binary_cross_entropy":
            return indices.astype(np.float32).reshape(-1, 1)
        return indices
    return raw.astype(np.float32).reshape(-1, 1)


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def table_to_tensors(
    table: Any, signature: ModelSignature, with_labels: bool = True
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """(input tensors in signature order, label tensor or None)."""
    inputs = tuple(torch.from_numpy(a) for a in input_arrays(table, signature))
    labels = None
    if with_labels and signature.label_column:
        labels = torch.from_numpy(label_array(table, signature))
    return inputs, labels


def predictions(outputs: torch.Tensor, signature: ModelSignature) -> torch.Tensor:
    """Class indices (classification) or the raw scores, from a batch of outputs."""
    if signature.task != CLASSIFICATION:
        return outputs
    if signature.loss == "binary_cross_entropy":
        return (outputs.reshape(-1) > 0).long()
    return outputs.argmax(dim=1)


def class_labels(indices: Sequence[int], signature: ModelSignature) -> list[str]:
    """Class indices back to the dataset's label values (as text)."""
    return [signature.classes[i] for i in indices]
