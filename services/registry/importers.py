"""Bring your own model: ONNX, TorchScript or state dict + factory -> a registry version.

    imported = import_model(ImportSpec(path, "model.pt", "torchscript", signature), work_dir)
    imported.onnx_path, imported.signature, imported.config

An ONNX file is registered as it is: its signature (input and output names,
element types as KServe datatypes, shapes with -1 for dynamic dims such as
the batch axis) is read from the graph, or given and then checked against
the graph, and the file must load in onnxruntime. A TorchScript file, or a
state dict with the ``package.module:factory`` that builds its network (the
convention of :mod:`aimass.core.nn`'s user code), is exported to ONNX with
:func:`aimass.core.nn.export_onnx`, whose onnxruntime check compares the
graph with torch; the version then carries the original file and the ONNX
graph, so evaluation, compression and serving treat it like a trained model.

Every problem is an InvalidArgument naming the request field (``source_uri``
for the file itself) and found before anything is stored or registered.
Everything here is blocking (onnx, onnxruntime, torch): call it from a
worker thread.
"""

from __future__ import annotations

import math
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from google.protobuf import json_format

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.core.errors import InvalidArgument
from aimass.core.nn.build import UserCodeError, load_factory
from aimass.registry.v1 import registry_pb2

ONNX = "onnx"
TORCHSCRIPT = "torchscript"
STATE_DICT = "state_dict"
FORMATS = (ONNX, TORCHSCRIPT, STATE_DICT)
SOURCE = "source_uri"
MAX_REQUEST_ID = 64
MAX_FILE_NAME = 255
# Rows of the sample the torch export traces and checks with, and the sizes tried for
# variable non-batch dims (two sizes tell which output dims follow the inputs).
SAMPLE_ROWS = 2
VARIABLE_SIZES = (5, 7)

