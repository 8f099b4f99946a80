"""Model spec + DataSignature -> torch module + ModelSignature.

The spec is the ``aimass.training.v1.ModelSpec`` message (the same one the
training API takes); :func:`spec_from_dict` reads it from YAML-friendly dicts.
:func:`build_model` validates the spec against the dataset (every problem an
InvalidArgument naming the spec field), builds the module, and runs one
forward pass on a zero batch so a shape mismatch is reported before training.

    spec = spec_from_dict({"mlp": {"hidden_sizes": [512, 256]}})
    built = build_model(spec, data_signature_from_version(version))
    built.module, built.signature.inputs, built.signature.loss
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf import json_format
from torch import nn

from aimass.core.errors import InvalidArgument
from aimass.core.nn import networks
from aimass.core.nn.signature import (
    CLASSIFICATION,
    RANKING,
    DataSignature,
    ModelSignature,
    TensorSpec,
    square_side,
    task_name,
)
from aimass.core.protodict import message_from_dict, message_to_dict
from aimass.training.v1 import training_pb2 as tpb

ModelSpec = tpb.ModelSpec

_ACTIVATION = {
    tpb.ACTIVATION_UNSPECIFIED: "relu",
    tpb.ACTIVATION_RELU: "relu",
    tpb.ACTIVATION_GELU: "gelu",
    tpb.ACTIVATION_TANH: "tanh",
    tpb.ACTIVATION_SILU: "silu",
}


class UserCodeError(InvalidArgument):
    """The user's factory could not be imported or raised; ``traceback_text`` has its trace."""

    def __init__(self, field: str, problem: str, traceback_text: str) -> None:
        super().__init__(field, problem)
        self.traceback_text = traceback_text


@dataclass
class BuiltModel:
    """A network ready to train, with the signature that says how to feed it."""

    module: nn.Module
    signature: ModelSignature
    architecture: str

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def spec_from_dict(data: Mapping[str, Any] | None, path: str = "model") -> ModelSpec:
    """A ModelSpec from a friendly dict (``{"mlp": {"hidden_sizes": [64]}, "task": "...}``)."""
    return message_from_dict(data, ModelSpec(), path)


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """A ModelSpec as a dict with short enum names (what configs and lineage store)."""
    return message_to_dict(spec)


def architecture_of(spec: ModelSpec) -> str:
    """The chosen architecture ("mlp", "cnn2d", "user_code", ...); "" when none is set."""
    return spec.WhichOneof("architecture") or ""


# -- validation helpers ------------------------------------------------------------------


def _positive(value: int, field: str) -> int:
    if value <= 0:
        raise InvalidArgument(field, f"must be a positive integer, got {value}")
    return value


def _sizes(values: Any, field: str) -> list[int]:
    return [_positive(int(v), f"{field}[{i}]") for i, v in enumerate(values)]


def _probability(value: float, field: str) -> float:
    if not 0.0 <= value < 1.0:
        raise InvalidArgument(field, f"must be in [0, 1), got {value}")
    return value


def _outputs(spec: ModelSpec, data: DataSignature, task: str) -> tuple[int, str]:
    """(num_outputs, loss) for the task, checked against the dataset's classes."""
    requested = spec.num_outputs
    if requested < 0:
        raise InvalidArgument("model.num_outputs", f"must be >= 0, got {requested}")
    if task == CLASSIFICATION:
        classes = data.num_classes
        if classes < 2:
            raise InvalidArgument(
                "dataset_version", f"classification needs at least 2 label values, got {classes}"
            )
        if requested == 1 and classes == 2:
            return 1, "binary_cross_entropy"
        if requested not in (0, classes):
            raise InvalidArgument(
                "model.num_outputs",
                f"is {requested} but the dataset's label has {classes} classes",
            )
        return classes, "cross_entropy"
    if requested not in (0, 1):
        raise InvalidArgument("model.num_outputs", f"must be 1 for {task}, got {requested}")
    return 1, "binary_cross_entropy" if task == RANKING else "mse"


def _float_features(data: DataSignature, spec: ModelSpec) -> TensorSpec:
    width = data.feature_width
    if width <= 0:
        raise InvalidArgument("dataset_version", "the dataset has no feature columns")
    if spec.input_size and spec.input_size != width:
        raise InvalidArgument(
            "model.input_size",
            f"is {spec.input_size} but the dataset's features are {width} wide "
            f"({len(data.features)} columns)",
        )
    for column in data.features:
        if not column.is_numeric:
            raise InvalidArgument(
                "dataset_version",
                f"feature column {column.name!r} is {column.element_type}, not numeric",
            )
    return TensorSpec("input", "FP32", (-1, width), tuple(c.name for c in data.features))


