"""CompareVersions (paired tests), benchmarks written to the registry, and automatic
evaluation on training events: the same event delivered twice makes one evaluation."""

from __future__ import annotations

import asyncio

from aimass.common.v1 import common_pb2
from aimass.core.events import EventBus, build_envelope
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2
from tests.evaluation.conftest import breast_cancer, fit_linear


async def test_compare_and_benchmark(env):
    path, x, y = breast_cancer(env.root)
    dataset = await env.ingest("cancer", path, label="target", stratify=True)
    weak = await env.register("cancer", fit_linear(x, y, 2, steps=1, classify=True), dataset)
    strong = await env.register("cancer", fit_linear(x, y, 2, steps=150, classify=True), dataset)

    response = await env.evaluation.CompareVersions(
        pb.CompareVersionsRequest(
            version_a=weak, version_b=strong, dataset_version=dataset,
            metric_names=["accuracy", "roc_auc"], bootstrap_samples=200, seed=1,
        )
    )  # fmt: skip
    assert response.row_count == 57
    assert response.confidence_level == 0.95
    accuracy, auc = response.comparisons
    assert (accuracy.metric, accuracy.test, auc.test) == ("accuracy", "mcnemar", "paired_bootstrap")
    for c in response.comparisons:
        assert abs(c.difference - (c.value_b - c.value_a)) < 1e-12
        assert c.lower <= c.upper
        assert 0 < c.p_value <= 1
    same = await env.evaluation.CompareVersions(
        pb.CompareVersionsRequest(
            version_a=strong, version_b=strong, dataset_version=dataset, bootstrap_samples=50
        )
    )
    for c in same.comparisons:
        assert c.difference == 0
        assert c.p_value == 1.0

    benchmark = await env.evaluation.CreateBenchmark(
        pb.CreateBenchmarkRequest(
            benchmark=pb.Benchmark(model_version=strong, batch_sizes=[1, 16], iterations=20,
                                   warmup_iterations=2, threads=1, log_to_registry=True)
        )
    )  # fmt: skip
    async for _ in env.evaluation.WatchBenchmark(
        pb.WatchBenchmarkRequest(name=benchmark.name), timeout=120
    ):
        pass
    done = await env.evaluation.GetBenchmark(pb.GetBenchmarkRequest(name=benchmark.name))
    assert done.status.state == common_pb2.JOB_STATE_SUCCEEDED, done.status.reason
    assert [r.batch_size for r in done.results] == [1, 16]
    for result in done.results:
        assert 0 < result.latency_p50_ms <= result.latency_p90_ms <= result.latency_p99_ms
        assert result.throughput_rows_per_second > 0
    assert done.peak_memory_bytes > 0
    assert done.model_size_bytes > 0
    assert done.device
    stored = await env.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(name=strong))
    logged = {m.name for m in stored.metrics if m.source == "benchmark"}
    assert {"latency_p50_ms_b1", "latency_p99_ms_b1", "throughput_rows_per_second_b16",
            "peak_memory_bytes"} <= logged  # fmt: skip


async def _evaluations_of(env, version):
    listed = await env.evaluation.ListEvaluations(
        pb.ListEvaluationsRequest(filter=f'model_version = "{version}"')
    )
    return list(listed.evaluations)


async def test_training_event_twice_makes_one_evaluation(env, nats_url):
    path, x, y = breast_cancer(env.root)
    dataset = await env.ingest("cancer", path, label="target")
    asked = await env.register("cancer", fit_linear(x, y, 2, steps=50, classify=True), dataset)
    not_asked = await env.register("cancer", fit_linear(x, y, 2, steps=5, classify=True), dataset)

    bus = await EventBus.connect(nats_url, "training-test")
    try:
        envelope = build_envelope(
            "aimass.training.job.succeeded",
            events_pb2.TrainingJobSucceeded(job="trainingJobs/t1", model_version=asked,
                                            evaluate=True),
            subject="trainingJobs/t1", source="training",
        )  # fmt: skip
        # Two deliveries of one event: the second under another message id, so the
        # stream's duplicate window does not drop it and the handler has to.
        await bus.publish_envelope(envelope)
        await bus.publish_raw(envelope.topic, envelope.SerializeToString(), "redelivery-1")
        await bus.publish(
            "aimass.training.job.succeeded",
            events_pb2.TrainingJobSucceeded(job="trainingJobs/t2", model_version=not_asked),
            subject="trainingJobs/t2", source="training",
        )  # fmt: skip
    finally:
        await bus.close()

    for _ in range(200):
        evaluations = await _evaluations_of(env, asked)
        if evaluations and evaluations[0].status.state == common_pb2.JOB_STATE_SUCCEEDED:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # room for a wrong second evaluation to appear
    evaluations = await _evaluations_of(env, asked)
    assert len(evaluations) == 1
    assert evaluations[0].status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert evaluations[0].labels["trigger"] == "training"
    assert evaluations[0].metrics[0].upper > 0  # bootstrapped
    assert await _evaluations_of(env, not_asked) == []
    stored = await env.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(name=asked))
    assert "accuracy" in {m.name for m in stored.metrics if m.source == "evaluation"}
