"""Protobuf wire helpers of the data plane: requests forwarded as bytes, never rebuilt.

``PredictRequest`` has the field numbers and types of Triton's
``ModelInferRequest`` (1-7), and ``PredictResponse`` those of
``ModelInferResponse`` (1-6). A protobuf parser keeps the last value of a
repeated scalar field, so the router forwards the caller's bytes with Triton's
model name and version appended as fields 1 and 2, and answers with Triton's
bytes with the deployment and version appended: no tensor is copied into a
new message. Field 8 (routing_key) is unknown to Triton, which ignores it.
"""

from __future__ import annotations

import math

import numpy as np

from aimass.common.v1 import common_pb2
from aimass.core.errors import FieldViolation, InvalidArgument
from aimass.routing.repository import Signature

# Bytes per element of each fixed-size KServe datatype.
ITEM_SIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
}

NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT16": np.int16,
    "FP16": np.float16,
    "UINT32": np.uint32,
    "INT32": np.int32,
    "FP32": np.float32,
    "UINT64": np.uint64,
    "INT64": np.int64,
    "FP64": np.float64,
}
KSERVE_TYPES = {np.dtype(v).str: k for k, v in NUMPY_TYPES.items()}


def string_field(number: int, value: str) -> bytes:
    """The wire bytes of a string field: tag, length, UTF-8."""
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def datatype_of(array: np.ndarray) -> str:
    """KServe datatype of a numpy array (object/str arrays are BYTES)."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    name = KSERVE_TYPES.get(array.dtype.newbyteorder("<").str)
    if name is None:
        raise InvalidArgument("inputs", f"numpy dtype {array.dtype} has no KServe datatype")
    return name


def validate_inputs(
    inputs: list[common_pb2.InferTensor],
    raw: list[bytes],
    signature: Signature,
    max_batch_size: int,
) -> None:
    """Refuses a request that does not fit the signature, naming each bad field.

    Checks: every input known and given once, datatype, rank and fixed
    dimensions, batch size against ``max_batch_size``, and the byte length
    of each raw tensor against its shape.
    """
    problems: list[FieldViolation] = []
    seen: set[str] = set()
    if raw and len(raw) != len(inputs):
        problems.append(
            FieldViolation(
                "raw_input_contents",
                f"has {len(raw)} entries for {len(inputs)} inputs: give one per input",
            )
        )
    for index, tensor in enumerate(inputs):
        problems.extend(_check_tensor(index, tensor, raw, signature, max_batch_size, seen))
    missing = [t.name for t in signature.inputs if t.name not in seen]
    if missing and not problems:
        problems.append(FieldViolation("inputs", f"missing input(s) {', '.join(missing)}"))
    if problems:
        first, *more = problems
        raise InvalidArgument(first.field, first.description, *more)


class InputCheck:
    """A signature's inputs precomputed for the common case of Predict: a valid request.

    :meth:`passes` answers whether a request fits, with no message and no
    allocation beyond the loop; a request that does not pass goes through
    :func:`validate_inputs`, which names every bad field (and is the authority).
    """

    def __init__(self, signature: Signature, max_batch_size: int) -> None:
        self.specs = {
            t.name: (t.datatype, t.shape, ITEM_SIZE.get(t.datatype, 0)) for t in signature.inputs
        }
        self.max_batch_size = max_batch_size

    def passes(self, inputs: list[common_pb2.InferTensor], raw: list[bytes]) -> bool:
        specs = self.specs
        if len(inputs) != len(specs) or (raw and len(raw) != len(inputs)):
            return False
        names = set()
        for index, tensor in enumerate(inputs):
            spec = specs.get(tensor.name)
            if spec is None or tensor.datatype != spec[0]:
                return False
            names.add(tensor.name)
            shape, want = tensor.shape, spec[1]
            if len(shape) != len(want):
                return False
            elements = 1
            for got, fixed in zip(shape, want, strict=True):
                if got < 0 or (fixed >= 0 and got != fixed):
                    return False
                elements *= got
            if self.max_batch_size > 0 and shape and shape[0] > self.max_batch_size:
                return False
            if raw and spec[2] and len(raw[index]) != elements * spec[2]:
                return False
        return len(names) == len(specs)


def _check_tensor(
    index: int,
    tensor: common_pb2.InferTensor,
    raw: list[bytes],
    signature: Signature,
    max_batch_size: int,
    seen: set[str],
) -> list[FieldViolation]:
    where = f"inputs[{index}]"
    spec = signature.input(tensor.name)
    if spec is None:
        known = ", ".join(t.name for t in signature.inputs)
        return [FieldViolation(f"{where}.name", f"unknown input {tensor.name!r}; inputs: {known}")]
    if tensor.name in seen:
        return [FieldViolation(f"{where}.name", f"input {tensor.name!r} is given twice")]
    seen.add(tensor.name)
    if tensor.datatype != spec.datatype:
        return [
            FieldViolation(
                f"{where}.datatype", f"is {tensor.datatype!r}; {spec.name!r} takes {spec.datatype}"
            )
        ]
    shape = list(tensor.shape)
    if (
        len(shape) != len(spec.shape)
        or any(want >= 0 and got != want for got, want in zip(shape, spec.shape, strict=False))
        or any(d < 0 for d in shape)
    ):
        return [
            FieldViolation(
                f"{where}.shape",
                f"is {shape}; {spec.name!r} takes {list(spec.shape)} (-1: any size)",
            )
        ]
    if max_batch_size > 0 and shape and shape[0] > max_batch_size:
        return [
            FieldViolation(
                f"{where}.shape",
                f"batch of {shape[0]} is larger than the deployment's max_batch_size"
                f" {max_batch_size}",
            )
        ]
    if raw and index < len(raw) and spec.datatype in ITEM_SIZE:
        want = math.prod(shape) * ITEM_SIZE[spec.datatype]
        if len(raw[index]) != want:
            return [
                FieldViolation(
                    f"raw_input_contents[{index}]",
                    f"has {len(raw[index])} bytes; shape {shape} of {spec.datatype} needs {want}",
                )
            ]
    return []


def tensor_to_numpy(tensor: common_pb2.InferTensor, raw: bytes | None) -> np.ndarray:
    """One input as a numpy array, from its raw bytes or its typed contents."""
    shape = tuple(tensor.shape)
    if tensor.datatype == "BYTES":
        items = _split_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        return np.array(items, dtype=np.object_).reshape(shape)
    dtype = NUMPY_TYPES[tensor.datatype]
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    contents = tensor.contents
    for values in (
        contents.fp32_contents,
        contents.fp64_contents,
        contents.int_contents,
        contents.int64_contents,
        contents.uint_contents,
        contents.uint64_contents,
        contents.bool_contents,
    ):
        if len(values):
            return np.asarray(values, dtype=dtype).reshape(shape)
    return np.zeros(shape, dtype=dtype)


def numpy_to_raw(array: np.ndarray) -> bytes:
    """Little-endian row-major bytes; BYTES elements each prefixed by a 4-byte length."""
    if array.dtype.kind in "OUS":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _split_bytes(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        size = int.from_bytes(raw[pos : pos + 4], "little")
        items.append(raw[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return items
