"""Before/after metrics from the real evaluation service: the job asks it to evaluate the
parent and the registered child on the evaluation split and reports its accuracy."""

from __future__ import annotations

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.evaluation.v1 import evaluation_pb2 as epb
from aimass.evaluation.v1 import evaluation_pb2_grpc
from tests.compression.conftest import MLP, digits, open_env


async def test_report_carries_the_evaluation_services_accuracy(tmp_path, nats_url) -> None:
    async with open_env(tmp_path, nats_url, extra=("evaluation",)) as env:
        dataset = await digits(env)
        parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=3, tmp=tmp_path)
        recipe = pb.Recipe(steps=[pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())])
        job = await env.run_job(parent.name, recipe)
        evaluations = evaluation_pb2_grpc.EvaluationServiceStub(env.stack.channel("evaluation"))
        found = [
            await evaluations.GetEvaluation(epb.GetEvaluationRequest(name=name))
            for name in job.before_after.evaluations
        ]
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    summary = job.before_after
    assert summary.source == "evaluation service"
    assert summary.metric == "accuracy"
    assert [e.model_version for e in found] == [parent.name, job.model_version]
    accuracy = [next(m.value for m in e.metrics if m.name == "accuracy") for e in found]
    assert accuracy == [summary.before, summary.after]
    assert summary.before > 0.5
    assert abs(summary.after - summary.before) <= 0.02  # INT8 keeps the function
