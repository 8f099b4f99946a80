"""ImportModelVersion with ONNX files made outside aimass: the signature read from the graph
(KServe datatypes, -1 for dynamic dims) or given and checked, the version's artifacts and
config, idempotent retries, and bad files refused with nothing registered."""

from __future__ import annotations

import io

import grpc
import numpy as np
import onnx
import pytest
import torch
from google.protobuf import json_format
from onnx import TensorProto, helper

from aimass.core import nn as ann
from aimass.registry.v1 import registry_pb2 as pb
from tests.byom.registry_fixture import byom_registry, import_file, model_ids, signature
from tests.registry.conftest import collect

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["byom_registry"]


def two_input_onnx() -> bytes:
    """A torch model with a float and an int64 input, batch and sequence axes dynamic."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.linear = torch.nn.Linear(3, 4)

        def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return self.linear(features) + self.embed(tokens).mean(dim=1)

    buffer = io.BytesIO()
    torch.onnx.export(
        Net().eval(),
        (torch.zeros(2, 3), torch.zeros(2, 5, dtype=torch.int64)),
        buffer,
        input_names=["features", "tokens"],
        output_names=["scores"],
        dynamic_axes={"features": {0: "batch"}, "tokens": {0: "batch", 1: "seq"},
                      "scores": {0: "batch"}},
        dynamo=False,
        opset_version=17,
    )  # fmt: skip
    return buffer.getvalue()


def graph_bytes(inputs: list, nodes: list, outputs: list, initializers: list = ()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def constant_only_onnx() -> bytes:
    """Valid ONNX whose graph takes no inputs at all (a Constant node feeds the output)."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    node = helper.make_node("Constant", [], ["y"], value=value)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return graph_bytes([], [node], [out])


