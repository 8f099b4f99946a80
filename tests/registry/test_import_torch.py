"""ImportModelVersion with torch files: a TorchScript file and a state dict + factory are
exported to ONNX (checked in onnxruntime against torch) and registered with both files;
files that do not load, missing signatures and factories that fail are refused with
nothing registered."""

from __future__ import annotations

import io

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import struct_pb2

from aimass.registry.v1 import registry_pb2 as pb
from tests.byom.factories import make_mlp
from tests.byom.registry_fixture import byom_registry, import_file, model_ids, signature
from tests.registry.conftest import collect

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["byom_registry"]
FACTORY = "tests.byom.factories:make_mlp"


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return make_mlp(6, 16, 3).eval()


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def kwargs(**values) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def onnx_outputs(registry, version: pb.ModelVersion, batch: np.ndarray) -> np.ndarray:
    data = await collect(
        registry.stub.DownloadArtifact(pb.DownloadArtifactRequest(name=version.name, kind="onnx"))
    )
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: batch})
    return out


async def test_torchscript_is_exported_to_onnx_and_registered(byom_registry, mlp) -> None:
    version = await import_file(
        byom_registry,
        "scripted",
        torchscript_bytes(mlp),
        "net.pt",
        signature(("x", "FP32", [-1, 6]), output="logits"),
    )
    assert [(a.kind, a.file_name) for a in version.artifacts] == [
        ("torchscript", "net.pt"),
        ("onnx", "net.onnx"),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.inputs] == [
        ("x", "FP32", [-1, 6])
    ]
    assert [(t.name, list(t.shape)) for t in version.signature.outputs] == [("logits", [-1, 3])]
    assert version.framework == "pytorch"
    assert version.opset == 17
    assert version.parameter_count == 6 * 16 + 16 + 16 * 3 + 3
    assert version.config.values["import"]["format"] == "torchscript"
    assert version.config.values["import"]["onnx_max_abs_diff"] < 1e-4

    batch = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(
        await onnx_outputs(byom_registry, version, batch), expected, atol=1e-5
    )


async def test_state_dict_with_factory_is_exported(byom_registry, mlp) -> None:
    version = await import_file(
        byom_registry,
        "from-weights",
        state_dict_bytes(mlp),
        "weights.pth",
        signature(("x", "FP32", [-1, 6])),
        factory=FACTORY,
        factory_kwargs=kwargs(in_features=6, hidden=16, out_features=3),
    )
    assert [a.kind for a in version.artifacts] == ["state_dict", "onnx"]
    assert [t.name for t in version.signature.outputs] == ["output"]
    details = version.config.values["import"]
    assert details["factory"] == FACTORY
    assert details["factory_kwargs"]["hidden"] == 16

    batch = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(
        await onnx_outputs(byom_registry, version, batch), expected, atol=1e-5
    )


async def test_torchscript_that_fails_to_load_names_the_file(byom_registry, mlp) -> None:
    broken = torchscript_bytes(mlp)
    # Keep the zip's TorchScript layout but corrupt the content: torch.jit.load fails.
    damaged = broken[: len(broken) // 2] + b"\x00" * (len(broken) - len(broken) // 2)
    for data in (damaged, b"plain text, not a model"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await import_file(
                byom_registry,
                "bad-script",
                data,
                "ranker.pt",
                signature(("x", "FP32", [-1, 6])),
                format=pb.MODEL_FORMAT_TORCHSCRIPT,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details()
        assert "source_uri" in details
        assert "ranker.pt is not a TorchScript file torch.jit.load can read" in details
    assert "bad-script" not in await model_ids(byom_registry)


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"factory": ""}, "factory", "looks like a torch.save file"),
        ({"factory": "tests.byom.factories:nothing_here"}, "factory", "cannot import"),
        ({"factory": "tests.byom.factories:broken"}, "factory", "this factory always fails"),
        (
            {"factory": FACTORY, "factory_kwargs": kwargs(in_features=6, hidden=8, out_features=3)},
            "source_uri",
            "weights.pth does not fit the network of",
        ),
        (
            {"factory": FACTORY, "signature": signature(("x", "FP32", [-1, 5]))},
            "signature.inputs",
            "the network fails on inputs of this signature",
        ),
        ({"factory": FACTORY, "signature": signature()}, "signature.inputs", "is required"),
        (
            {"factory": FACTORY, "signature": signature(("x", "STRING", [-1, 6]))},
            "signature.inputs[0].datatype",
            "is not one of",
        ),
    ],
    ids=["no-factory", "factory-missing", "factory-raises", "wrong-shapes", "wrong-input",
         "no-signature", "bad-datatype"],
)  # fmt: skip
async def test_bad_state_dict_imports_register_nothing(
    byom_registry, mlp, fields, field, problem
) -> None:
    request = {
        "signature": signature(("x", "FP32", [-1, 6])),
        "factory_kwargs": kwargs(in_features=6, hidden=16, out_features=3),
        **fields,
    }
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_file(
            byom_registry, "bad-weights", state_dict_bytes(mlp), "weights.pth", **request
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert problem in caught.value.details()
    assert "bad-weights" not in await model_ids(byom_registry)
