"""The Triton check before registration, against the real Triton of the nvidia-pytriton wheel:
a model Triton accepts (loaded under a temporary name, one inference equal to ONNX Runtime's,
unloaded, its entry removed), models Triton refuses (the step fails with Triton's message and
nothing is registered), and the report line when no Triton is configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aimass.common.v1 import common_pb2
from aimass.compression.triton_check import TritonChecker, triton_checker
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.triton.control import TritonTarget
from aimass.core.triton.repository import Backend
from aimass.registry.v1 import registry_pb2
from tests.compression.conftest import MLP, digits, open_env
from tests.fixtures.triton import TritonProcess, triton

__all__ = ["triton"]


def relu_model(path: Path, shape: list[int]) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def entries(server: TritonProcess) -> list[str]:
    return sorted(p.name for p in server.repository.iterdir()) if server.repository.exists() else []


async def test_checker_loads_infers_compares_and_cleans_up(triton: TritonProcess, tmp_path):
    target = TritonTarget(triton.grpc_address, triton.repository, Backend.PYTHON)
    checker = TritonChecker(target)
    try:
        good = relu_model(tmp_path / "good.onnx", [-1, 4])
        sample = {"x": np.array([[-1, 0, 2, 3], [4, -5, 6, 7]], np.float32)}
        verdict = await checker.check(good, sample)
        assert verdict.accepted, verdict.message
        assert "answered within 0 of ONNX Runtime" in verdict.message
        # A scalar input runs in ONNX Runtime, but Triton's model config needs dims.
        scalar = relu_model(tmp_path / "scalar.onnx", [])
        refused = await checker.check(scalar, {"x": np.array(1.0, np.float32)})
        assert not refused.accepted
        assert "refused to load" in refused.message
        assert "model input must specify 'dims'" in refused.message
    finally:
        await checker.close()
    assert entries(triton) == []  # both temporary entries removed
    index = await target.control().index()
    assert not [name for name, state in index.items() if state == "READY"]


def test_the_checker_follows_the_environment(tmp_path):
    assert triton_checker({}) is None
    routing = {
        "AIMASS_ROUTING_TRITON_GRPC": "127.0.0.1:1",
        "AIMASS_ROUTING_TRITON_REPOSITORY": "/r",
    }
    checker = triton_checker(routing)
    assert checker is not None
    assert checker.target.grpc_address == "127.0.0.1:1"
    own = {**routing, "AIMASS_COMPRESSION_TRITON_GRPC": "127.0.0.1:2"}
    checker = triton_checker(own)
    assert checker is not None
    assert checker.target.grpc_address == "127.0.0.1:2"
    assert checker.target.repository is None


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
async def test_job_registers_only_what_triton_accepts(
    backend: str, triton: TritonProcess, tmp_path, nats_url, monkeypatch
) -> None:
    # "onnxruntime" entries ask for a backend this Triton does not have: Triton refuses them.
    monkeypatch.setenv("AIMASS_COMPRESSION_TRITON_GRPC", triton.grpc_address)
    monkeypatch.setenv("AIMASS_COMPRESSION_TRITON_REPOSITORY", str(triton.repository))
    monkeypatch.setenv("AIMASS_COMPRESSION_TRITON_BACKEND", backend)
    async with open_env(tmp_path, nats_url) as env:
        dataset = await digits(env)
        parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=2, tmp=tmp_path)
        recipe = pb.Recipe(steps=[pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())])
        job = await env.run_job(parent.name, recipe)
        versions = await env.registry.ListModelVersions(
            registry_pb2.ListModelVersionsRequest(parent="models/digits-mlp")
        )
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    assert entries(triton) == []
    (report,) = job.step_reports
    if backend == "python":
        assert job.triton_check.startswith("passed (Triton at"), job.triton_check
        assert job.chosen_step == "int8-dynamic"
        assert job.model_version
        assert len(versions.model_versions) == 2
    else:
        assert job.triton_check.startswith("failed: Triton at"), job.triton_check
        assert "onnxruntime" in job.triton_check  # Triton's own message names the backend
        assert report.status == pb.STEP_STATUS_FAILED
        assert report.reason.startswith("Triton refused the model: ")
        assert job.chosen_step == ""
        assert job.model_version == ""
        assert [v.name for v in versions.model_versions] == [parent.name]


class _RefusingSome:
    """Checks every candidate in the same real Triton; the files named in ``refuse`` are
    loaded as entries for the onnxruntime backend this Triton lacks, so Triton itself
    refuses them (a candidate-specific refusal without faking the server)."""

    def __init__(self, triton: TritonProcess, refuse: set[str]) -> None:
        self.refuse = refuse
        self.serving = TritonChecker(TritonTarget(triton.grpc_address, triton.repository))
        self.refusing = TritonChecker(
            TritonTarget(triton.grpc_address, triton.repository, Backend.ONNXRUNTIME)
        )
        self.checked: list[str] = []

    async def check(self, path: Path, sample: dict) -> object:
        self.checked.append(path.name)
        checker = self.refusing if path.name in self.refuse else self.serving
        return await checker.check(path, sample)

    async def close(self) -> None:
        await self.serving.close()
        await self.refusing.close()


@pytest.mark.parametrize("mode", ["candidates", "chain"])
async def test_a_refused_choice_falls_back_to_the_next_best(
    mode: str, triton: TritonProcess, tmp_path, nats_url, monkeypatch
) -> None:
    from aimass.compression import worker

    # Candidates, smallest first: int8-dynamic (step-0), then fp16 (step-1); Triton refuses
    # the first. Chain: prune 50% then int8-dynamic; Triton refuses the last step.
    refused_file = "step-0.onnx" if mode == "candidates" else "step-1.onnx"
    checker = _RefusingSome(triton, {refused_file})
    monkeypatch.setattr(worker, "triton_checker", lambda: checker)
    if mode == "candidates":
        steps = [pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic()),
                 pb.CompressionStep(fp16=pb.Fp16())]  # fmt: skip
        recipe = pb.Recipe(steps=steps, mode=pb.RECIPE_MODE_CANDIDATES,
                           selection=pb.SELECTION_SMALLEST)  # fmt: skip
        refused, fallback = "int8-dynamic", "fp16"
    else:
        steps = [pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=0.5)),
                 pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())]  # fmt: skip
        recipe = pb.Recipe(steps=steps)
        refused, fallback = "int8-dynamic", "prune-structured-50"
    async with open_env(tmp_path, nats_url) as env:
        dataset = await digits(env)
        parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=2, tmp=tmp_path)
        job = await env.run_job(parent.name, recipe)
        child = await env.registry.GetModelVersion(
            registry_pb2.GetModelVersionRequest(name=job.model_version)
        )
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    reports = {r.step_name: r for r in job.step_reports}
    assert reports[refused].status == pb.STEP_STATUS_FAILED
    assert reports[refused].reason.startswith("Triton refused the model: "), reports[refused]
    assert reports[fallback].status == pb.STEP_STATUS_APPLIED
    assert job.chosen_step == fallback
    assert job.triton_check.startswith("passed (Triton at"), job.triton_check
    assert job.triton_check.endswith(f"chosen after Triton refused {refused}")
    assert child.source.derivation == fallback
    assert checker.checked == [
        refused_file,
        "step-1.onnx" if mode == "candidates" else "step-0.onnx",
    ]
    assert entries(triton) == []
