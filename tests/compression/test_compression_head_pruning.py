"""Structured pruning of attention heads that really removes them: a transformer with half its
heads (and feed-forward neurons) is a smaller catalogue network, rebuilt from its spec, exported
to ONNX, and its attention computes what torch's layer computes while no head is removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import torch

from aimass.compression import structural as sx
from aimass.core import nn as ann
from aimass.core.nn import networks

SPEC = {"transformer": {"vocab_size": 50, "max_sequence_length": 16, "d_model": 32,
                        "num_layers": 2, "num_heads": 4}}  # fmt: skip


def token_table(rows: int = 64) -> pa.Table:
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 50, size=(rows, 16))
    seqs[:, 12:] = 0  # padding
    columns = {f"t{i}": seqs[:, i].astype(np.int64) for i in range(16)}
    columns["label"] = rng.integers(0, 3, size=rows).astype(np.int64)
    return pa.table(columns)


def transformer() -> tuple[sx.TorchModel, torch.Tensor]:
    table = token_table()
    data = ann.data_signature_from_table(table, "label")
    model = sx.build_student(ann.spec_from_dict(SPEC), data)
    model.module.eval()
    inputs, _ = ann.table_to_tensors(table, model.signature)
    return model, inputs[0]


def test_head_layers_compute_torchs_encoder_layer_from_its_state_dict() -> None:
    torch.manual_seed(0)
    reference = networks.TransformerClassifier(50, 16, 32, 2, 4, 3, feedforward_dim=64)
    own = networks.TransformerClassifier(50, 16, 32, 2, 4, 3, feedforward_dim=64, head_dim=8)
    assert isinstance(own.encoder.layers[0].self_attn, networks.HeadAttention)
    own.load_state_dict(reference.state_dict())  # same names and shapes: checkpoints load
    reference.eval()
    own.eval()
    tokens = torch.randint(1, 50, (5, 16))
    tokens[:, 10:] = 0
    tokens[2] = 0  # a row of padding only
    with torch.no_grad():
        assert torch.allclose(reference(tokens), own(tokens), atol=1e-5)


def test_half_the_heads_and_neurons_make_a_smaller_network(tmp_path: Path) -> None:
    model, tokens = transformer()
    pruned = sx.prune_structured(model, 0.5)
    spec = ann.spec_to_dict(pruned.spec)["transformer"]
    assert spec["num_heads"] == 2
    assert spec["head_dim"] == 8  # the parent's head width, kept
    assert spec["feedforward_dim"] == 64  # half of 4 * d_model
    assert spec["d_model"] == 32
    layer = pruned.module.encoder.layers[0]
    assert layer.self_attn.in_proj_weight.shape == (3 * 2 * 8, 32)
    assert layer.self_attn.out_proj.weight.shape == (32, 16)
    assert pruned.parameter_count <= 0.6 * model.parameter_count
    # The registered config rebuilds it: spec + data signature, then the state dict.
    rebuilt = ann.build_model(ann.spec_from_dict({"transformer": spec}), model.data)
    rebuilt.module.load_state_dict(pruned.module.state_dict())
    rebuilt.module.eval()
    with torch.no_grad():
        expected = pruned.module(tokens[:8]).numpy()
        assert np.allclose(rebuilt.module(tokens[:8]).numpy(), expected, atol=1e-6)
    path = tmp_path / "pruned.onnx"
    ann.export_onnx(pruned.module, pruned.signature, path, sample=(tokens[:8],))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    answered = session.run(None, {name: tokens[:8].numpy()})[0]
    assert np.allclose(answered, expected, atol=1e-4)


def test_the_strongest_heads_are_kept() -> None:
    model, _ = transformer()
    attention = model.module.encoder.layers[0].self_attn
    with torch.no_grad():  # head 3 of layer 0 carries nothing: it must be the one removed
        inner = 32
        for block in range(3):
            attention.in_proj_weight[block * inner + 24 : block * inner + 32] = 0
        attention.out_proj.weight[:, 24:32] = 0
    pruned = sx.prune_structured(model, 0.25, "heads")
    assert ann.spec_to_dict(pruned.spec)["transformer"]["num_heads"] == 3
    # Removing a head that contributed nothing leaves the layer's output unchanged.
    states = torch.randn(2, 4, 32)
    with torch.no_grad():
        kept = pruned.module.encoder.layers[0].self_attn(states, torch.zeros(2, 4))
        full = attention(states, states, states, need_weights=False)[0]
    assert torch.allclose(kept, full, atol=1e-5)
