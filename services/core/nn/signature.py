"""What a dataset offers (DataSignature) and what a network takes and gives (ModelSignature).

A :class:`DataSignature` is read from a dataset version's schema (or from an
Arrow table): the feature columns with their widths, the label column, the
task and the class labels. :func:`aimass.core.nn.build_model` turns a model
spec and a DataSignature into a module and its :class:`ModelSignature`: the
named input tensors (KServe datatypes, ``-1`` for the batch axis), which
columns feed each input, the output tensor, the classes and the loss.

A ModelSignature round-trips through a plain dict (stored with checkpoints and
in a model version's config) and converts to ``aimass.common.v1.Signature``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aimass.common.v1 import common_pb2
from aimass.core.errors import InvalidArgument

CLASSIFICATION = "classification"
REGRESSION = "regression"
RANKING = "ranking"
TASKS = (CLASSIFICATION, REGRESSION, RANKING)

_TASK_FROM_PROTO = {
    common_pb2.TASK_CLASSIFICATION: CLASSIFICATION,
    common_pb2.TASK_REGRESSION: REGRESSION,
    common_pb2.TASK_RANKING: RANKING,
}

_FIXED_LIST = re.compile(r"^fixed_size_list<(?:item|element)?:?\s*(\w+)[^>]*>\[(\d+)\]$")
_INTEGER_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_FLOAT_TYPES = {"halffloat", "float", "double", "float16", "float32", "float64"}


def task_name(task: int) -> str:
    """A ``common.v1.Task`` as "classification", "regression", "ranking" or "" (unspecified)."""
    return _TASK_FROM_PROTO.get(task, "")


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a dataset: its name, element type and width (values per row)."""

    name: str
    element_type: str
    width: int = 1
    max_value: float | None = None

    @property
    def is_integer(self) -> bool:
        return self.element_type in _INTEGER_TYPES or self.element_type == "bool"

    @property
    def is_numeric(self) -> bool:
        return self.is_integer or self.element_type in _FLOAT_TYPES


def parse_column_type(arrow_type: str) -> tuple[str, int]:
    """("uint8", 64) for "fixed_size_list<item: uint8>[64]", ("double", 1) for "double"."""
    text = arrow_type.strip()
    match = _FIXED_LIST.match(text)
    if match:
        return match.group(1), int(match.group(2))
    return text, 1