def _token_features(data: DataSignature, spec: ModelSpec, vocab_field: str) -> TensorSpec:
    features = _float_features(data, spec)
    for column in data.features:
        if not column.is_integer:
            raise InvalidArgument(
                vocab_field,
                f"token input needs integer feature columns; {column.name!r} is "
                f"{column.element_type}",
            )
    return TensorSpec("input", "INT64", features.shape, features.columns)


# -- one builder per architecture ----------------------------------------------------------

Built = tuple[nn.Module, tuple[TensorSpec, ...]]


def _mlp(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.mlp
    inputs = _float_features(data, spec)
    module = networks.Mlp(
        inputs.shape[1],
        _sizes(s.hidden_sizes, "model.mlp.hidden_sizes"),
        outputs,
        _ACTIVATION[s.activation],
        _probability(s.dropout, "model.mlp.dropout"),
        s.batch_norm,
    )
    return module, (inputs,)


def _cnn1d(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.cnn1d
    inputs = _float_features(data, spec)
    in_channels = s.input_channels or 1
    width = inputs.shape[1]
    if width % in_channels:
        raise InvalidArgument(
            "model.cnn1d.input_channels",
            f"{in_channels} does not divide the {width} features of a row",
        )
    module = networks.Cnn1d(
        in_channels,
        width // in_channels,
        _sizes(s.channels, "model.cnn1d.channels") or [32],
        outputs,
        kernel_size=_positive(s.kernel_size or 3, "model.cnn1d.kernel_size"),
        pool_size=s.pool_size,
        hidden_sizes=_sizes(s.hidden_sizes, "model.cnn1d.hidden_sizes"),
        activation=_ACTIVATION[s.activation],
        dropout=_probability(s.dropout, "model.cnn1d.dropout"),
        batch_norm=s.batch_norm,
    )
    return module, (inputs,)


def _image_shape(s: tpb.Cnn2dSpec, width: int) -> tuple[int, int, int]:
    channels = s.input_channels or 1
    if width % channels:
        raise InvalidArgument(
            "model.cnn2d.input_channels", f"{channels} does not divide the {width} features"
        )
    pixels = width // channels
    height = s.input_height or square_side(pixels)
    if height is None:
        raise InvalidArgument(
            "model.cnn2d.input_height",
            f"{pixels} pixels per channel is not a square: set input_height and input_width",
        )
    image_width = s.input_width or (pixels // height if pixels % height == 0 else 0)
    if height * image_width != pixels:
        raise InvalidArgument(
            "model.cnn2d.input_width",
            f"{channels}x{height}x{image_width} does not cover the {width} features of a row",
        )
    return channels, height, image_width


def _cnn2d(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.cnn2d
    inputs = _float_features(data, spec)
    channels, height, width = _image_shape(s, inputs.shape[1])
    module = networks.Cnn2d(
        channels,
        height,
        width,
        _sizes(s.channels, "model.cnn2d.channels") or [32],
        outputs,
        kernel_size=_positive(s.kernel_size or 3, "model.cnn2d.kernel_size"),
        pool_size=s.pool_size,
        hidden_sizes=_sizes(s.hidden_sizes, "model.cnn2d.hidden_sizes"),
        activation=_ACTIVATION[s.activation],
        dropout=_probability(s.dropout, "model.cnn2d.dropout"),
        batch_norm=s.batch_norm,
    )
    return module, (inputs,)


def _rnn(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.rnn
    if s.vocab_size:
        inputs = _token_features(data, spec, "model.rnn.vocab_size")
        _positive(s.embedding_dim, "model.rnn.embedding_dim")
        step = 1
    else:
        inputs = _float_features(data, spec)
        step = s.step_features or 1
        if inputs.shape[1] % step:
            raise InvalidArgument(
                "model.rnn.step_features", f"{step} does not divide the {inputs.shape[1]} features"
            )
    module = networks.RnnClassifier(
        "gru" if s.cell == tpb.RNN_CELL_GRU else "lstm",
        _positive(s.hidden_size, "model.rnn.hidden_size"),
        outputs,
        num_layers=_positive(s.num_layers or 1, "model.rnn.num_layers"),
        bidirectional=s.bidirectional,
        dropout=_probability(s.dropout, "model.rnn.dropout"),
        vocab_size=s.vocab_size,
        embedding_dim=s.embedding_dim,
        step_features=step,
    )
    return module, (inputs,)


def _transformer(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.transformer
    d_model = _positive(s.d_model, "model.transformer.d_model")
    heads = _positive(s.num_heads, "model.transformer.num_heads")
    if s.head_dim < 0:
        raise InvalidArgument("model.transformer.head_dim", f"must be >= 0, got {s.head_dim}")
    if d_model % heads and not s.head_dim:
        raise InvalidArgument(
            "model.transformer.d_model", f"{d_model} is not a multiple of num_heads ({heads})"
        )
    if not 0 <= s.padding_id < max(s.vocab_size, 1):
        raise InvalidArgument("model.transformer.padding_id", "must lie in [0, vocab_size)")
    inputs = _token_features(data, spec, "model.transformer.vocab_size")
    module = networks.TransformerClassifier(
        _positive(s.vocab_size, "model.transformer.vocab_size"),
        _positive(s.max_sequence_length, "model.transformer.max_sequence_length"),
        d_model,
        _positive(s.num_layers, "model.transformer.num_layers"),
        heads,
        outputs,
        feedforward_dim=s.feedforward_dim,
        dropout=_probability(s.dropout, "model.transformer.dropout"),
        pooling="cls" if s.pooling == tpb.POOLING_CLS else "mean",
        padding_id=s.padding_id,
        head_dim=s.head_dim,
    )
    return module, (inputs,)


def _id_inputs(
    data: DataSignature, user_column: str, item_column: str, field: str
) -> tuple[tuple[TensorSpec, ...], int, int]:
    """(user, item) int64 inputs and 1 + the largest id of each, from the dataset."""
    if not user_column:
        raise InvalidArgument(f"{field}.user_column", "is required")
    if not item_column:
        raise InvalidArgument(f"{field}.item_column", "is required")
    user = data.column(user_column, f"{field}.user_column")
    item = data.column(item_column, f"{field}.item_column")
    for column, name in ((user, "user_column"), (item, "item_column")):
        if not column.is_integer or column.width != 1:
            raise InvalidArgument(
                f"{field}.{name}", f"column {column.name!r} must hold integer ids"
            )
    inputs = (
        TensorSpec("user", "INT64", (-1,), (user.name,)),
        TensorSpec("item", "INT64", (-1,), (item.name,)),
    )
    users = int(user.max_value) + 1 if user.max_value is not None else 0
    items = int(item.max_value) + 1 if item.max_value is not None else 0
    return inputs, users, items


def _count(given: int, from_data: int, field: str) -> int:
    if given < 0:
        raise InvalidArgument(field, f"must be >= 0, got {given}")
    if given and from_data > given:
        raise InvalidArgument(field, f"is {given} but the dataset has ids up to {from_data - 1}")
    return _positive(given or from_data, field)


def _two_tower(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.two_tower
    field = "model.two_tower"
    inputs, users, items = _id_inputs(data, s.user_column, s.item_column, field)
    module = networks.TwoTower(
        _count(s.num_users, users, f"{field}.num_users"),
        _count(s.num_items, items, f"{field}.num_items"),
        _positive(s.embedding_dim, f"{field}.embedding_dim"),
        _sizes(s.tower_sizes, f"{field}.tower_sizes"),
        _probability(s.dropout, f"{field}.dropout"),
    )
    return module, inputs


def _matrix_factorization(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.matrix_factorization
    field = "model.matrix_factorization"
    inputs, users, items = _id_inputs(data, s.user_column, s.item_column, field)
    module = networks.MatrixFactorization(
        _count(s.num_users, users, f"{field}.num_users"),
        _count(s.num_items, items, f"{field}.num_items"),
        _positive(s.num_factors, f"{field}.num_factors"),
        s.use_bias,
    )
    return module, inputs


def load_factory(reference: str, field: str = "model.user_code.factory") -> Callable[..., Any]:
    """Imports ``package.module:factory``; UserCodeError (with the traceback) on failure."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidArgument(field, f"must look like 'package.module:factory', got {reference!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as err:
        raise UserCodeError(
            field, f"cannot import {reference!r}: {err!r}", traceback.format_exc()
        ) from err
    if not callable(target):
        raise InvalidArgument(field, f"{reference!r} is not callable")
    return target


def _integral(value: Any) -> Any:
    """Struct numbers are doubles: give whole numbers back as ints (layer sizes, counts)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _user_code(spec: ModelSpec, data: DataSignature, outputs: int) -> Built:
    s = spec.user_code
    field = "model.user_code.factory"
    if not s.factory:
        raise InvalidArgument(field, "is required")
    factory = load_factory(s.factory, field)
    inputs = _float_features(data, spec)
    kwargs = _integral(json_format.MessageToDict(s.kwargs)) if s.HasField("kwargs") else {}
    offered = {"input_size": inputs.shape[1], "num_outputs": outputs, "data_signature": data}
    try:
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    except (TypeError, ValueError):
        accepted, takes_any = {}, False
    for name, value in offered.items():
        if name not in kwargs and (name in accepted or (takes_any and name != "data_signature")):
            kwargs[name] = value
    try:
        module = factory(**kwargs)
    except Exception as err:
        raise UserCodeError(field, f"{s.factory} raised {err!r}", traceback.format_exc()) from err
    if not isinstance(module, nn.Module):
        raise InvalidArgument(
            field, f"{s.factory} returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module, (inputs,)


_BUILDERS: dict[str, Callable[[ModelSpec, DataSignature, int], Built]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "rnn": _rnn,
    "transformer": _transformer,
    "two_tower": _two_tower,
    "matrix_factorization": _matrix_factorization,
    "user_code": _user_code,
}

ARCHITECTURES = tuple(_BUILDERS)


def sample_inputs(signature: ModelSignature, rows: int = 2) -> tuple[torch.Tensor, ...]:
    """Zero tensors shaped like the signature's inputs (batch axis = ``rows``)."""
    tensors = []
    for spec in signature.inputs:
        shape = [rows if d == -1 else d for d in spec.shape]
        dtype = torch.int64 if spec.datatype == "INT64" else torch.float32
        tensors.append(torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def _dry_run(built: BuiltModel) -> None:
    """One forward pass on a zero batch: a shape mismatch fails now, not mid-training."""
    outputs = built.signature.outputs[0].shape[1]
    module = built.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            result = module(*sample_inputs(built.signature))
    except Exception as err:
        trace = traceback.format_exc()
        field = "model.user_code.factory" if built.architecture == "user_code" else "model"
        if built.architecture == "user_code":
            raise UserCodeError(
                field, f"forward pass on a zero batch failed: {err}", trace
            ) from err
        raise InvalidArgument(field, f"forward pass on a zero batch failed: {err}") from err
    finally:
        module.train(was_training)
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != (2, outputs):
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise InvalidArgument(
            "model", f"the network returns {shape} for a batch of 2; expected (2, {outputs})"
        )


def build_model(spec: ModelSpec, data: DataSignature) -> BuiltModel:
    """The module for ``spec`` sized from ``data``; InvalidArgument names any bad field.

    Seed torch (``torch.manual_seed``) before calling for repeatable weights.
    """
    architecture = architecture_of(spec)
    if not architecture:
        raise InvalidArgument("model", f"set one architecture: {', '.join(ARCHITECTURES)}")
    task = task_name(spec.task) or data.task
    if architecture in ("two_tower", "matrix_factorization") and not task_name(spec.task):
        task = RANKING if data.label is not None else ""
    if data.label is None or not task:
        raise InvalidArgument("dataset_version", "the dataset version has no label column")
    data = data.with_task(task)
    outputs, loss = _outputs(spec, data, task)
    module, inputs = _BUILDERS[architecture](spec, data, outputs)
    signature = ModelSignature(
        inputs=inputs,
        outputs=(TensorSpec("output", "FP32", (-1, outputs)),),
        task=task,
        loss=loss,
        label_column=data.label.name,
        classes=data.classes if task == CLASSIFICATION else (),
        extra={"architecture": architecture},
    )
    built = BuiltModel(module, signature, architecture)
    _dry_run(built)
    return built


def rebuild_model(config: Mapping[str, Any]) -> BuiltModel:
    """The network described by a model version's config (``model`` + ``data_signature``).

    Training stores both in every version it registers, so compression and
    evaluation rebuild the module and load the state dict artifact into it.
    """
    if "model" not in config or "data_signature" not in config:
        raise InvalidArgument("config", "needs 'model' and 'data_signature' to rebuild the network")
    return build_model(
        spec_from_dict(config["model"]), DataSignature.from_dict(config["data_signature"])
    )
