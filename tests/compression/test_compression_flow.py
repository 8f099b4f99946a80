"""A recipe end to end: prune 50% -> fine-tune -> INT8 static on a digits MLP, registered as a
child version with its report; the events it publishes."""

from __future__ import annotations

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.registry.v1 import registry_pb2
from tests.compression.conftest import MLP, Env, TrainingEnv, digits
from tests.fixtures.stack import record_events


def metric(version: registry_pb2.ModelVersion, name: str) -> float:
    return next(m.value for m in version.metrics if m.name == name)


async def test_chain_prune_finetune_int8_registers_a_smaller_child(
    train_env: TrainingEnv, nats_url: str, tmp_path
) -> None:
    env = train_env  # the fine-tune runs as a training job
    dataset = await digits(env)
    parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=8, tmp=tmp_path)
    recipe = pb.Recipe(
        steps=[
            pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=0.5)),
            pb.CompressionStep(fine_tune=pb.FineTune(epochs=2, learning_rate=1e-3)),
            pb.CompressionStep(quantize_static=pb.QuantizeStatic(calibration_rows=256)),
        ],
        accuracy_budget=pb.AccuracyBudget(metric="accuracy", max_drop=0.05),
    )
    async with record_events(nats_url, "flow-test", ["aimass.compression.job.*"]) as log:
        job = await env.run_job(parent.name, recipe)
        await log.wait_for(lambda events: any(e.topic.endswith("succeeded") for e in events))
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    statuses = [pb.StepStatus.Name(r.status) for r in job.step_reports]
    # Pruning alone breaks the budget; the chain fine-tunes the pruned network anyway.
    assert statuses == ["STEP_STATUS_OVER_BUDGET", "STEP_STATUS_APPLIED", "STEP_STATUS_APPLIED"], [
        r.reason for r in job.step_reports
    ]
    assert "over the budget 0.05" in job.step_reports[0].reason
    assert [r.step_name for r in job.step_reports] == [
        "prune-structured-50",
        "fine-tune",
        "int8-static",
    ]
    assert job.chosen_step == "int8-static"
    baseline = job.baseline
    assert baseline.file_size_bytes > 0
    assert baseline.throughput_rows_per_second > 0
    assert baseline.latency_p99_ms >= baseline.latency_p50_ms > 0
    final = job.step_reports[-1]
    assert final.file_size_bytes < 0.3 * baseline.file_size_bytes
    assert final.artifact.uri
    assert final.artifact.sha256
    pruned = job.step_reports[0]
    assert pruned.params["parameters"] < 0.55 * baseline.params["parameters"]
    assert final.metrics_after[0].name == "accuracy"

    child = await env.registry.GetModelVersion(
        registry_pb2.GetModelVersionRequest(name=job.model_version)
    )
    assert child.source.parent_version == parent.name
    assert child.source.job == job.name
    assert child.source.derivation == "int8-static"
    assert {a.kind for a in child.artifacts} == {"onnx"}
    assert metric(child, "file_size_ratio") < 0.3
    assert metric(child, "parameter_ratio") < 0.55
    assert metric(child, "parent_accuracy") - metric(child, "accuracy") <= 0.05
    hidden = child.config.values["model"]["mlp"]["hidden_sizes"]
    assert list(hidden) == [64, 32]  # the pruned architecture, rebuildable from the config

    (event,) = log.of("aimass.compression.job.succeeded")
    assert event.subject == job.name


async def test_watch_streams_one_event_per_step_and_cancel_of_finished_is_a_no_op(
    env: Env, tmp_path
) -> None:
    dataset = await digits(env)
    parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=3, tmp=tmp_path)
    recipe = pb.Recipe(
        steps=[
            pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic()),
            pb.CompressionStep(fp16=pb.Fp16()),
        ],
        mode=pb.RECIPE_MODE_CANDIDATES, selection=pb.SELECTION_SMALLEST,
    )  # fmt: skip
    job = await env.compression.CreateCompressionJob(
        pb.CreateCompressionJobRequest(
            compression_job=pb.CompressionJob(parent_version=parent.name, recipe=recipe)
        )
    )
    events = [e async for e in env.compression.WatchCompressionJob(
        pb.WatchCompressionJobRequest(name=job.name), timeout=300)]  # fmt: skip
    lines = [e.log_line for e in events]
    assert any(line.startswith("step int8-dynamic: APPLIED") for line in lines), lines
    assert any(line.startswith("step fp16: APPLIED") for line in lines), lines
    assert events[-1].status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
    done = await env.compression.CancelCompressionJob(pb.CancelCompressionJobRequest(name=job.name))
    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert done.chosen_step == "int8-dynamic"  # smallest file of the two
    assert done.triton_check == "skipped (no Triton configured)"
    listed = await env.compression.ListCompressionJobs(
        pb.ListCompressionJobsRequest(filter=f'parent_version = "{parent.name}"')
    )
    assert [j.name for j in listed.compression_jobs] == [job.name]
