"""End to end through the real data service, registry and evaluation service: an evaluation
job on the work queue with its Watch stream, metrics equal to scikit-learn's on the same
ONNX outputs, bootstrap intervals, reports, registry metrics and the completed event."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from sklearn import metrics as sk

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2
from tests.evaluation.conftest import breast_cancer, fit_linear
from tests.fixtures.stack import record_events


async def _read_test_split(env, version):
    batches = []
    request = data_pb2.ReadSplitRequest(name=version, split=common_pb2.DATASET_SPLIT_TEST)
    async for message in env.data.ReadSplit(request):
        batches.extend(pa.ipc.open_stream(message.arrow_ipc).read_all().to_batches())
    return pa.Table.from_batches(batches)


async def test_evaluation_job_matches_sklearn_and_logs_everything(env, nats_url):
    path, x, y = breast_cancer(env.root)
    dataset = await env.ingest("cancer", path, label="target", stratify=True)
    model = fit_linear(x, y, outputs=2, steps=150, classify=True)
    version = await env.register("cancer", model, dataset, task="classification")

    async with record_events(nats_url, "eval-test", ["aimass.evaluation.>"]) as events:
        created = await env.evaluation.CreateEvaluation(
            pb.CreateEvaluationRequest(
                evaluation=pb.Evaluation(
                    model_version=version, bootstrap_samples=50, seed=3, log_to_registry=True,
                    batch_size=32,
                )
            )
        )  # fmt: skip
        assert created.status.state == common_pb2.JOB_STATE_QUEUED
        assert created.dataset_version == dataset  # from the version's lineage
        evaluation, watched = await env.wait(created.name)
        await events.wait_for(lambda e: len(e) >= 1)

    assert evaluation.status.state == common_pb2.JOB_STATE_SUCCEEDED, evaluation.status.reason
    states = [e.status.state for e in watched]
    assert states[0] == common_pb2.JOB_STATE_QUEUED
    assert common_pb2.JOB_STATE_RUNNING in states
    assert states[-1] == common_pb2.JOB_STATE_SUCCEEDED
    assert [e.sequence for e in watched] == sorted({e.sequence for e in watched})

    # The same ONNX file on the same rows, scored by scikit-learn.
    table = await _read_test_split(env, dataset)
    features = np.column_stack([table.column(c).to_numpy() for c in table.column_names
                                if c != "target"]).astype(np.float32)  # fmt: skip
    truth = table.column("target").to_numpy()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": features})[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    metrics = {m.name: m for m in evaluation.metrics}
    assert evaluation.row_count == len(truth)
    assert abs(metrics["accuracy"].value - sk.accuracy_score(truth, predicted)) < 1e-9
    assert abs(metrics["roc_auc"].value - sk.roc_auc_score(truth, probabilities[:, 1])) < 1e-6
    assert abs(metrics["f1_macro"].value - sk.f1_score(truth, predicted, average="macro")) < 1e-9
    assert abs(metrics["log_loss"].value - sk.log_loss(truth, probabilities)) < 1e-5
    assert metrics["accuracy"].value > 0.9
    for metric in evaluation.metrics:
        assert metric.lower <= metric.value + 1e-12 <= metric.upper + 2e-12 or np.isnan(
            metric.lower
        )
    assert sum(evaluation.confusion_matrix.counts) == len(truth)
    assert [c.support for c in evaluation.per_class_metrics] == np.bincount(truth).tolist()
    kinds = {c.kind for c in evaluation.curves}
    assert kinds == {pb.CURVE_KIND_ROC, pb.CURVE_KIND_PRECISION_RECALL}

    # Reports are downloadable; the Markdown names the metrics and links the figures.
    files = {a.file_name for a in evaluation.report_artifacts}
    assert {"report.md", "report.html", "confusion_matrix.png", "roc.png", "pr.png"} <= files
    markdown = b"".join([c.data async for c in env.evaluation.GetEvaluationReport(
        pb.GetEvaluationReportRequest(name=evaluation.name))]).decode()  # fmt: skip
    assert "| accuracy |" in markdown
    assert "](roc.png)" in markdown
    png = b"".join([c.data async for c in env.evaluation.GetEvaluationReport(
        pb.GetEvaluationReportRequest(name=evaluation.name, file_name="roc.png"))])  # fmt: skip
    assert png.startswith(b"\x89PNG")

    # Metrics on the version in the registry, and the completed event.
    stored = await env.registry.GetModelVersion(registry_pb2.GetModelVersionRequest(name=version))
    logged = {m.name: m.value for m in stored.metrics if m.source == "evaluation"}
    assert logged["accuracy"] == metrics["accuracy"].value
    completed = events.of("aimass.evaluation.completed")
    assert len(completed) == 1
    payload = events_pb2.EvaluationCompleted()
    completed[0].payload.Unpack(payload)
    assert payload.evaluation == evaluation.name
    assert payload.model_version == version
    assert payload.metrics["accuracy"] == metrics["accuracy"].value

    listed = await env.evaluation.ListEvaluations(
        pb.ListEvaluationsRequest(filter=f'model_version = "{version}" AND state = "succeeded"')
    )
    assert [e.name for e in listed.evaluations] == [evaluation.name]


async def test_cli_eval_prints_the_table_and_the_report_path(env, tmp_path, monkeypatch):
    import asyncio

    from typer.testing import CliRunner

    from aimass.cli.main import app

    path, x, y = breast_cancer(env.root)
    dataset = await env.ingest("cancer", path, label="target")
    version = await env.register("cancer", fit_linear(x, y, 2, steps=50, classify=True), dataset)
    monkeypatch.chdir(tmp_path)
    address = env.stack.address("evaluation")
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, app, ["eval", "run", version, "--bootstrap", "20", "--address", address]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    assert "95% interval" in result.output
    report_line = next(line for line in result.output.splitlines() if line.startswith("report: "))
    report = tmp_path / report_line.removeprefix("report: ")
    assert "| accuracy |" in report.read_text()
    assert (report.parent / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")

    bad = await asyncio.to_thread(
        runner.invoke, app, ["eval", "run", version, "--metric", "nope", "--address", address]
    )
    assert bad.exit_code == 1
    assert "unknown metric 'nope'" in bad.output