@dataclass(frozen=True)
class DataSignature:
    """The columns a dataset version offers a model, with its label, task and classes."""

    features: tuple[ColumnInfo, ...]
    label: ColumnInfo | None
    task: str
    classes: tuple[str, ...] = ()
    # Every column (features, label, others), for specs that pick columns by name.
    columns: tuple[ColumnInfo, ...] = ()
    dataset_version: str = ""

    @property
    def feature_width(self) -> int:
        """Values per row over all feature columns (an 8x8 image column counts 64)."""
        return sum(column.width for column in self.features)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def column(self, name: str, field_path: str) -> ColumnInfo:
        """The column ``name``; InvalidArgument on ``field_path`` when the dataset lacks it."""
        for column in self.columns or (*self.features, *(c for c in [self.label] if c)):
            if column.name == name:
                return column
        known = ", ".join(c.name for c in self.columns or self.features)
        raise InvalidArgument(field_path, f"the dataset has no column {name!r} (it has {known})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (stored in a model version's config); :meth:`from_dict` reads it."""

        def col(c: ColumnInfo) -> dict[str, Any]:
            return {"name": c.name, "type": c.element_type, "width": c.width, "max": c.max_value}

        return {
            "features": [col(c) for c in self.features],
            "label": col(self.label) if self.label else None,
            "task": self.task,
            "classes": list(self.classes),
            "columns": [col(c) for c in self.columns],
            "dataset_version": self.dataset_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSignature:
        def col(item: Mapping[str, Any]) -> ColumnInfo:
            maximum = item.get("max")
            return ColumnInfo(
                str(item["name"]),
                str(item["type"]),
                int(item.get("width", 1)),
                float(maximum) if maximum is not None else None,
            )

        label = data.get("label")
        return cls(
            features=tuple(col(c) for c in data.get("features", ())),
            label=col(label) if label else None,
            task=str(data.get("task", "")),
            classes=tuple(str(c) for c in data.get("classes", ())),
            columns=tuple(col(c) for c in data.get("columns", ())),
            dataset_version=str(data.get("dataset_version", "")),
        )

    def with_task(self, task: str) -> DataSignature:
        """The same signature with the task forced (a spec's explicit task wins)."""
        if not task or task == self.task:
            return self
        classes = self.classes if task == CLASSIFICATION else ()
        return DataSignature(
            self.features, self.label, task, classes, self.columns, self.dataset_version
        )


def _sorted_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Class labels in a stable order: numerically when every label is a number."""
    try:
        return tuple(sorted(labels, key=float))
    except ValueError:
        return tuple(sorted(labels))


def data_signature_from_version(version: Any) -> DataSignature:
    """The DataSignature of an ``aimass.data.v1.DatasetVersion`` (schema, stats, labels)."""
    maxima = {
        s.column: s.max
        for s in version.column_statistics
        if s.HasField("max") and s.max is not None
    }
    columns = []
    for column in version.schema:
        element, width = parse_column_type(column.type)
        columns.append(ColumnInfo(column.name, element, width, maxima.get(column.name)))
    label_name = version.config.label_column
    wanted = list(version.config.feature_columns)
    label = next((c for c in columns if c.name == label_name), None) if label_name else None
    if wanted:
        by_name = {c.name: c for c in columns}
        features = tuple(by_name[n] for n in wanted if n in by_name)
    else:
        features = tuple(c for c in columns if c.name != label_name)
    labels = [count.label for count in version.label_distribution]
    task = CLASSIFICATION if labels else (REGRESSION if label is not None else "")
    return DataSignature(
        features=features,
        label=label,
        task=task,
        classes=_sorted_labels(labels) if labels else (),
        columns=tuple(columns),
        dataset_version=version.name,
    )


def data_signature_from_table(
    table: Any,
    label_column: str | None,
    feature_columns: Sequence[str] = (),
    task: str = "",
    max_classes: int = 100,
) -> DataSignature:
    """A DataSignature straight from a ``pyarrow.Table`` (tests, notebooks, offline use).

    Without ``task``: string, bool or integer labels with at most ``max_classes``
    distinct values mean classification, anything else regression.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for name in table.column_names:
        arrow_type = table.schema.field(name).type
        element, width = parse_column_type(str(arrow_type))
        maximum = None
        if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
            value = pc.max(table.column(name)).as_py()
            maximum = float(value) if value is not None else None
        columns.append(ColumnInfo(name, element, width, maximum))
    label = next((c for c in columns if c.name == label_column), None) if label_column else None
    by_name = {c.name: c for c in columns}
    features = (
        tuple(by_name[n] for n in feature_columns)
        if feature_columns
        else tuple(c for c in columns if c.name != label_column)
    )
    classes: tuple[str, ...] = ()
    if label is not None:
        distinct = [str(v) for v in pc.unique(table.column(label.name)).to_pylist()]
        is_discrete = not label.is_numeric or label.is_integer
        if not task:
            task = CLASSIFICATION if is_discrete and len(distinct) <= max_classes else REGRESSION
        if task == CLASSIFICATION:
            classes = _sorted_labels(distinct)
    return DataSignature(features, label, task, classes, tuple(columns))


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model: KServe datatype, shape (-1 = any), and its source columns."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    columns: tuple[str, ...] = ()

    def to_proto(self) -> common_pb2.TensorSpec:
        return common_pb2.TensorSpec(name=self.name, datatype=self.datatype, shape=self.shape)


@dataclass(frozen=True)
class ModelSignature:
    """Inputs and outputs of a built network, and how to feed it from a dataset's columns.

    ``loss`` is "cross_entropy" (outputs are logits over ``classes``),
    "binary_cross_entropy" (one logit per row) or "mse".
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str
    loss: str
    label_column: str = ""
    classes: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def to_proto(self) -> common_pb2.Signature:
        """As ``aimass.common.v1.Signature`` (what the registry stores with a version)."""
        return common_pb2.Signature(
            inputs=[s.to_proto() for s in self.inputs],
            outputs=[s.to_proto() for s in self.outputs],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back."""

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            return {
                "name": spec.name,
                "datatype": spec.datatype,
                "shape": list(spec.shape),
                "columns": list(spec.columns),
            }

        return {
            "inputs": [tensor(s) for s in self.inputs],
            "outputs": [tensor(s) for s in self.outputs],
            "task": self.task,
            "loss": self.loss,
            "label_column": self.label_column,
            "classes": list(self.classes),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSignature:
        def tensor(item: Mapping[str, Any]) -> TensorSpec:
            return TensorSpec(
                name=str(item["name"]),
                datatype=str(item["datatype"]),
                shape=tuple(int(d) for d in item.get("shape", ())),
                columns=tuple(item.get("columns", ())),
            )

        return cls(
            inputs=tuple(tensor(i) for i in data["inputs"]),
            outputs=tuple(tensor(o) for o in data["outputs"]),
            task=str(data.get("task", "")),
            loss=str(data.get("loss", "")),
            label_column=str(data.get("label_column", "")),
            classes=tuple(str(c) for c in data.get("classes", ())),
            extra=dict(data.get("extra", {})),
        )


def square_side(value: int) -> int | None:
    """The side of a square with ``value`` cells, or None when ``value`` is not a square."""
    side = math.isqrt(value)
    return side if side * side == value else None
