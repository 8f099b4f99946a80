"""An imported model is compressed like a trained one: a digits classifier trained outside
aimass, brought as a state dict + factory, imported with its task, classes and dataset
lineage, then quantized by the compression service, which registers the INT8 child."""

from __future__ import annotations

import io

import torch
from google.protobuf import struct_pb2
from sklearn.datasets import load_digits

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as cpb
from aimass.registry.v1 import registry_pb2 as pb
from tests.byom.factories import make_mlp
from tests.compression.conftest import digits, env

__all__ = ["env"]
FACTORY = "tests.byom.factories:make_mlp"
SHAPE = {"in_features": 64, "hidden": 64, "out_features": 10}


def outside_weights() -> bytes:
    """A digits MLP trained with plain torch (full batch, a few seconds): its state dict."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    model = make_mlp(**SHAPE)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    features, target = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(features), target).backward()
        optimiser.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


async def test_imported_state_dict_is_compressed_like_a_trained_model(env) -> None:
    dataset = await digits(env)
    artifact = await env.upload(outside_weights(), "upload")
    kwargs = struct_pb2.Struct()
    kwargs.update(SHAPE)
    template = pb.ModelVersion(source=pb.VersionSource(dataset_version=dataset))
    template.config.values.update(
        {"task": "classification", "classes": [str(d) for d in range(10)]}
    )
    parent = await env.registry.ImportModelVersion(
        pb.ImportModelVersionRequest(
            parent="models/outside-digits",
            source_uri=artifact.uri,
            file_name="digits.pth",
            factory=FACTORY,
            factory_kwargs=kwargs,
            signature=common_pb2.Signature(
                inputs=[common_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])],
                outputs=[common_pb2.TensorSpec(name="logits")],
            ),
            model_version=template,
        )
    )
    assert [a.kind for a in parent.artifacts] == ["state_dict", "onnx"]

    recipe = cpb.Recipe(steps=[cpb.CompressionStep(quantize_dynamic=cpb.QuantizeDynamic())])
    job = await env.run_job(parent.name, recipe)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    assert job.model_version
    child = await env.registry.GetModelVersion(pb.GetModelVersionRequest(name=job.model_version))
    assert child.source.parent_version == parent.name
    reports = {r.step_name: r for r in job.step_reports}
    (report,) = reports.values()
    before = {m.name: m.value for m in report.metrics_before}
    after = {m.name: m.value for m in report.metrics_after}
    assert before["accuracy"] > 0.9
    assert after["accuracy"] > before["accuracy"] - 0.02
    assert 0 < report.file_size_bytes < job.baseline.file_size_bytes
