"""The other techniques as candidates (distillation, low rank, unstructured pruning, graph
optimization, dynamic INT8 per channel, static entropy), and policies started by
aimass.registry.version.created."""

from __future__ import annotations

import asyncio

from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2 as pb
from aimass.registry.v1 import registry_pb2
from tests.compression.conftest import MLP, Env, TrainingEnv, digits


async def test_candidates_each_start_from_the_parent(train_env: TrainingEnv, tmp_path) -> None:
    env = train_env  # the distill step runs as a training job
    dataset = await digits(env)
    parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=6, tmp=tmp_path)
    recipe = pb.Recipe(
        steps=[
            pb.CompressionStep(
                distill=pb.Distill(scale_factor=0.25, epochs=15, learning_rate=3e-3)
            ),
            pb.CompressionStep(low_rank=pb.LowRank(rank_ratio=0.25)),
            pb.CompressionStep(prune_unstructured=pb.PruneUnstructured(
                sparsity=0.6, scope=pb.PRUNE_SCOPE_PER_LAYER)),
            pb.CompressionStep(graph_optimize=pb.GraphOptimize()),
            pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic(per_channel=True)),
            pb.CompressionStep(quantize_static=pb.QuantizeStatic(
                calibrator=pb.CALIBRATION_METHOD_ENTROPY, op_types_to_exclude=["Gemm"])),
        ],
        mode=pb.RECIPE_MODE_CANDIDATES, selection=pb.SELECTION_MOST_ACCURATE,
        accuracy_budget=pb.AccuracyBudget(max_drop=0.1),
    )  # fmt: skip
    job = await env.run_job(parent.name, recipe, evaluate=True)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    reports = {r.step_name: r for r in job.step_reports}
    distilled = reports["distill"]
    assert distilled.status == pb.STEP_STATUS_APPLIED, distilled.reason
    assert distilled.params["student_parameters"] <= 0.25 * distilled.params["teacher_parameters"]
    assert reports["low-rank"].params["layers_factorized"] >= 1
    assert reports["prune-unstructured-60"].params["achieved_sparsity"] >= 0.59
    assert reports["graph-optimize"].max_output_difference < 1e-4
    assert reports["int8-dynamic"].file_size_bytes < 0.35 * job.baseline.file_size_bytes
    # Every quantizable operator kept in float: the static step says so instead of running.
    static = reports["int8-static"]
    assert static.status == pb.STEP_STATUS_SKIPPED
    assert "Gemm" in static.reason
    applied = [r for r in job.step_reports if r.status == pb.STEP_STATUS_APPLIED]
    best = max(applied, key=lambda r: r.metrics_after[0].value)
    assert job.chosen_step == best.step_name


async def test_policy_compresses_new_versions_but_not_derived_ones(env: Env, tmp_path) -> None:
    dataset = await digits(env)
    first = await env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)
    recipe = pb.Recipe(steps=[pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())])
    policy = await env.compression.CreateCompressionPolicy(
        pb.CreateCompressionPolicyRequest(
            parent="models/digits-mlp", compression_policy_id="int8",
            compression_policy=pb.CompressionPolicy(
                recipe=recipe, enabled=True, version_filter='tags.stage = "candidate"'),
        )
    )  # fmt: skip
    assert policy.name == "models/digits-mlp/compressionPolicies/int8"
    skipped = await env.train_and_register(
        "digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path, tags={"stage": "dev"}
    )
    second = await env.train_and_register(
        "digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path, tags={"stage": "candidate"}
    )
    job = None
    for _ in range(300):
        listed = await env.compression.ListCompressionJobs(pb.ListCompressionJobsRequest())
        if listed.compression_jobs:
            job = await env.wait(listed.compression_jobs[0].name)
            break
        await asyncio.sleep(0.1)
    assert job is not None
    assert job.parent_version == second.name
    assert job.policy == policy.name
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    child = await env.registry.GetModelVersion(
        registry_pb2.GetModelVersionRequest(name=job.model_version)
    )
    assert child.source.parent_version == second.name
    await asyncio.sleep(1.0)  # the child's version.created event must not start another job
    listed = await env.compression.ListCompressionJobs(pb.ListCompressionJobsRequest())
    assert [j.parent_version for j in listed.compression_jobs] == [second.name]
    assert first.name != skipped.name
    got = await env.compression.GetCompressionPolicy(
        pb.GetCompressionPolicyRequest(name=policy.name)
    )
    assert got.last_job == job.name
