"""A Triton model repository aimass writes entries into, one per ONNX model, atomically.

An entry is a folder named after the Triton model (routing names it after the
version served, ``digits-v3-1a2b3c4d``; compression's check uses a temporary
name) holding ``config.pbtxt`` and ``1/`` with the model files, plus
``aimass.json`` marking it as written by aimass (entries without it belong to
someone else and are never touched). Two backends:

- ``onnxruntime``: ``platform: "onnxruntime_onnx"`` and ``1/model.onnx``, for
  Triton images that carry the ONNX Runtime backend (the NGC images).
- ``python``: the CPU Triton of the nvidia-pytriton wheel has only the python
  backend, so ``1/model.py`` (:mod:`aimass.core.triton.model`, a thin shell)
  runs ``1/model.onnx`` with ONNX Runtime; the venv's site-packages are passed
  in the ``aimass_site_packages`` parameter because its stub ignores PYTHONPATH.

The configuration comes from the version's signature and the deployment's
serving config: inputs and outputs (the batch axis dropped when batching),
``max_batch_size``, ``dynamic_batching`` (delay, preferred sizes, queue
limit), and ``instance_group`` (count and kind).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from aimass.core.errors import FailedPrecondition

MARKER = "aimass.json"
MODEL_FILE = "model.onnx"
TRITON_VERSION = "1"

# KServe v2 datatype -> Triton model-config data type.
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}

# ONNX TensorProto element type -> KServe v2 datatype.
ONNX_TYPES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}


class Backend(StrEnum):
    """How a Triton server runs ONNX models."""

    ONNXRUNTIME = "onnxruntime"
    PYTHON = "python"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a signature; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class ServingOptions:
    """A deployment's serving config, in plain units."""

    max_batch_size: int = 0
    dynamic_batching: bool = False
    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1
    # "CPU", "GPU" or "" (Triton decides).
    instance_kind: str = ""
    # Requests queued per deployment before RESOURCE_EXHAUSTED; 0: the service default.
    max_queue_size: int = 0
    request_timeout_s: float = 10.0
    max_retries: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def signature_from_onnx(path: str | Path) -> Signature:
    """The graph's inputs (initializers excluded) and outputs, dynamic dims as -1."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def info(value: Any) -> TensorInfo:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        datatype = ONNX_TYPES.get(tensor_type.elem_type)
        if datatype is None:
            raise FailedPrecondition(
                f"ONNX tensor {value.name!r} has element type {tensor_type.elem_type},"
                " which Triton cannot serve"
            )
        return TensorInfo(value.name, datatype, dims)

    inputs = tuple(info(v) for v in model.graph.input if v.name not in initializers)
    return Signature(inputs, tuple(info(v) for v in model.graph.output))


def _dims(tensor: TensorInfo, batching: bool) -> list[int]:
    if not batching:
        return list(tensor.shape)
    if not tensor.shape or tensor.shape[0] not in (-1, 0):
        raise FailedPrecondition(
            f"tensor {tensor.name!r} has shape {list(tensor.shape)}: batching (max_batch_size > 0)"
            " needs a variable first (batch) dimension"
        )
    return list(tensor.shape[1:]) or [1]


def _tensor_block(kind: str, tensors: Sequence[TensorInfo], batching: bool) -> str:
    items = []
    for t in tensors:
        if t.datatype not in TRITON_TYPES:
            raise FailedPrecondition(f"tensor {t.name!r} has unknown datatype {t.datatype!r}")
        dims = ", ".join(str(d) for d in _dims(t, batching))
        items.append(
            f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.datatype]}\n'
            f"    dims: [ {dims} ]\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def site_packages() -> list[str]:
    """Folders the python-backend stub needs on sys.path to import aimass and onnxruntime."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [f for f in dict.fromkeys(folders) if f and os.path.isdir(f)] or [
        p for p in sys.path if p.endswith("site-packages")
    ]


