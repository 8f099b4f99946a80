"""Every bad input of the issue: refused with the field named, or the step skipped with the
operator named; nothing is written for a refused job."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from tests.compression.conftest import MLP, Env, digits


async def create_error(env: Env, parent: str, recipe: pb.Recipe) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compression.CreateCompressionJob(
            pb.CreateCompressionJobRequest(
                compression_job=pb.CompressionJob(parent_version=parent, recipe=recipe)
            )
        )
    return caught.value


def einsum_onnx() -> bytes:
    """A linear classifier computed with Einsum, which no INT8 technique quantizes."""
    weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["input", "weights"], ["output"], equation="bi,io->bo")],
        "einsum",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_refused_jobs_name_the_field(env: Env, tmp_path) -> None:
    dataset = await digits(env, split={"train": 90, "valid": 0, "test": 10})
    parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)

    bad = pb.Recipe(steps=[pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=1.5))])
    err = await create_error(env, parent.name, bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression_job.recipe.steps[0].prune_structured.sparsity" in err.details()
    zero = pb.Recipe(steps=[pb.CompressionStep(prune_unstructured=pb.PruneUnstructured())])
    err = await create_error(env, parent.name, zero)
    assert "prune_unstructured.sparsity" in err.details()
    assert "(0, 1)" in err.details()

    larger = pb.Recipe(steps=[pb.CompressionStep(distill=pb.Distill(
        student_spec={"mlp": {"hidden_sizes": [512, 512]}}))])  # fmt: skip
    err = await create_error(env, parent.name, larger)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps[0].distill.student_spec" in err.details()
    assert "not fewer than the teacher" in err.details()

    empty = pb.Recipe(steps=[pb.CompressionStep(quantize_static=pb.QuantizeStatic(
        calibration_split=common_pb2.DATASET_SPLIT_VALID))])  # fmt: skip
    err = await create_error(env, parent.name, empty)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "quantize_static.calibration_split" in err.details()
    assert "empty" in err.details()

    no_onnx = await env.register("state-only", {"state_dict": b"weights"}, dataset, {})
    dynamic = pb.Recipe(steps=[pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())])
    err = await create_error(env, no_onnx.name, dynamic)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no onnx artifact" in err.details()

    listed = await env.compression.ListCompressionJobs(pb.ListCompressionJobsRequest())
    assert list(listed.compression_jobs) == []  # nothing written for a refused job


async def test_unsupported_operators_and_architectures_skip_the_step(env: Env, tmp_path) -> None:
    dataset = await digits(env)
    config = {"task": "classification", "classes": [str(i) for i in range(10)]}
    einsum = await env.register("einsum", {"onnx": einsum_onnx()}, dataset, config)
    recipe = pb.Recipe(steps=[
        pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic()),
        pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=0.5)),
        pb.CompressionStep(fp16=pb.Fp16()),
    ])  # fmt: skip
    job = await env.run_job(einsum.name, recipe)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    dynamic, pruned, fp16 = job.step_reports
    assert dynamic.status == pb.STEP_STATUS_SKIPPED
    assert "Einsum" in dynamic.reason
    assert pruned.status == pb.STEP_STATUS_SKIPPED
    assert "state_dict" in pruned.reason
    assert fp16.status == pb.STEP_STATUS_APPLIED
    assert job.chosen_step == "fp16"
    assert job.model_version

    mlp = await env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)
    heads = pb.Recipe(steps=[pb.CompressionStep(prune_structured=pb.PruneStructured(
        sparsity=0.5, dimension=pb.PRUNE_DIMENSION_HEADS))])  # fmt: skip
    job = await env.run_job(mlp.name, heads)
    (report,) = job.step_reports
    assert report.status == pb.STEP_STATUS_SKIPPED
    assert "heads is not supported for the mlp architecture" in report.reason
    assert job.chosen_step == ""
    assert job.model_version == ""
    assert "nothing registered" in job.status.reason
