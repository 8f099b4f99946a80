"""INT8 options for attention models: per-channel and MatMul-only by default (the embedding
table's Gather stays float), everything explicit honoured; plain MLPs keep the old defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aimass.compression import onnx_steps as ox


def attention_like(path: Path, softmax: bool) -> Path:
    """tokens -> Gather(embedding) -> MatMul -> [Softmax] -> MatMul -> logits."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "w1"], ["hidden"]),
        helper.make_node("Softmax" if softmax else "Relu", ["hidden"], ["mixed"], **(
            {"axis": -1} if softmax else {})),
        helper.make_node("MatMul", ["mixed", "w2"], ["logits"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [-1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 8, 4])],
        initializer=weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_defaults_follow_attention(tmp_path):
    attention = attention_like(tmp_path / "attention.onnx", softmax=True)
    plain = attention_like(tmp_path / "plain.onnx", softmax=False)
    assert ox.has_attention(attention)
    assert not ox.has_attention(plain)
    assert ox.int8_defaults(attention, None, []) == (True, ["MatMul"])
    assert ox.int8_defaults(plain, None, []) == (False, [])
    # Explicit choices win.
    assert ox.int8_defaults(attention, False, ["MatMul", "Gather"]) == (False, ["MatMul", "Gather"])


def test_matmul_only_leaves_the_embedding_gather_in_float(tmp_path):
    source = attention_like(tmp_path / "attention.onnx", softmax=True)
    matmul_only = tmp_path / "matmul.onnx"
    ox.quantize_dynamic(source, matmul_only, per_channel=True, op_types_to_quantize=["MatMul"])
    everything = tmp_path / "all.onnx"
    ox.quantize_dynamic(source, everything, op_types_to_quantize=["MatMul", "Gather"])
    assert "Gather" in ops(matmul_only)
    assert "MatMulInteger" in ops(matmul_only) or "DynamicQuantizeMatMul" in ops(matmul_only)
    initializers = {i.name: i.data_type for i in onnx.load(str(matmul_only)).graph.initializer}
    assert initializers["embedding"] == TensorProto.FLOAT
    quantized = {i.name: i.data_type for i in onnx.load(str(everything)).graph.initializer}
    assert "embedding" not in quantized  # with Gather in the list, the table is INT8
    assert quantized["embedding_quantized"] in (TensorProto.INT8, TensorProto.UINT8)
