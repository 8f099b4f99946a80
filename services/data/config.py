"""Dataset configs: YAML (the keys users already write) <-> the DatasetConfig proto, checked.

A YAML config reads::

    data_path: digits.csv          # or s3_uri: s3://bucket/key, or upload: uploads/abc
    download: false
    format: csv                    # csv, jsonl, parquet, npz, image_folder (default: inferred)
    label_column: target
    feature_columns: [a, b]        # default: every column but the label
    splitting: {train: 80, valid: 10, test: 10}
    seed: 0
    stratify: true
    shuffle: true
    csv: {delimiter: ",", header: true}
    image_folder: {width: 8, height: 8, channels: 1}
    npz: {features_key: x, labels_key: y}

Every error names the key and the problem.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from aimass.core.errors import InvalidArgument
from aimass.data.v1 import data_pb2 as pb

FORMATS = {
    "csv": pb.DATA_FORMAT_CSV,
    "jsonl": pb.DATA_FORMAT_JSONL,
    "parquet": pb.DATA_FORMAT_PARQUET,
    "npz": pb.DATA_FORMAT_NPZ,
    "image_folder": pb.DATA_FORMAT_IMAGE_FOLDER,
}
FORMAT_NAMES = {value: key for key, value in FORMATS.items()}
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".npz": "npz"}
DEFAULT_SPLIT = (80.0, 10.0, 10.0)
SPLIT_NAMES = ("train", "valid", "test")
# Largest image side ingest resizes to: bounds the memory a config can ask for.
MAX_IMAGE_SIDE = 4096
_KNOWN_KEYS = {
    "data_path", "s3_uri", "upload", "download", "format", "label_column", "feature_columns",
    "splitting", "split", "seed", "stratify", "shuffle", "csv", "image_folder", "npz",
}  # fmt: skip


def load_yaml(path: str | Path) -> pb.DatasetConfig:
    """Reads a YAML dataset config file into a checked DatasetConfig."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InvalidArgument("config", f"cannot read {path}: {err}") from err
    return from_dict(data or {})


def from_dict(data: Any) -> pb.DatasetConfig:
    """A DatasetConfig from a YAML-shaped mapping, checked by :func:`validate`."""
    if not isinstance(data, dict):
        raise InvalidArgument("config", "must be a mapping of keys to values")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    config = pb.DatasetConfig()
    for key in ("data_path", "s3_uri", "upload"):
        if key in data:
            setattr(config, key, str(data[key]))
    config.download = bool(data.get("download", False))
    fmt = str(data.get("format", "") or "").lower()
    if fmt and fmt not in FORMATS:
        raise InvalidArgument("format", f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    config.format = FORMATS.get(fmt, pb.DATA_FORMAT_UNSPECIFIED)
    config.label_column = str(data.get("label_column", "") or "")
    config.feature_columns.extend(str(c) for c in data.get("feature_columns", []) or [])
    split = data.get("splitting", data.get("split"))
    if split is not None:
        config.split.CopyFrom(_split_from(split))
    config.seed = _int(data.get("seed", 0), "seed")
    config.stratify = bool(data.get("stratify", False))
    if "shuffle" in data:
        config.shuffle = bool(data["shuffle"])
    for key, message in (("csv", config.csv), ("image_folder", config.image_folder)):
        if key in data:
            _parse_options(data[key], message, key)
    if "npz" in data:
        _parse_options(data["npz"], config.npz, "npz")
    validate(config)
    return config


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(key, f"must be an integer, got {value!r}")
    return value


def _split_from(split: Any) -> pb.SplitRatios:
    if not isinstance(split, dict):
        raise InvalidArgument("splitting", "must map train/valid/test to percentages")
    for key in split:
        if key not in SPLIT_NAMES:
            raise InvalidArgument(f"splitting.{key}", "unknown split (train, valid, test)")
    values = {}
    for key in SPLIT_NAMES:
        value = split.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"splitting.{key}", f"must be a number, got {value!r}")
        values[key] = float(value)
    return pb.SplitRatios(
        train_percent=values["train"], valid_percent=values["valid"], test_percent=values["test"]
    )


