"""Parameter compression of an ONNX file with onnxruntime: INT8, FP16, graph optimization.

Each function reads ``source`` and writes ``target`` (a new file), never
touching the source. A technique that cannot apply to the graph raises
:class:`StepSkipped` naming the operators involved, so the recipe reports the
step as SKIPPED instead of producing a model that is not what was asked for.

    quantize_dynamic(src, dst, per_channel=False)
    quantize_static(src, dst, calibration_feeds, method="minmax", op_types_to_exclude=["Softmax"])
    convert_fp16(src, dst, keep_io_types=True)
    optimize_graph(src, dst, level="extended")

Static quantization runs ``quant_pre_process`` (shape inference and ORT's
basic optimizations) first, as measured on this machine (MEASURED.md): the
QDQ graph of a pre-processed model is the one that runs fast.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

# Operators with weights that each technique turns into integer kernels.
DYNAMIC_OPS = ("MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU", "EmbedLayerNormalization")
STATIC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Attention")
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


# Attention graphs: INT8 on MatMul only, per channel (BYOM measurement on MiniLM: also
# quantizing the embedding Gather, or per-tensor scales, dropped cosine below 0.99).
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "com.microsoft.Attention",
                 "com.microsoft.MultiHeadAttention")  # fmt: skip
ATTENTION_QUANTIZED_OPS = ("MatMul",)


class StepSkipped(Exception):
    """The technique does not apply to this model; the message says why (naming operators)."""


def op_types(path: Path) -> list[str]:
    """Operator types of the graph (and nested graphs), sorted, each once."""
    model = onnx.load(str(path), load_external_data=False)
    found: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add(
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            )
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(model.graph)
    return sorted(found)


def has_attention(path: Path) -> bool:
    """Whether the graph computes attention: an attention operator, or Softmax over MatMuls."""
    present = set(op_types(path))
    return bool(present & set(ATTENTION_OPS)) or {"Softmax", "MatMul"} <= present


def int8_defaults(
    path: Path, per_channel: bool | None, op_types_to_quantize: Sequence[str]
) -> tuple[bool, list[str]]:
    """The per-channel flag and operator types a step uses when the request leaves them out."""
    attention = has_attention(path)
    chosen = list(op_types_to_quantize) or (list(ATTENTION_QUANTIZED_OPS) if attention else [])
    return (attention if per_channel is None else per_channel), chosen


def _custom_ops(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted(
        {f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS}
    )


def require_ops(path: Path, technique: str, supported: Sequence[str]) -> None:
    """StepSkipped unless the graph has an operator the technique handles and no custom ones."""
    custom = _custom_ops(path)
    if custom:
        raise StepSkipped(
            f"{technique} does not support the custom operator(s) {', '.join(custom)}"
        )
    present = op_types(path)
    if not any(op in supported for op in present):
        raise StepSkipped(
            f"{technique} quantizes {', '.join(supported)}; this graph has none "
            f"(its operators: {', '.join(present)}), so nothing would change"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs warnings per node at INFO/WARNING: keep the job log short."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quant_type(name: str) -> object:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def quantize_dynamic(
    source: Path,
    target: Path,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: str = "int8",
    op_types_to_quantize: Sequence[str] = (),
) -> None:
    """INT8 weights, activations quantized at run time (MatMul/Gemm/Conv -> integer ops).

    ``op_types_to_quantize`` empty: every operator type ``DYNAMIC_OPS`` names.
    """
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    require_ops(source, "dynamic INT8 quantization", op_types_to_quantize or DYNAMIC_OPS)
    with _quiet():
        ort_quantize_dynamic(
            str(source),
            str(target),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=_quant_type(weight_type),
            op_types_to_quantize=list(op_types_to_quantize) or None,
            # A graph ORT already optimized offline holds contrib operators (FusedGemm...)
            # whose outputs shape inference leaves untyped: they are float, so say so
            # instead of failing; those fused operators stay in float (the recipe quantizes
            # before the optimization when it ran the optimization itself).
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


class _Feeds:
    """CalibrationDataReader over a list of feed dicts (one batch each)."""

    def __init__(self, batches: Sequence[dict[str, np.ndarray]]) -> None:
        self._iterator = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)

    def rewind(self) -> None:  # pragma: no cover - only used by some calibrators
        pass


def quantize_static(
    source: Path,
    target: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    per_channel: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    op_types_to_exclude: Sequence[str] = (),
    quant_format: str = "qdq",
    activation_type: str = "uint8",
    weight_type: str = "int8",
    op_types_to_quantize: Sequence[str] = (),
) -> None:
    """INT8 weights and activations, ranges calibrated on ``calibration`` batches.

    ``op_types_to_quantize`` empty: every operator type of the graph, less
    ``op_types_to_exclude``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    require_ops(source, "static INT8 quantization", op_types_to_quantize or STATIC_OPS)
    if not calibration:
        raise ValueError("static quantization needs at least one calibration batch")
    present = set(op_types(source))
    excluded_ops = set(op_types_to_exclude)
    if present & set(STATIC_OPS) <= excluded_ops:
        raise StepSkipped(
            f"op_types_to_exclude keeps every quantizable operator "
            f"({', '.join(sorted(present & set(STATIC_OPS)))}) in float: nothing to quantize"
        )
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    extra: dict[str, object] = {}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    wanted = set(op_types_to_quantize) or present
    quantized_ops = sorted((present & wanted) - excluded_ops)
    with tempfile.TemporaryDirectory() as scratch, _quiet():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        ort_quantize_static(
            str(prepared),
            str(target),
            _Feeds(calibration),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=quantized_ops,
            per_channel=per_channel,
            activation_type=_quant_type(activation_type),
            weight_type=_quant_type(weight_type),
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=methods[method],
            extra_options=extra,
        )


def convert_fp16(
    source: Path, target: Path, *, keep_io_types: bool = True, op_block_list: Sequence[str] = ()
) -> None:
    """Weights and ops in float16; with ``keep_io_types`` the inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    custom = _custom_ops(source)
    if custom:
        raise StepSkipped(f"FP16 conversion does not support the custom operator(s) {custom}")
    model = onnx.load(str(source))
    with _quiet():
        converted = convert_float_to_float16(
            model,
            keep_io_types=keep_io_types,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list)),
        )
    onnx.save(converted, str(target))


GRAPH_LEVELS = ("basic", "extended", "all")


def optimize_graph(source: Path, target: Path, *, level: str = "extended") -> None:
    """ORT graph optimizations (constant folding, fusions) saved into ``target``."""
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