# ONNX TensorProto element types -> KServe v2 datatypes.
_ONNX_TO_KSERVE = {
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
_TORCH_DTYPES = {
    "FP32": "float32",
    "FP64": "float64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class ImportSpec:
    """What to import: the local copy of the file and how to read it."""

    path: Path
    file_name: str
    # One of FORMATS, or "" to tell it from the file.
    format: str = ""
    # The caller's signature; None (or no inputs) means "read it from the graph".
    signature: common_pb2.Signature | None = None
    factory: str = ""
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportedModel:
    """The checked model: the ONNX graph to register and what the version records."""

    format: str
    onnx_path: Path
    signature: ann.ModelSignature
    opset: int
    parameter_count: int
    framework: str
    # JSON-able: {"signature": ..., "import": {...}} for the version's config.
    config: dict[str, Any]


def import_model(spec: ImportSpec, work_dir: Path) -> ImportedModel:
    """Reads, checks and (for torch files) exports ``spec``; InvalidArgument on any problem."""
    fmt = detect_format(spec)
    if fmt == ONNX:
        return _import_onnx(spec)
    return _import_torch(spec, fmt, work_dir)


def detect_format(spec: ImportSpec) -> str:
    """The format asked for, or the one the file shows (ONNX protobuf or TorchScript zip)."""
    if spec.format:
        if spec.format not in FORMATS:
            raise InvalidArgument("format", f"{spec.format!r} is not one of {', '.join(FORMATS)}")
        return spec.format
    if spec.factory:
        return STATE_DICT
    if not zipfile.is_zipfile(spec.path):
        return ONNX
    with zipfile.ZipFile(spec.path) as archive:
        # torch.jit.save writes the model's code under <archive>/code/; torch.save does not.
        if any("/code/" in name for name in archive.namelist()):
            return TORCHSCRIPT
    raise InvalidArgument(
        "factory",
        f"{spec.file_name} looks like a torch.save file (a state dict): give the factory "
        "('package.module:factory') that builds its network",
    )


# ======================================================================== ONNX


def _import_onnx(spec: ImportSpec) -> ImportedModel:
    graph_signature, opset, parameters = read_onnx(spec.path, spec.file_name)
    signature = graph_signature
    if spec.signature is not None and (spec.signature.inputs or spec.signature.outputs):
        signature = _merge_given(graph_signature, spec.signature)
    check_onnxruntime_loads(spec.path, spec.file_name)
    config = {"signature": signature.to_dict(), "import": {"format": ONNX, "file": spec.file_name}}
    return ImportedModel(ONNX, spec.path, signature, opset, parameters, "onnx", config)


def read_onnx(path: Path, file_name: str) -> tuple[ann.ModelSignature, int, int]:
    """The graph's signature, its default-domain opset and its parameter count."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise InvalidArgument(SOURCE, f"{file_name} is not an ONNX model: {err}") from err
    if not model.ir_version:
        # Protobuf parses many byte strings (an empty file) as an empty ModelProto.
        raise InvalidArgument(SOURCE, f"{file_name} is not an ONNX model: it has no ir_version")
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if not inputs:
        raise InvalidArgument(SOURCE, f"the graph of {file_name} has no inputs")
    unnamed = [index for index, value in enumerate(inputs) if not value.name.strip()]
    if unnamed:
        raise InvalidArgument(
            SOURCE, f"the graph of {file_name} has unnamed inputs (positions {unnamed})"
        )
    if not graph.output:
        raise InvalidArgument(SOURCE, f"the graph of {file_name} has no outputs")
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer):
        raise InvalidArgument(
            SOURCE, f"{file_name} keeps its weights in external data files: save it as one file"
        )
    signature = ann.ModelSignature(
        inputs=tuple(_tensor_spec(value, file_name) for value in inputs),
        outputs=tuple(_tensor_spec(value, file_name) for value in _inferred_outputs(model)),
        task="",
        loss="",
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    parameters = sum(math.prod(init.dims) for init in graph.initializer)
    return signature, int(opset), int(parameters)


def _inferred_outputs(model: Any) -> Sequence[Any]:
    """The graph's outputs with the dims ONNX shape inference can fix filled in.

    Exporters often leave an output dim symbolic ("Divembedding_dim_1") that the graph
    fixes (384): inference turns it into the number, so the signature says it.
    """
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model).graph.output
    except Exception:
        return model.graph.output


def _tensor_spec(value: Any, file_name: str) -> ann.TensorSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        raise InvalidArgument(
            SOURCE, f"{value.name!r} of {file_name} is not a tensor (sequences and maps are not)"
        )
    tensor = value.type.tensor_type
    datatype = _ONNX_TO_KSERVE.get(tensor.elem_type)
    if datatype is None:
        raise InvalidArgument(
            SOURCE,
            f"{value.name!r} of {file_name} has ONNX element type {tensor.elem_type}, "
            "which has no KServe datatype",
        )
    # A dim_param ("batch", "sequence") or a missing value is variable: -1.
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim
    )
    return ann.TensorSpec(value.name, datatype, shape)


def _merge_given(graph: ann.ModelSignature, given: common_pb2.Signature) -> ann.ModelSignature:
    """The caller's signature, checked against the graph's; missing sides come from the graph."""
    inputs = graph.inputs
    if given.inputs:
        inputs = tuple(
            _checked(tensor, graph.inputs, f"signature.inputs[{i}]")
            for i, tensor in enumerate(given.inputs)
        )
        missing = {t.name for t in graph.inputs} - {t.name for t in inputs}
        if missing:
            raise InvalidArgument(
                "signature.inputs", f"leaves out graph inputs {', '.join(sorted(missing))}"
            )
    outputs = graph.outputs
    if given.outputs:
        outputs = tuple(
            _checked(tensor, graph.outputs, f"signature.outputs[{i}]")
            for i, tensor in enumerate(given.outputs)
        )
    return ann.ModelSignature(inputs=inputs, outputs=outputs, task="", loss="")


def _checked(
    tensor: common_pb2.TensorSpec, graph: Sequence[ann.TensorSpec], field_path: str
) -> ann.TensorSpec:
    by_name = {t.name: t for t in graph}
    found = by_name.get(tensor.name)
    if found is None:
        raise InvalidArgument(
            f"{field_path}.name",
            f"{tensor.name!r} is not in the graph (it has {', '.join(by_name)})",
        )
    datatype = tensor.datatype.upper() or found.datatype
    if datatype != found.datatype:
        raise InvalidArgument(
            f"{field_path}.datatype", f"is {datatype}, but the graph says {found.datatype}"
        )
    shape = tuple(tensor.shape) or found.shape
    if found.shape and len(shape) != len(found.shape):
        raise InvalidArgument(
            f"{field_path}.shape", f"has {len(shape)} dims, the graph {len(found.shape)}"
        )
    for index, (dim, fixed) in enumerate(zip(shape, found.shape, strict=False)):
        if fixed != -1 and dim != fixed:
            raise InvalidArgument(
                f"{field_path}.shape", f"dim {index} is {dim}, but the graph fixes it at {fixed}"
            )
    return ann.TensorSpec(found.name, datatype, shape)


def check_onnxruntime_loads(path: Path, file_name: str) -> None:
    """InvalidArgument on ``source_uri`` when onnxruntime cannot build a session."""
    try:
        ann.onnx_session(path)
    except Exception as err:
        raise InvalidArgument(SOURCE, f"{file_name} does not load in onnxruntime: {err}") from err


# ======================================================================= torch


def _import_torch(spec: ImportSpec, fmt: str, work_dir: Path) -> ImportedModel:
    signature = _torch_signature(spec.signature)
    module = _load_torchscript(spec) if fmt == TORCHSCRIPT else _load_state_dict(spec)
    module.eval()
    signature = _with_output_shape(module, signature)
    onnx_path = work_dir / "model.onnx"
    try:
        result = ann.export_onnx(module, signature, onnx_path, sample=_sample(signature, 0))
    except Exception as err:
        raise InvalidArgument(
            SOURCE, f"{spec.file_name} could not be exported to ONNX and checked: {err}"
        ) from err
    graph_signature, opset, _ = read_onnx(onnx_path, "the exported graph")
    check_onnxruntime_loads(onnx_path, "the exported graph")
    details: dict[str, Any] = {
        "format": fmt,
        "file": spec.file_name,
        "onnx_max_abs_diff": result.max_abs_diff,
    }
    if fmt == STATE_DICT:
        details["factory"] = spec.factory
        details["factory_kwargs"] = dict(spec.factory_kwargs)
    config = {"signature": graph_signature.to_dict(), "import": details}
    parameters = sum(p.numel() for p in module.parameters())
    return ImportedModel(fmt, onnx_path, graph_signature, opset, int(parameters), "pytorch", config)


def _torch_signature(given: common_pb2.Signature | None) -> ann.ModelSignature:
    """The caller's inputs (required: a torch file does not say what it takes), one output."""
    if given is None or not given.inputs:
        raise InvalidArgument(
            "signature.inputs",
            "is required for a TorchScript file or a state dict: name each input with its "
            "datatype and shape (-1 for the batch axis), for example input:FP32:-1x8",
        )
    inputs = []
    for index, tensor in enumerate(given.inputs):
        path = f"signature.inputs[{index}]"
        if not tensor.name:
            raise InvalidArgument(f"{path}.name", "is required")
        datatype = tensor.datatype.upper()
        if datatype not in _TORCH_DTYPES:
            raise InvalidArgument(
                f"{path}.datatype",
                f"{tensor.datatype!r} is not one of {', '.join(_TORCH_DTYPES)}",
            )
        if not tensor.shape or any(dim < -1 or dim == 0 for dim in tensor.shape):
            raise InvalidArgument(
                f"{path}.shape", "is required: positive dims, or -1 for variable ones"
            )
        inputs.append(ann.TensorSpec(tensor.name, datatype, tuple(tensor.shape)))
    if len(given.outputs) > 1:
        raise InvalidArgument(
            "signature.outputs", "a torch import has one output tensor; give at most one"
        )
    output = given.outputs[0] if given.outputs else common_pb2.TensorSpec(name="output")
    if not output.name:
        raise InvalidArgument("signature.outputs[0].name", "is required")
    return ann.ModelSignature(
        inputs=tuple(inputs),
        outputs=(ann.TensorSpec(output.name, "FP32", tuple(output.shape)),),
        task="",
        loss="",
    )


def _load_torchscript(spec: ImportSpec) -> Any:
    import torch

    try:
        return torch.jit.load(str(spec.path), map_location="cpu")
    except Exception as err:
        raise InvalidArgument(
            SOURCE, f"{spec.file_name} is not a TorchScript file torch.jit.load can read: {err}"
        ) from err


def _load_state_dict(spec: ImportSpec) -> Any:
    import torch

    if not spec.factory:
        raise InvalidArgument(
            "factory", "is required for a state dict: 'package.module:factory' building the network"
        )
    try:
        # weights_only: a state dict holds tensors; refusing pickled code keeps the import safe.
        state = torch.load(str(spec.path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidArgument(
            SOURCE, f"{spec.file_name} is not a state dict torch.load can read: {err}"
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise InvalidArgument(SOURCE, f"{spec.file_name} does not hold a state dict of tensors")
    factory = load_factory(spec.factory, "factory")
    try:
        module = factory(**dict(spec.factory_kwargs))
    except Exception as err:
        raise UserCodeError(
            "factory", f"{spec.factory} raised {err!r}", traceback.format_exc()
        ) from err
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgument(
            "factory", f"{spec.factory} returned {type(module).__name__}, not a torch.nn.Module"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as err:
        raise InvalidArgument(
            SOURCE, f"{spec.file_name} does not fit the network of {spec.factory}: {err}"
        ) from err
    return module


def _sample(signature: ann.ModelSignature, variant: int) -> tuple[Any, ...]:
    """Inputs shaped like the signature: batch SAMPLE_ROWS, other variable dims 5 or 7.

    Integer inputs get 1s (valid token ids, attention masks and category indices
    alike); floats get seeded normal values.
    """
    import torch

    generator = torch.Generator().manual_seed(variant)
    tensors = []
    for spec in signature.inputs:
        shape = [
            SAMPLE_ROWS if (i == 0 and d == -1) else (VARIABLE_SIZES[variant] if d == -1 else d)
            for i, d in enumerate(spec.shape)
        ]
        dtype = getattr(torch, _TORCH_DTYPES[spec.datatype])
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.ones(shape, dtype=dtype))
    return tuple(tensors)


def _with_output_shape(module: Any, signature: ann.ModelSignature) -> ann.ModelSignature:
    """The output's shape from two forward passes: dims that change with the inputs are -1."""
    import torch

    shapes = []
    for variant in (0, 1):
        try:
            with torch.no_grad():
                output = module(*_sample(signature, variant))
        except Exception as err:
            raise InvalidArgument(
                "signature.inputs", f"the network fails on inputs of this signature: {err}"
            ) from err
        if not isinstance(output, torch.Tensor):
            raise InvalidArgument(
                "signature.outputs",
                f"the network returns {type(output).__name__}; one tensor is supported",
            )
        shapes.append(tuple(output.shape))
    first, second = shapes
    if len(first) != len(second) or not first:
        raise InvalidArgument("signature.outputs", f"output shapes {first} and {second} differ")
    shape = tuple(
        -1 if (i == 0 or a != b) else a for i, (a, b) in enumerate(zip(first, second, strict=True))
    )
    given = signature.outputs[0]
    if given.shape and len(given.shape) != len(shape):
        raise InvalidArgument(
            "signature.outputs[0].shape", f"has {len(given.shape)} dims, the network gives {shape}"
        )
    output = ann.TensorSpec(given.name, "FP32", given.shape or shape)
    return ann.ModelSignature(signature.inputs, (output,), signature.task, signature.loss)


def spec_from_request(request: registry_pb2.ImportModelVersionRequest) -> ImportSpec:
    """The request's import options, checked; the file's path is filled in once fetched."""
    if not request.source_uri:
        raise InvalidArgument(
            "source_uri", "is required: upload the model file with UploadArtifact, pass its uri"
        )
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"is longer than {MAX_REQUEST_ID} characters")
    file_name = PurePosixPath(request.file_name).name or PurePosixPath(request.source_uri).name
    if len(file_name) > MAX_FILE_NAME:
        raise InvalidArgument("file_name", f"is longer than {MAX_FILE_NAME} characters")
    formats = {
        registry_pb2.MODEL_FORMAT_UNSPECIFIED: "",
        registry_pb2.MODEL_FORMAT_ONNX: ONNX,
        registry_pb2.MODEL_FORMAT_TORCHSCRIPT: TORCHSCRIPT,
        registry_pb2.MODEL_FORMAT_STATE_DICT: STATE_DICT,
    }
    if request.format not in formats:
        raise InvalidArgument("format", f"{request.format} is not a ModelFormat")
    if request.factory and request.format not in (
        registry_pb2.MODEL_FORMAT_UNSPECIFIED,
        registry_pb2.MODEL_FORMAT_STATE_DICT,
    ):
        raise InvalidArgument("factory", "is only used with a state dict")
    kwargs = (
        json_format.MessageToDict(request.factory_kwargs)
        if request.HasField("factory_kwargs")
        else {}
    )
    return ImportSpec(
        path=Path(),
        file_name=file_name,
        format=formats[request.format],
        signature=request.signature if request.HasField("signature") else None,
        factory=request.factory,
        factory_kwargs=_whole_numbers(kwargs),
    )


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles: whole ones go back to ints (layer sizes, counts)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def check_template(template: registry_pb2.ModelVersion) -> None:
    """The import fills these itself: a caller's value would be silently lost."""
    for name in ("artifacts", "signature", "framework", "opset", "parameter_count"):
        value = getattr(template, name)
        is_set = template.HasField(name) if name == "signature" else bool(value)
        if is_set:
            raise InvalidArgument(
                f"model_version.{name}", "is filled by the import: leave it empty"
            )


def merged_config(imported: ImportedModel, given: Mapping[str, Any]) -> dict[str, Any]:
    """The import's config under the caller's ``model_version.config``.

    The caller's keys are kept (``task``, ``classes``, ``query_column``,
    ``preprocessing``: what evaluation and serving read), except ``import``, which
    the import writes. The caller's ``signature`` may add what a file cannot say:
    ``task``, ``loss``, ``label_column``, ``classes``, and each input's dataset
    ``columns`` (by input name), so that compression can feed the model from a
    dataset; top-level ``task`` and ``classes`` go into the signature too. Without
    it the config has no ``signature`` (the version's own signature field has the
    tensors), as compression then feeds a single input from all feature columns.
    """
    field_path = "model_version.config"
    if "import" in given:
        raise InvalidArgument(f"{field_path}.import", "is written by the import: leave it out")
    wanted = given.get("signature") or {}
    if not isinstance(wanted, Mapping):
        raise InvalidArgument(f"{field_path}.signature", "must be an object")
    if not wanted:
        # No dataset columns known: a config signature without them would stop
        # compression from falling back to "one input of all feature columns".
        return {**given, "import": imported.config["import"]}
    signature = dict(imported.config["signature"])
    for key in ("task", "classes"):
        if key in given and key not in wanted:
            signature[key] = given[key]
    for key in ("task", "loss", "label_column", "classes"):
        if key in wanted:
            signature[key] = wanted[key]
    by_name = {item["name"]: dict(item) for item in signature["inputs"]}
    for index, item in enumerate(wanted.get("inputs") or ()):
        name = item.get("name") if isinstance(item, Mapping) else None
        if name not in by_name:
            raise InvalidArgument(
                f"{field_path}.signature.inputs[{index}].name",
                f"{name!r} is not an input of the model ({', '.join(by_name)})",
            )
        by_name[name]["columns"] = [str(c) for c in item.get("columns") or ()]
    signature["inputs"] = list(by_name.values())
    try:
        ann.ModelSignature.from_dict(signature)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"{field_path}.signature", str(err)) from err
    return {**given, **imported.config, "signature": signature}


def exported_file_name(file_name: str) -> str:
    """``net.pt`` -> ``net.onnx``; never the original's own name (a torch file called x.onnx)."""
    exported = f"{PurePosixPath(file_name).stem}.onnx"
    return exported if exported != file_name else f"{PurePosixPath(file_name).stem}.exported.onnx"


def version_of(
    imported: ImportedModel,
    template: registry_pb2.ModelVersion,
    artifacts: Sequence[common_pb2.Artifact],
) -> registry_pb2.ModelVersion:
    """The new version: the caller's description, tags, card, metrics and source + the import."""
    version = registry_pb2.ModelVersion(
        description=template.description,
        tags=template.tags,
        model_card=template.model_card,
        metrics=template.metrics,
        source=template.source,
        artifacts=artifacts,
        signature=imported.signature.to_proto(),
        framework=imported.framework,
        opset=imported.opset,
        parameter_count=imported.parameter_count,
    )
    given = json_format.MessageToDict(template.config.values) if template.HasField("config") else {}
    version.config.values.update(as_json(merged_config(imported, given)))
    return version


def as_json(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict with NaN/inf replaced by None (Struct cannot hold them)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, np.generic):
            return clean(value.item())
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean(dict(values))