def unnamed_input_onnx() -> bytes:
    x = helper.make_tensor_value_info("", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    return graph_bytes([x], [helper.make_node("Identity", [""], ["y"])], [y])


def unknown_op_onnx() -> bytes:
    """Parses as ONNX, but onnxruntime has no kernel for the op."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    return graph_bytes([x], [helper.make_node("NoSuchOperator", ["x"], ["y"])], [y])


async def test_signature_is_read_from_the_graph(byom_registry) -> None:
    data = two_input_onnx()
    version = await import_file(
        byom_registry,
        "outside-onnx",
        data,
        "scorer.onnx",
        model_version=pb.ModelVersion(description="made elsewhere", tags={"origin": "byom"}),
        request_id="import-1",
    )
    assert version.name == "models/outside-onnx/versions/1"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in version.signature.inputs]
    assert inputs == [("features", "FP32", [-1, 3]), ("tokens", "INT64", [-1, -1])]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in version.signature.outputs]
    assert outputs == [("scores", "FP32", [-1, 4])]
    assert version.framework == "onnx"
    assert version.opset == 17
    assert version.parameter_count == 10 * 4 + 3 * 4 + 4
    assert version.description == "made elsewhere"
    assert dict(version.tags) == {"origin": "byom"}
    assert [(a.kind, a.file_name) for a in version.artifacts] == [("onnx", "scorer.onnx")]
    config = version.config.values
    assert config["import"]["format"] == "onnx"
    assert "signature" not in config  # no dataset columns given: see the config test below

    stored = await collect(
        byom_registry.stub.DownloadArtifact(
            pb.DownloadArtifactRequest(name=version.name, kind="onnx")
        )
    )
    assert stored == data

    again = await import_file(
        byom_registry, "outside-onnx", data, "scorer.onnx", request_id="import-1"
    )
    assert again.name == version.name


async def test_given_signature_is_checked_against_the_graph(byom_registry) -> None:
    data = two_input_onnx()
    given = signature(("features", "FP32", [-1, 3]), ("tokens", "INT64", [-1, 16]))
    version = await import_file(byom_registry, "given-sig", data, "m.onnx", given)
    assert [list(t.shape) for t in version.signature.inputs] == [[-1, 3], [-1, 16]]

    cases = [
        (signature(("pixels", "FP32", [-1, 3]), ("tokens", "INT64", [-1, -1])),
         "signature.inputs[0].name", "'pixels' is not in the graph"),
        (signature(("features", "FP64", [-1, 3]), ("tokens", "INT64", [-1, -1])),
         "signature.inputs[0].datatype", "graph says FP32"),
        (signature(("features", "FP32", [-1, 4]), ("tokens", "INT64", [-1, -1])),
         "signature.inputs[0].shape", "fixes it at 3"),
        (signature(("features", "FP32", [-1, 3])),
         "signature.inputs", "leaves out graph inputs tokens"),
    ]  # fmt: skip
    for given, field, problem in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await import_file(byom_registry, "refused-sig", data, "m.onnx", given)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
        assert problem in caught.value.details()
    assert "refused-sig" not in await model_ids(byom_registry)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (constant_only_onnx(), "the graph of bad.onnx has no inputs"),
        (unnamed_input_onnx(), "the graph of bad.onnx has unnamed inputs"),
        (unknown_op_onnx(), "bad.onnx does not load in onnxruntime"),
        (b"\x00\x01 certainly not a protobuf \xff" * 10, "bad.onnx is not an ONNX model"),
        (b"", "bad.onnx is not an ONNX model: it has no ir_version"),
    ],
    ids=["no-inputs", "unnamed-input", "onnxruntime-refuses", "not-onnx", "empty"],
)
async def test_bad_onnx_files_are_refused_and_nothing_registered(
    byom_registry, data, problem
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(byom_registry, "bad-onnx", data, "bad.onnx")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source_uri" in caught.value.details()
    assert problem in caught.value.details()
    assert "bad-onnx" not in await model_ids(byom_registry)


async def test_request_problems_name_their_field(byom_registry) -> None:
    data = two_input_onnx()
    artifact = await byom_registry.upload(data, kind="upload", file_name="m.onnx")
    cases = [
        (pb.ImportModelVersionRequest(parent="models/x"), "source_uri",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ImportModelVersionRequest(parent="nope", source_uri=artifact.uri), "parent",
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ImportModelVersionRequest(parent="models/x", source_uri=artifact.uri,
                                      model_version=pb.ModelVersion(framework="tf")),
         "model_version.framework", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ImportModelVersionRequest(parent="models/x", source_uri=artifact.uri,
                                      format=pb.MODEL_FORMAT_ONNX, factory="a.b:c"),
         "factory", grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ImportModelVersionRequest(parent="models/x", source_uri=artifact.uri[:-4] + "0000"),
         "source_uri", grpc.StatusCode.NOT_FOUND),
    ]  # fmt: skip
    for request, field, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await byom_registry.stub.ImportModelVersion(request)
        assert caught.value.code() == code, caught.value.details()
        assert field in caught.value.details()
    assert "x" not in await model_ids(byom_registry)


async def test_imported_graph_runs_in_onnxruntime() -> None:
    """The fixture model itself is sound: guards the refusals above against a broken maker."""
    import onnxruntime as ort

    session = ort.InferenceSession(two_input_onnx(), providers=["CPUExecutionProvider"])
    (out,) = session.run(
        None, {"features": np.zeros((3, 3), np.float32), "tokens": np.ones((3, 7), np.int64)}
    )
    assert out.shape == (3, 4)
    # The onnxruntime refusal is about the operator, not a malformed file.
    assert onnx.load_from_string(unknown_op_onnx()).graph.node[0].op_type == "NoSuchOperator"


async def test_caller_config_adds_what_the_file_cannot_say(byom_registry) -> None:
    """Task, classes, label and dataset columns: what evaluation and compression read."""
    data = two_input_onnx()
    config = {
        "task": "classification",
        "classes": ["a", "b", "c", "d"],
        "preprocessing": {"scale": 0.5},
        "signature": {
            "label_column": "label",
            "loss": "cross_entropy",
            "inputs": [
                {"name": "features", "columns": ["f1", "f2", "f3"]},
                {"name": "tokens", "columns": ["words"]},
            ],
        },
    }
    template = pb.ModelVersion()
    template.config.values.update(config)
    version = await import_file(
        byom_registry, "with-config", data, "m.onnx", model_version=template
    )
    stored = json_format.MessageToDict(version.config.values)
    assert stored["task"] == "classification"
    assert stored["preprocessing"] == {"scale": 0.5}
    assert stored["import"]["format"] == "onnx"
    signature = ann.ModelSignature.from_dict(stored["signature"])
    assert signature.task == "classification"
    assert signature.classes == ("a", "b", "c", "d")
    assert signature.label_column == "label"
    assert [s.columns for s in signature.inputs] == [("f1", "f2", "f3"), ("words",)]
    assert signature.inputs[1].shape == (-1, -1)

    for bad, field in (
        ({"signature": {"inputs": [{"name": "pixels", "columns": ["x"]}]}},
         "model_version.config.signature.inputs[0].name"),
        ({"import": {"format": "onnx"}}, "model_version.config.import"),
    ):  # fmt: skip
        template = pb.ModelVersion()
        template.config.values.update(bad)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await import_file(byom_registry, "bad-config", data, "m.onnx", model_version=template)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
    assert "bad-config" not in await model_ids(byom_registry)
