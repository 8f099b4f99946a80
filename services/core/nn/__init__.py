"""The network catalogue shared by training, compression and evaluation.

A model is described by an ``aimass.training.v1.ModelSpec`` (one architecture
of the catalogue, or user code by ``package.module:factory``) and sized by
the dataset it trains on, whose schema gives a :class:`DataSignature`.

    from aimass.core import nn as ann

    data = ann.data_signature_from_version(dataset_version_pb)   # or _from_table(table, "label")
    spec = ann.spec_from_dict({"mlp": {"hidden_sizes": [512, 256]}})
    built = ann.build_model(spec, data)             # BuiltModel(module, signature, architecture)
    inputs, labels = ann.table_to_tensors(table, built.signature)
    loss = ann.loss_function(built.signature)(built.module(*inputs), labels)
    ann.export_onnx(built.module, built.signature, "model.onnx", sample=inputs)

Catalogue (``ModelSpec.architecture``): ``mlp``, ``cnn1d``, ``cnn2d``, ``rnn``
(LSTM/GRU, token or feature input), ``transformer`` (encoder classifier over
token ids), ``two_tower`` and ``matrix_factorization`` (inputs ``user`` and
``item``), ``user_code``. Every network takes flat per-row tensors and returns
``[batch, num_outputs]``: logits over ``signature.classes`` (loss
``cross_entropy``), one logit (``binary_cross_entropy``: binary classification
with ``num_outputs: 1``, and ranking) or one value (``mse``, regression).

A model version registered by training stores ``{"model": spec_to_dict(spec),
"data_signature": data.to_dict(), "signature": signature.to_dict(), ...}`` in
its config and the state dict as an artifact of kind ``state_dict``, so
:func:`rebuild_model` (config) + ``module.load_state_dict`` gives the network
back anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aimass.core.nn.build import (
    ARCHITECTURES,
    BuiltModel,
    ModelSpec,
    UserCodeError,
    architecture_of,
    build_model,
    load_factory,
    rebuild_model,
    sample_inputs,
    spec_from_dict,
    spec_to_dict,
)
from aimass.core.nn.onnx_export import (
    OnnxCheckError,
    OnnxExport,
    export_onnx,
    onnx_session,
    random_inputs,
)
from aimass.core.nn.signature import (
    CLASSIFICATION,
    RANKING,
    REGRESSION,
    ColumnInfo,
    DataSignature,
    ModelSignature,
    TensorSpec,
    data_signature_from_table,
    data_signature_from_version,
)
from aimass.core.nn.tensors import (
    class_labels,
    input_arrays,
    label_array,
    predictions,
    table_to_tensors,
)


def loss_function(
    signature: ModelSignature, reduction: str = "mean"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a signature: cross entropy, binary cross entropy or MSE."""
    if signature.loss == "cross_entropy":
        return torch.nn.CrossEntropyLoss(reduction=reduction)
    if signature.loss == "binary_cross_entropy":
        return torch.nn.BCEWithLogitsLoss(reduction=reduction)
    return torch.nn.MSELoss(reduction=reduction)


__all__ = [
    "ARCHITECTURES",
    "CLASSIFICATION",
    "RANKING",
    "REGRESSION",
    "BuiltModel",
    "ColumnInfo",
    "DataSignature",
    "ModelSignature",
    "ModelSpec",
    "OnnxCheckError",
    "OnnxExport",
    "TensorSpec",
    "UserCodeError",
    "architecture_of",
    "build_model",
    "class_labels",
    "data_signature_from_table",
    "data_signature_from_version",
    "export_onnx",
    "input_arrays",
    "label_array",
    "load_factory",
    "loss_function",
    "onnx_session",
    "predictions",
    "random_inputs",
    "rebuild_model",
    "sample_inputs",
    "spec_from_dict",
    "spec_to_dict",
    "table_to_tensors",
]
