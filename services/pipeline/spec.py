"""Pipeline specs: the YAML users write <-> the PipelineSpec proto, checked.

A pipeline file is the dataset config extended with one section per stage::

    dataset:                      # the keys of a dataset config file, plus its id
      name: digits
      data_path: digits.csv       # beside the file, else under the data folder
      label_column: digit
      splitting: {train: 80, valid: 10, test: 10}
    model:                        # training.v1.ModelSpec, plus the registered model id
      name: digits-mlp
      task: classification
      mlp: {hidden_sizes: [256, 128]}
    training: {epochs: 10, optimizer: {type: adam, learning_rate: 0.001}}
    evaluation: {metrics: [accuracy, f1_macro]}
    compression: {steps: [{name: int8, quantize_dynamic: {}}]}   # compression.v1.Recipe
    release: {alias: production}
    deploy: {deployment: digits}

Sections other than ``dataset`` and ``model`` are optional; leaving one out
skips its stage. Values of enum fields may be written short and in any case
(``adam`` for ``OPTIMIZER_TYPE_ADAM``). Every error names the key and the problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from aimass.core.errors import InvalidArgument
from aimass.pipeline.v1 import pipeline_pb2 as pb

RESOURCE_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
DATASET_VERSION = re.compile(r"^datasets/[a-z][a-z0-9-]{0,62}/versions/[0-9]+\Z")
MODEL_VERSION = re.compile(r"^models/[a-z][a-z0-9-]{0,62}/versions/[0-9]+\Z")
SECTIONS = ("dataset", "model", "training", "evaluation", "compression", "release", "deploy")
SPLIT_NAMES = ("train", "valid", "test")


# ---------------------------------------------------------------- YAML -> proto


def load_yaml(path: str | Path) -> pb.PipelineSpec:
    """Reads a pipeline file.

    A relative ``data_path`` naming a file beside the pipeline file is made absolute;
    otherwise it stays relative and the data service reads it under its data folder.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InvalidArgument("spec", f"cannot read {path}: {err}") from err
    spec = from_dict(data or {})
    source = spec.dataset.config.data_path
    beside = path.parent / source
    if source and not Path(source).is_absolute() and beside.exists():
        spec.dataset.config.data_path = str(beside.resolve())
    return spec


def from_dict(data: Any) -> pb.PipelineSpec:
    """A PipelineSpec from a YAML-shaped mapping, checked by :func:`validate`."""
    if not isinstance(data, dict):
        raise InvalidArgument("spec", "must be a mapping of sections to values")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown section (known: {', '.join(SECTIONS)})")
    spec = pb.PipelineSpec()
    _dataset(_section(data, "dataset", required=True), spec.dataset)
    _model(_section(data, "model", required=True), spec.model)
    if "training" in data:
        _parse(_section(data, "training"), spec.model.training, "training")
    if "evaluation" in data:
        evaluation = dict(_section(data, "evaluation"))
        if "metrics" in evaluation:
            evaluation["metric_names"] = evaluation.pop("metrics")
        _parse(evaluation, spec.evaluation, "evaluation")
        spec.evaluation.SetInParent()  # `evaluation: {}` asks for the default metrics
    if "compression" in data:
        _parse(_section(data, "compression"), spec.compression.recipe, "compression")
    if "release" in data:
        _parse(_section(data, "release"), spec.release, "release")
    if "deploy" in data:
        _parse(_section(data, "deploy"), spec.deploy, "deploy")
    validate(spec)
    return spec


