"""The network catalogue: every architecture builds from a spec, trains, exports to ONNX
that onnxruntime runs like torch; bad specs are refused with the field named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from aimass.core import nn as ann
from aimass.core.errors import InvalidArgument
from aimass.data.v1 import data_pb2

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def digits() -> pa.Table:
    d = load_digits()
    return pa.table({**{f"p{i}": d.data[:, i] for i in range(64)}, "label": d.target})


@pytest.fixture(scope="module")
def tokens(digits) -> pa.Table:
    columns = {n: digits.column(n).cast(pa.int64()) for n in digits.column_names}
    return pa.table(columns)


@pytest.fixture(scope="module")
def ratings() -> pa.Table:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 20, 400), rng.integers(0, 30, 400)
    return pa.table({"user": users, "item": items, "clicked": (users + items) % 2})


CLASSIFIERS = {
    "mlp": {"mlp": {"hidden_sizes": [32], "activation": "gelu", "batch_norm": True}},
    "cnn1d": {"cnn1d": {"channels": [8, 8], "pool_size": 2, "hidden_sizes": [16]}},
    "cnn2d": {"cnn2d": {"channels": [8, 16], "pool_size": 2, "hidden_sizes": [32]}},
    "rnn_features": {"rnn": {"cell": "gru", "hidden_size": 16, "step_features": 8}},
}
TOKEN_CLASSIFIERS = {
    "rnn_tokens": {
        "rnn": {"hidden_size": 16, "vocab_size": 17, "embedding_dim": 8, "bidirectional": True}
    },
    "transformer_mean": {
        "transformer": {
            "vocab_size": 17,
            "max_sequence_length": 64,
            "d_model": 16,
            "num_layers": 2,
            "num_heads": 2,
        }
    },
    "transformer_cls": {
        "transformer": {
            "vocab_size": 17,
            "max_sequence_length": 32,
            "d_model": 16,
            "num_layers": 1,
            "num_heads": 4,
            "pooling": "cls",
        }
    },
}
RECOMMENDERS = {
    "two_tower": {
        "two_tower": {
            "user_column": "user",
            "item_column": "item",
            "embedding_dim": 8,
            "tower_sizes": [16, 8],
        }
    },
    "matrix_factorization": {
        "matrix_factorization": {
            "user_column": "user",
            "item_column": "item",
            "num_factors": 4,
            "use_bias": True,
        }
    },
}


def train_and_export(table: pa.Table, data: ann.DataSignature, spec: dict, tmp_path: Path):
    torch.manual_seed(0)
    built = ann.build_model(ann.spec_from_dict(spec), data)
    inputs, labels = ann.table_to_tensors(table, built.signature)
    loss_fn = ann.loss_function(built.signature)
    optimizer = torch.optim.Adam(built.module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn(built.module(*inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    sample = tuple(t[:16] for t in inputs)
    result = ann.export_onnx(built.module, built.signature, tmp_path / "m.onnx", sample=sample)
    return built, losses, result


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_feature_classifiers_train_and_export(name, digits, tmp_path):
    data = ann.data_signature_from_table(digits, "label")
    built, losses, result = train_and_export(
        digits.slice(0, 256), data, CLASSIFIERS[name], tmp_path
    )
    assert built.signature.inputs[0].shape == (-1, 64)
    assert built.signature.outputs[0].shape == (-1, 10)
    assert built.signature.classes == tuple(str(i) for i in range(10))
    assert losses[-1] < losses[0]
    assert result.max_abs_diff < 1e-4
    assert result.path.stat().st_size > 0


@pytest.mark.parametrize("name", list(TOKEN_CLASSIFIERS))
def test_token_classifiers_train_and_export(name, tokens, tmp_path):
    data = ann.data_signature_from_table(tokens, "label")
    built, losses, result = train_and_export(
        tokens.slice(0, 128), data, TOKEN_CLASSIFIERS[name], tmp_path
    )
    assert built.signature.inputs[0].datatype == "INT64"
    assert losses[-1] < losses[0]
    assert result.max_abs_diff < 1e-4


@pytest.mark.parametrize("name", list(RECOMMENDERS))
def test_recommenders_train_and_export(name, ratings, tmp_path):
    data = ann.data_signature_from_table(ratings, "clicked", task="ranking")
    built, losses, result = train_and_export(ratings, data, RECOMMENDERS[name], tmp_path)
    assert built.signature.input_names == ["user", "item"]
    assert built.signature.loss == "binary_cross_entropy"
    assert built.signature.outputs[0].shape == (-1, 1)
    assert losses[-1] < losses[0]
    assert result.max_abs_diff < 1e-4


def test_onnx_batch_axis_is_dynamic(digits, tmp_path):
    data = ann.data_signature_from_table(digits, "label")
    built, _, result = train_and_export(digits.slice(0, 64), data, CLASSIFIERS["mlp"], tmp_path)
    session = ann.onnx_session(result.path)
    inputs, _ = ann.table_to_tensors(digits.slice(0, 300), built.signature)
    (out,) = session.run(["output"], {"input": inputs[0].numpy()})
    built.module.eval()
    with torch.no_grad():
        expected = built.module(*inputs).numpy()
    assert out.shape == (300, 10)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_binary_classification_with_one_output(tmp_path):
    bc = load_breast_cancer()
    table = pa.table({**{f"f{i}": bc.data[:, i] for i in range(30)}, "y": bc.target})
    data = ann.data_signature_from_table(table, "y")
    spec = {"mlp": {"hidden_sizes": [16]}, "num_outputs": 1}
    built, losses, _ = train_and_export(table, data, spec, tmp_path)
    assert built.signature.loss == "binary_cross_entropy"
    assert built.signature.outputs[0].shape == (-1, 1)
    assert losses[-1] < losses[0]


def test_string_labels_map_to_sorted_classes():
    table = pa.table({"x": [0.0, 1.0, 2.0, 3.0], "y": ["b", "a", "c", "a"]})
    data = ann.data_signature_from_table(table, "y")
    built = ann.build_model(ann.spec_from_dict({"mlp": {"hidden_sizes": [4]}}), data)
    _, labels = ann.table_to_tensors(table, built.signature)
    assert built.signature.classes == ("a", "b", "c")
    assert labels.tolist() == [1, 0, 2, 0]


def test_regression_target():
    table = pa.table({"x": [0.0, 1.0, 2.0], "t": [0.5, 1.5, 2.5]})
    data = ann.data_signature_from_table(table, "t")
    built = ann.build_model(ann.spec_from_dict({"mlp": {"hidden_sizes": [4]}}), data)
    assert (built.signature.task, built.signature.loss) == ("regression", "mse")


def dataset_version() -> data_pb2.DatasetVersion:
    version = data_pb2.DatasetVersion(name="datasets/img/versions/3")
    version.config.label_column = "label"
    version.schema.add(name="image", type="fixed_size_list<item: uint8>[64]")
    version.schema.add(name="label", type="int64")
    for label in ("10", "2", "1"):
        version.label_distribution.add(label=label, count=5)
    return version


def test_signature_from_a_dataset_version():
    data = ann.data_signature_from_version(dataset_version())
    assert data.feature_width == 64
    assert data.task == "classification"
    assert data.classes == ("1", "2", "10")
    built = ann.build_model(ann.spec_from_dict({"cnn2d": {"channels": [4]}}), data)
    assert built.signature.inputs[0].columns == ("image",)
    proto = built.signature.to_proto()
    assert proto.inputs[0].shape == [-1, 64]
    assert proto.outputs[0].shape == [-1, 3]


def test_signatures_round_trip_and_rebuild():
    data = ann.data_signature_from_version(dataset_version())
    spec = ann.spec_from_dict({"mlp": {"hidden_sizes": [8], "activation": "tanh"}})
    torch.manual_seed(1)
    built = ann.build_model(spec, data)
    config = {"model": ann.spec_to_dict(spec), "data_signature": data.to_dict()}
    assert config["model"]["mlp"]["activation"] == "tanh"
    again = ann.rebuild_model(config)
    again.module.load_state_dict(built.module.state_dict())
    assert ann.ModelSignature.from_dict(built.signature.to_dict()) == built.signature
    assert again.signature == built.signature


def test_user_code_factory_gets_sizes_and_kwargs(digits):
    data = ann.data_signature_from_table(digits, "label")
    spec = ann.spec_from_dict(
        {"user_code": {"factory": "nn_user_models:tiny", "kwargs": {"hidden": 5}}}
    )
    built = ann.build_model(spec, data)
    assert built.module[0].out_features == 5
    assert built.module[0].in_features == 64


BAD_SPECS = [
    ({"mlp": {"hidden_sizes": [8]}, "input_size": 30}, "model.input_size", "64 wide"),
    ({"mlp": {"hidden_sizes": [0]}}, "model.mlp.hidden_sizes[0]", "positive"),
    ({"mlp": {"dropout": 1.5}}, "model.mlp.dropout", "[0, 1)"),
    ({"mlp": {}, "num_outputs": 3}, "model.num_outputs", "10 classes"),
    (
        {
            "transformer": {
                "vocab_size": 17,
                "max_sequence_length": 8,
                "d_model": 10,
                "num_layers": 1,
                "num_heads": 4,
            }
        },
        "model.transformer.d_model",
        "multiple",
    ),
    ({"cnn2d": {"input_channels": 3}}, "model.cnn2d.input_channels", "does not divide"),
    (
        {"two_tower": {"user_column": "nope", "item_column": "p1", "embedding_dim": 4}},
        "model.two_tower.user_column",
        "no column",
    ),
    ({}, "model", "set one architecture"),
    ({"user_code": {"factory": "no_colon"}}, "model.user_code.factory", "package.module"),
    (
        {"user_code": {"factory": "nn_user_models:not_a_module"}},
        "model.user_code.factory",
        "not a torch.nn.Module",
    ),
]


@pytest.mark.parametrize(("spec", "field", "words"), BAD_SPECS)
def test_bad_specs_name_the_field(spec, field, words, digits):
    data = ann.data_signature_from_table(digits, "label")
    with pytest.raises(InvalidArgument) as caught:
        ann.build_model(ann.spec_from_dict(spec), data)
    assert caught.value.violations[0].field == field
    assert words in caught.value.message


def test_token_models_need_integer_columns(digits):
    data = ann.data_signature_from_table(digits, "label")
    spec = {
        "transformer": {
            "vocab_size": 17,
            "max_sequence_length": 64,
            "d_model": 8,
            "num_layers": 1,
            "num_heads": 2,
        }
    }
    with pytest.raises(InvalidArgument, match="integer feature columns"):
        ann.build_model(ann.spec_from_dict(spec), data)


def test_user_code_that_raises_carries_its_traceback(digits):
    data = ann.data_signature_from_table(digits, "label")
    spec = ann.spec_from_dict({"user_code": {"factory": "nn_user_models:broken"}})
    with pytest.raises(ann.UserCodeError) as caught:
        ann.build_model(spec, data)
    assert "broken on purpose" in caught.value.traceback_text
    assert "nn_user_models.py" in caught.value.traceback_text


def test_user_code_with_the_wrong_width_fails_on_the_dry_run(digits):
    data = ann.data_signature_from_table(digits, "label")
    spec = ann.spec_from_dict({"user_code": {"factory": "nn_user_models:wrong_width"}})
    with pytest.raises(ann.UserCodeError, match="forward pass on a zero batch failed"):
        ann.build_model(spec, data)


def test_friendly_dicts_refuse_unknown_keys_and_values():
    with pytest.raises(InvalidArgument) as caught:
        ann.spec_from_dict({"mlp": {"hidden": [3]}})
    assert caught.value.violations[0].field == "model.mlp.hidden"
    with pytest.raises(InvalidArgument) as caught:
        ann.spec_from_dict({"mlp": {"activation": "swish"}})
    assert caught.value.violations[0].field == "model.mlp.activation"
    assert "relu" in caught.value.message
