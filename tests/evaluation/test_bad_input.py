"""Every bad input of issue 6 gets a clear error and leaves no metrics anywhere: a split
without labels, a model output that does not fit the task, a version without an ONNX file,
an unknown metric name."""

from __future__ import annotations

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.registry.v1 import registry_pb2
from tests.evaluation.conftest import breast_cancer, fit_linear


async def _create(env, **fields):
    return await env.evaluation.CreateEvaluation(
        pb.CreateEvaluationRequest(evaluation=pb.Evaluation(**fields))
    )


async def test_bad_inputs_are_refused_with_clear_errors_and_no_partial_metrics(env):
    path, x, y = breast_cancer(env.root)
    labelled = await env.ingest("cancer", path, label="target")
    unlabelled = await env.ingest("cancer-raw", path)
    model = fit_linear(x, y, outputs=2, steps=20, classify=True)
    version = await env.register("cancer", model, labelled)

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _create(env, model_version=version, metric_names=["accuracy", "acuracy"])
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "evaluation.metric_names[1]: unknown metric 'acuracy'" in unknown.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as no_labels:
        await _create(env, model_version=version, dataset_version=unlabelled)
    assert no_labels.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no label column" in no_labels.value.details()

    without_onnx = await env.register("weights-only", None, labelled)
    with pytest.raises(grpc.aio.AioRpcError) as no_onnx:
        await _create(env, model_version=without_onnx)
    assert no_onnx.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no onnx artifact" in no_onnx.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _create(env, model_version="models/cancer/versions/99")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as wrong_task:
        await _create(env, model_version=version, task=common_pb2.TASK_REGRESSION,
                      metric_names=["accuracy"])  # fmt: skip
    assert "'accuracy' is a classification metric" in wrong_task.value.details()

    # Nothing was created by the refused calls.
    assert not (await env.evaluation.ListEvaluations(pb.ListEvaluationsRequest())).evaluations

    # A 2-column classifier scored as regression: the job fails, naming the shape.
    created = await _create(env, model_version=version, task=common_pb2.TASK_REGRESSION,
                            log_to_registry=True)  # fmt: skip
    failed, _ = await env.wait(created.name)
    assert failed.status.state == common_pb2.JOB_STATE_FAILED
    assert "model output has shape [57, 2]" in failed.status.reason
    assert "one value per row" in failed.status.reason
    assert not failed.metrics
    assert not failed.report_artifacts
    stored = await env.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(name=version))
    assert not [m for m in stored.metrics if m.source == "evaluation"]

    with pytest.raises(grpc.aio.AioRpcError) as no_report:
        async for _ in env.evaluation.GetEvaluationReport(
            pb.GetEvaluationReportRequest(name=failed.name)
        ):
            pass
    assert no_report.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A classifier with fewer outputs than the split has classes fails the same way.
    one_class_short = fit_linear(x, y, outputs=1, steps=5, classify=False)
    binary_as_one = await env.register("cancer", one_class_short, labelled, task="classification")
    created = await _create(env, model_version=binary_as_one, k=0)
    evaluation, _ = await env.wait(created.name)
    # One output column is read as a binary classifier's logit: that fits 2 classes.
    assert evaluation.status.state == common_pb2.JOB_STATE_SUCCEEDED, evaluation.status.reason