def _section(data: dict[str, Any], key: str, *, required: bool = False) -> dict[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(key, "is required" if value is None else "must be a mapping")
    return value


def _dataset(data: dict[str, Any], out: pb.DatasetSection) -> None:
    values = dict(data)
    out.dataset = str(values.pop("name", values.pop("dataset", "")) or "")
    out.dataset_version = str(values.pop("version", values.pop("dataset_version", "")) or "")
    split = values.pop("splitting", values.pop("split", None))
    if split is not None:
        values["split"] = _split(split)
    _parse(values, out.config, "dataset")


def _split(split: Any) -> dict[str, float]:
    if not isinstance(split, dict):
        raise InvalidArgument("dataset.splitting", "must map train/valid/test to percentages")
    for key in split:
        if key not in SPLIT_NAMES:
            raise InvalidArgument(f"dataset.splitting.{key}", "unknown split (train, valid, test)")
    return {f"{key}_percent": split.get(key, 0) for key in SPLIT_NAMES}


def _model(data: dict[str, Any], out: pb.ModelSection) -> None:
    values = dict(data)
    out.model = str(values.pop("name", values.pop("model", "")) or "")
    out.model_version = str(values.pop("version", values.pop("model_version", "")) or "")
    if "resources" in values:
        _parse(values.pop("resources"), out.resources, "model.resources")
    _parse(values, out.spec, "model")


def _parse(values: Any, message: Message, field: str) -> None:
    """proto JSON into ``message``, short enum names accepted; errors name ``field``."""
    if not isinstance(values, dict):
        raise InvalidArgument(field, "must be a mapping")
    try:
        json_format.ParseDict(_expand_enums(values, message.DESCRIPTOR), message)
    except json_format.ParseError as err:
        raise InvalidArgument(field, str(err)) from err


def _expand_enums(values: Any, desc: descriptor.Descriptor) -> Any:
    """Rewrites short enum values (``adam``) to their full names (``OPTIMIZER_TYPE_ADAM``)."""
    if not isinstance(values, dict) or desc.full_name.startswith("google.protobuf."):
        return values
    out = {}
    for key, value in values.items():
        field = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
        if field is None or (
            field.message_type is not None and field.message_type.GetOptions().map_entry
        ):
            out[key] = value
        elif field.enum_type is not None:
            out[key] = _each(value, lambda v, e=field.enum_type: _enum_value(v, e))
        elif field.message_type is not None:
            out[key] = _each(value, lambda v, m=field.message_type: _expand_enums(v, m))
        else:
            out[key] = value
    return out


def _each(value: Any, convert: Any) -> Any:
    return [convert(v) for v in value] if isinstance(value, list) else convert(value)


def _enum_value(value: Any, enum: descriptor.EnumDescriptor) -> Any:
    if not isinstance(value, str) or value in enum.values_by_name:
        return value
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper()
    candidate = f"{prefix}_{value.upper().replace('-', '_')}"
    return candidate if candidate in enum.values_by_name else value


# ---------------------------------------------------------------- checks


def validate(spec: pb.PipelineSpec, field: str = "spec") -> None:
    """Checks what the pipeline service can check alone; the stages' services check the rest."""
    dataset, model = spec.dataset, spec.model
    _resource_id(dataset.dataset, f"{field}.dataset.dataset")
    if dataset.dataset_version:
        if not DATASET_VERSION.match(dataset.dataset_version):
            raise InvalidArgument(
                f"{field}.dataset.dataset_version",
                f"must be datasets/{{dataset}}/versions/{{n}}, got {dataset.dataset_version!r}",
            )
    elif not dataset.config.WhichOneof("source"):
        raise InvalidArgument(
            f"{field}.dataset",
            "needs a source (data_path, s3_uri or upload) or an existing dataset_version",
        )
    _resource_id(model.model, f"{field}.model.model")
    if model.model_version:
        if not MODEL_VERSION.match(model.model_version):
            raise InvalidArgument(
                f"{field}.model.model_version",
                f"must be models/{{model}}/versions/{{n}}, got {model.model_version!r}",
            )
    elif not model.spec.WhichOneof("architecture"):
        raise InvalidArgument(
            f"{field}.model.spec",
            "names no architecture (mlp, cnn1d, cnn2d, rnn, transformer, ...) and no"
            " model_version to use instead of training",
        )
    if spec.HasField("compression") and not spec.compression.recipe.steps:
        raise InvalidArgument(f"{field}.compression.recipe.steps", "must list at least one step")
    if spec.HasField("release"):
        _resource_id(spec.release.alias, f"{field}.release.alias")
    if spec.HasField("deploy"):
        _resource_id(spec.deploy.deployment, f"{field}.deploy.deployment")


def _resource_id(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, "is required")
    if not RESOURCE_ID.match(value):
        raise InvalidArgument(
            field,
            f"must be 1-63 lower-case letters, digits and '-', starting with a letter;"
            f" got {value!r}",
        )


def planned_stages(spec: pb.PipelineSpec) -> list[tuple[int, bool]]:
    """Every stage in order with whether it runs (False: skipped)."""
    deploy = spec.HasField("deploy")
    return [
        (pb.STAGE_INGEST, not spec.dataset.dataset_version),
        (pb.STAGE_TRAIN, not spec.model.model_version),
        (pb.STAGE_EVALUATE, spec.HasField("evaluation")),
        (pb.STAGE_COMPRESS, spec.HasField("compression")),
        (pb.STAGE_RELEASE, spec.HasField("release")),
        (pb.STAGE_DEPLOY, deploy),
        (pb.STAGE_SMOKE_TEST, deploy and not spec.deploy.skip_smoke_test),
    ]