def render_config(
    name: str,
    signature: Signature,
    options: ServingOptions,
    backend: Backend,
    *,
    threads: int = 1,
) -> str:
    """The text of ``config.pbtxt`` (protobuf text format of Triton's ModelConfig)."""
    batching = options.max_batch_size > 0
    lines = [f'name: "{name}"\n']
    if backend is Backend.ONNXRUNTIME:
        lines.append('platform: "onnxruntime_onnx"\n')
    else:
        lines.append('backend: "python"\n')
    lines.append(f"max_batch_size: {max(options.max_batch_size, 0)}\n")
    lines.append(_tensor_block("input", signature.inputs, batching))
    lines.append(_tensor_block("output", signature.outputs, batching))
    if batching and options.dynamic_batching:
        lines.append(_dynamic_batching(options))
    kind = f"\n    kind: KIND_{options.instance_kind}" if options.instance_kind else ""
    lines.append(
        f"instance_group [\n  {{\n    count: {max(options.instance_count, 1)}{kind}\n  }}\n]\n"
    )
    lines.append("version_policy: { latest: { num_versions: 1 } }\n")
    if backend is Backend.PYTHON:
        # The stub imports numpy before model.py runs: EXECUTION_ENV_PATH makes
        # Triton start it inside this venv (it sources bin/activate first).
        if sys.prefix != sys.base_prefix:
            lines.append(_parameter("EXECUTION_ENV_PATH", sys.prefix))
        lines.append(_parameter("aimass_site_packages", os.pathsep.join(site_packages())))
        lines.append(_parameter("aimass_intra_op_threads", str(threads)))
    return "".join(lines)


def _dynamic_batching(options: ServingOptions) -> str:
    body = [f"  max_queue_delay_microseconds: {max(options.max_queue_delay_us, 0)}"]
    sizes = [s for s in options.preferred_batch_sizes if 0 < s <= options.max_batch_size]
    if sizes:
        body.append(f"  preferred_batch_size: [ {', '.join(str(s) for s in sizes)} ]")
    return "dynamic_batching {\n" + "\n".join(body) + "\n}\n"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}\n'


class ModelRepository:
    """A local model-repository folder that aimass writes entries into."""

    def __init__(self, root: str | Path, backend: Backend) -> None:
        self.root = Path(root)
        self.backend = backend

    def path_of(self, name: str) -> Path:
        return self.root / name

    def write(
        self,
        name: str,
        model_file: Path,
        signature: Signature,
        options: ServingOptions,
        marker: dict[str, Any],
    ) -> int:
        """Writes (or replaces) the entry ``name``; returns the bytes of its model files.

        The entry is built in a temporary folder beside the repository and
        renamed into place, so Triton never sees half an entry.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        config = render_config(name, signature, options, self.backend)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            version_dir = staging / TRITON_VERSION
            version_dir.mkdir()
            shutil.copyfile(model_file, version_dir / MODEL_FILE)
            if self.backend is Backend.PYTHON:
                shutil.copyfile(Path(__file__).with_name("model.py"), version_dir / "model.py")
            (staging / "config.pbtxt").write_text(config)
            (staging / MARKER).write_text(json.dumps(marker, sort_keys=True))
            self._replace(staging, self.path_of(name))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return model_file.stat().st_size

    def _replace(self, staging: Path, target: Path) -> None:
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)

    def marker(self, name: str) -> dict[str, Any] | None:
        """The aimass marker of an entry; None when the entry is absent or not ours."""
        path = self.path_of(name) / MARKER
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def managed(self) -> dict[str, dict[str, Any]]:
        """Every entry written by aimass, by name."""
        if not self.root.is_dir():
            return {}
        entries = {}
        for child in self.root.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                marker = self.marker(child.name)
                if marker is not None:
                    entries[child.name] = marker
        return entries

    def remove(self, name: str) -> None:
        """Deletes an entry aimass wrote; entries of others are left alone."""
        if self.marker(name) is not None:
            shutil.rmtree(self.path_of(name), ignore_errors=True)
