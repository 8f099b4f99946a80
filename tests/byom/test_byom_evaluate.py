"""An imported model is evaluated like a trained one: a classifier trained outside aimass,
saved as TorchScript, imported (exported to ONNX on the way) with its task and dataset
lineage given, then scored by the evaluation service on the dataset's test split."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from aimass.common.v1 import common_pb2
from aimass.evaluation.v1 import evaluation_pb2 as epb
from aimass.registry.v1 import registry_pb2 as pb
from tests.evaluation.conftest import breast_cancer, env

__all__ = ["env"]


class Standardised(torch.nn.Module):
    def __init__(self, mean: np.ndarray, std: np.ndarray, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.linear = torch.nn.Linear(len(mean), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def outside_classifier(x: np.ndarray, y: np.ndarray) -> bytes:
    """Trained with plain torch, nothing of aimass: the TorchScript file someone brings."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Standardised(x.mean(axis=0), x.std(axis=0) + 1e-6, classes=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    features, target = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(features), target).backward()
        optimiser.step()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_imported_torchscript_is_evaluated_like_a_trained_model(env) -> None:
    path, x, y = breast_cancer(env.root)
    dataset = await env.ingest("cancer", path, label="target", stratify=True)
    data = outside_classifier(x, y)
    upload = pb.UploadArtifactHeader(kind="upload", file_name="cancer.pt", size_bytes=len(data))

    async def messages():
        yield pb.UploadArtifactRequest(header=upload)
        yield pb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=data))

    artifact = await env.registry.UploadArtifact(messages())
    template = pb.ModelVersion(source=pb.VersionSource(dataset_version=dataset))
    template.config.values.update({"task": "classification", "classes": ["0", "1"]})
    version = await env.registry.ImportModelVersion(
        pb.ImportModelVersionRequest(
            parent="models/outside-cancer",
            source_uri=artifact.uri,
            file_name="cancer.pt",
            signature=common_pb2.Signature(
                inputs=[common_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, 30])]
            ),
            model_version=template,
        )
    )
    assert [a.kind for a in version.artifacts] == ["torchscript", "onnx"]

    created = await env.evaluation.CreateEvaluation(
        epb.CreateEvaluationRequest(
            evaluation=epb.Evaluation(
                model_version=version.name, bootstrap_samples=20, seed=1, log_to_registry=True
            )
        )
    )
    assert created.dataset_version == dataset  # from the imported version's lineage
    evaluation, _ = await env.wait(created.name)
    assert evaluation.status.state == common_pb2.JOB_STATE_SUCCEEDED, evaluation.status.reason
    metrics = {m.name: m.value for m in evaluation.metrics}
    assert metrics["accuracy"] > 0.9
    logged = await env.registry.GetModelVersion(pb.GetModelVersionRequest(name=version.name))
    assert any(m.name == "accuracy" for m in logged.metrics)