def _parse_options(value: Any, message: Any, key: str) -> None:
    if not isinstance(value, dict):
        raise InvalidArgument(key, "must be a mapping of options")
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as err:
        raise InvalidArgument(key, str(err)) from err


def split_percents(config: pb.DatasetConfig) -> tuple[float, float, float]:
    """(train, valid, test) percentages; unset means 80/10/10."""
    if not config.HasField("split"):
        return DEFAULT_SPLIT
    s = config.split
    return (s.train_percent, s.valid_percent, s.test_percent)


def validate(config: pb.DatasetConfig, field: str = "config") -> None:
    """Checks what can be checked without reading the data; errors name the key."""
    if not config.WhichOneof("source"):
        raise InvalidArgument(f"{field}.data_path", "one of data_path, s3_uri, upload is required")
    if config.format not in FORMAT_NAMES and config.format != pb.DATA_FORMAT_UNSPECIFIED:
        raise InvalidArgument(f"{field}.format", f"unknown format {config.format}")
    percents = split_percents(config)
    for name, value in zip(SPLIT_NAMES, percents, strict=True):
        if not math.isfinite(value) or value < 0 or value > 100:
            raise InvalidArgument(f"{field}.splitting.{name}", f"must be 0-100, got {value}")
    if abs(sum(percents) - 100.0) > 1e-6:
        raise InvalidArgument(
            f"{field}.splitting", f"train+valid+test must sum to 100, got {sum(percents):g}"
        )
    if percents[0] == 0:
        raise InvalidArgument(f"{field}.splitting.train", "the train split cannot be 0%")
    if config.stratify and not config.label_column and not _is_images(config):
        raise InvalidArgument(f"{field}.stratify", "needs label_column")
    if config.label_column and config.label_column in config.feature_columns:
        raise InvalidArgument(f"{field}.feature_columns", "must not contain the label column")
    if config.WhichOneof("format_options") == "csv":
        _check_csv_options(config.csv, f"{field}.csv")
    if config.WhichOneof("format_options") == "image_folder":
        _check_image_options(config.image_folder, f"{field}.image_folder")


def _check_csv_options(options: pb.CsvOptions, field: str) -> None:
    # pyarrow's parser takes one ASCII byte; a line break there would cut every record.
    for key in ("delimiter", "quote_char"):
        value = getattr(options, key)
        if len(value) > 1 or (value and (not value.isascii() or value in "\r\n")):
            raise InvalidArgument(f"{field}.{key}", "must be one ASCII character, not a line break")
    if options.delimiter and options.delimiter == (options.quote_char or '"'):
        raise InvalidArgument(f"{field}.quote_char", "must differ from the delimiter")


def _check_image_options(options: pb.ImageFolderOptions, field: str) -> None:
    if options.channels not in (0, 1, 3):
        raise InvalidArgument(f"{field}.channels", "must be 1 or 3")
    for key in ("width", "height"):
        value = getattr(options, key)
        if not 0 <= value <= MAX_IMAGE_SIDE:
            raise InvalidArgument(f"{field}.{key}", f"must be 0 (as read) to {MAX_IMAGE_SIDE}")


def _is_images(config: pb.DatasetConfig) -> bool:
    return config.format == pb.DATA_FORMAT_IMAGE_FOLDER


def effective_label(config: pb.DatasetConfig) -> str:
    """The label column; image folders and NPZ files name theirs by default."""
    if config.label_column:
        return config.label_column
    if config.format == pb.DATA_FORMAT_IMAGE_FOLDER:
        return "label"
    return ""


def shapes_result(config: pb.DatasetConfig) -> dict[str, Any]:
    """The part of the config that shapes the converted rows: the fingerprint's input.

    The source location is left out (the content is hashed instead), so the same bytes
    at another path or uploaded again give the same fingerprint.
    """
    copy = pb.DatasetConfig()
    copy.CopyFrom(config)
    copy.ClearField("source")
    copy.download = False
    return json_format.MessageToDict(copy, preserving_proto_field_name=True)


def to_dict(config: pb.DatasetConfig) -> dict[str, Any]:
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def from_json(data: dict[str, Any]) -> pb.DatasetConfig:
    return json_format.ParseDict(data, pb.DatasetConfig())
