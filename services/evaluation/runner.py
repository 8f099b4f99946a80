"""Runs evaluation and benchmark jobs pulled from the work queue.

A job's life: QUEUED (row + outbox job, one transaction) -> RUNNING (attempt
counted) -> SUCCEEDED with every result at once, or FAILED with the reason and
no results, or CANCELLED. Nothing partial is ever stored or sent to the
registry: metrics, report files and the registry write all happen before the
one transaction that marks the job SUCCEEDED and adds
``aimass.evaluation.completed`` to the outbox. A redelivered job (its worker
died) starts over; a finished one is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, FailedPrecondition
from aimass.core.events import add_event
from aimass.evaluation import metrics as mt
from aimass.evaluation import report, stats
from aimass.evaluation import store as st
from aimass.evaluation.inference import Cancelled
from aimass.evaluation.sources import Sources, calling, resolve_task, score
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2

log = logging.getLogger(__name__)

SOURCE = "evaluation"
COMPLETED_TOPIC = "aimass.evaluation.completed"
PROGRESS_INTERVAL_S = 0.5
MAX_CURVE_POINTS = 400
BENCHMARK_FIGURES = (
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "throughput_rows_per_second",
)


class Throttle:
    """Calls ``action`` at most every ``interval_s`` (and always for the last value)."""

    def __init__(
        self, action: Callable[..., None], interval_s: float = PROGRESS_INTERVAL_S
    ) -> None:
        self.action = action
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, *args: Any, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last >= self.interval_s:
            self._last = now
            self.action(*args)


def _thin(values: np.ndarray, keep: np.ndarray) -> list[float]:
    return [float(v) for v in values[keep]]


def curve(kind: str, label: str, x: np.ndarray, y: np.ndarray, t: np.ndarray, area: float) -> dict:
    """A curve as stored, thinned to at most MAX_CURVE_POINTS (first and last kept)."""
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), MAX_CURVE_POINTS)).astype(int))
    thresholds = np.r_[t, np.nan][: len(x)] if len(t) < len(x) else t
    return {"kind": kind, "label": label, "x": _thin(x, keep), "y": _thin(y, keep),
            "thresholds": _thin(thresholds, keep), "area": area}  # fmt: skip


def classification_details(p: mt.Predictions) -> dict[str, Any]:
    """Per-class figures, confusion matrix, ROC and PR curves of a classification."""
    n_classes = p.scores.shape[1]
    y_pred = mt.predicted_classes(p.scores)
    figures = mt.class_figures(p.y_true, y_pred, np.arange(n_classes))
    per_class = [
        {"label": p.classes[c], "precision": figures.precision[c], "recall": figures.recall[c],
         "f1": figures.f1[c], "support": int(figures.support[c])}
        for c in range(n_classes)
    ]  # fmt: skip
    counts = mt.confusion_matrix(p.y_true, y_pred, n_classes)
    positives = [1] if n_classes == 2 else range(n_classes)
    curves = []
    for c in positives:
        truth = (p.y_true == c).astype(np.int64)
        if np.unique(truth).size != 2:
            continue  # a class with no positive (or no negative) row has no curve
        label = "" if n_classes == 2 else p.classes[c]
        fpr, tpr, thresholds = mt.roc_curve(truth, p.scores[:, c])
        curves.append(
            curve("roc", label, fpr, tpr, thresholds, mt.binary_roc_auc(truth, p.scores[:, c]))
        )
        precision, recall, pr_thresholds = mt.precision_recall_curve(truth, p.scores[:, c])
        area = mt.binary_average_precision(truth, p.scores[:, c])
        curves.append(curve("pr", label, recall, precision, pr_thresholds, area))
    return {
        "per_class": per_class,
        "confusion": {"labels": p.classes[:n_classes], "counts": counts.reshape(-1).tolist()},
        "curves": curves,
    }


def default_names(p: mt.Predictions) -> list[str]:
    names = list(mt.DEFAULTS[p.task])
    if p.task == mt.CLASSIFICATION and p.scores.shape[1] > 2:
        names.append("top_k_accuracy")
    return names


class Runner:
    """Executes jobs; every database step is its own short transaction in a worker thread."""

    def __init__(
        self,
        database: Database,
        artifacts: ArtifactStore,
        sources: Sources,
        notify_outbox: Callable[[], None],
    ) -> None:
        self.database = database
        self.artifacts = artifacts
        self.sources = sources
        self.notify_outbox = notify_outbox

    async def run(self, job: str) -> None:
        """Runs "evaluations/{id}" or "benchmarks/{id}" to an end state; never raises."""
        collection, _, job_id = job.partition("/")
        kind = "evaluation" if collection == "evaluations" else "benchmark"
        if not await asyncio.to_thread(self._start, kind, job_id):
            return
        try:
            if kind == "evaluation":
                await self._evaluate(job_id)
            else:
                await self._benchmark(job_id)
        except Cancelled:
            await asyncio.to_thread(self._end, kind, job_id, "CANCELLED", "cancelled on request")
        except AimassError as err:
            await asyncio.to_thread(self._end, kind, job_id, "FAILED", err.message)
        except Exception as err:
            log.exception("%s failed", job)
            reason = f"internal error: {type(err).__name__}: {err}"
            await asyncio.to_thread(self._end, kind, job_id, "FAILED", reason)

    # ------------------------------------------------------------------ state

    def _row(self, session: Any, kind: str, job_id: str, lock: bool = False) -> st.JobRow:
        get = st.get_evaluation if kind == "evaluation" else st.get_benchmark
        return get(session, job_id, lock=lock)

    def _start(self, kind: str, job_id: str) -> bool:
        with self.database.session() as session:
            row = self._row(session, kind, job_id, lock=True)
            if row.state in st.TERMINAL:
                return False
            if row.state == "CANCELLING":
                st.set_state(row, "CANCELLED", "cancelled on request")
                st.add_job_event(session, row)
                return False
            st.set_state(row, "RUNNING")
            row.results = {}
            st.add_job_event(session, row)
            return True

    def _end(self, kind: str, job_id: str, state: str, reason: str) -> None:
        with self.database.session() as session:
            row = self._row(session, kind, job_id, lock=True)
            row.results = {}
            st.set_state(row, state, reason)
            st.add_job_event(session, row, log_line=reason)

    def _config(self, kind: str, job_id: str) -> tuple[st.JobRow, dict[str, Any]]:
        with self.database.session(read_only=True) as session:
            row = self._row(session, kind, job_id)
            session.expunge(row)
            return row, dict(row.config)

    def _progress(self, kind: str, job_id: str, completed: int, total: int, unit: str) -> None:
        with self.database.session() as session:
            row = self._row(session, kind, job_id, lock=True)
            st.set_progress(row, completed, total, unit)
            st.add_job_event(session, row)

    def cancel_check(self, kind: str, job_id: str) -> Callable[[], bool]:
        """A cheap "was it cancelled?" for loops: reads the state at most twice a second."""
        seen = {"at": 0.0, "cancelled": False}

        def cancelled() -> bool:
            now = time.monotonic()
            if now - seen["at"] >= PROGRESS_INTERVAL_S:
                seen["at"] = now
                with self.database.session(read_only=True) as session:
                    state = self._row(session, kind, job_id).state
                seen["cancelled"] = state in ("CANCELLING", "CANCELLED")
            return bool(seen["cancelled"])

        return cancelled

    # ------------------------------------------------------------- evaluation

    async def _evaluate(self, job_id: str) -> None:
        row, config = await asyncio.to_thread(self._config, "evaluation", job_id)
        version = await self.sources.version(row.model_version)
        dataset = await self.sources.dataset_version(row.dataset_version)
        task = resolve_task(config.get("task"), version, dataset)
        cancelled = self.cancel_check("evaluation", job_id)
        rows_progress = Throttle(lambda done, total: self._progress(
            "evaluation", job_id, done, total, "rows"))  # fmt: skip
        scored = await score(
            self.sources, version, dataset, row.split, task,
            k=config["k"], batch_size=config["batch_size"],
            progress=rows_progress, cancelled=cancelled,
        )  # fmt: skip
        p = scored.predictions
        asked = list(config.get("metric_names", []))
        names = (
            mt.resolve_names(asked, task, "evaluation.metric_names") if asked else default_names(p)
        )
        results = await asyncio.to_thread(self._metrics, job_id, p, names, config, cancelled)
        results["row_count"] = p.rows
        results["task"] = task
        results["reports"] = await self._store_reports(job_id, row, task, p.rows, config, results)
        if config.get("log_to_registry"):
            await self._log_metrics(row.model_version, results["metrics"], row.split)
        await asyncio.to_thread(self._succeed_evaluation, job_id, results)

    def _metrics(
        self,
        job_id: str,
        p: mt.Predictions,
        names: list[str],
        config: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> dict[str, Any]:
        values = mt.compute(p, names)
        samples = int(config.get("bootstrap_samples", 0))
        intervals: dict[str, tuple[float, float]] = {}
        if samples:
            throttle = Throttle(lambda done: self._progress(
                "evaluation", job_id, done, samples, "bootstrap samples"))  # fmt: skip

            def progress(done: int) -> None:
                if cancelled():
                    raise Cancelled
                throttle(done, final=done == samples)

            intervals = stats.bootstrap_intervals(
                p, names, samples, config["confidence_level"], config["seed"], progress
            )
        nan = (float("nan"), float("nan"))
        metrics = [
            {"name": n, "value": values[n], "lower": intervals.get(n, nan)[0],
             "upper": intervals.get(n, nan)[1]}
            for n in names
        ]  # fmt: skip
        results: dict[str, Any] = {"metrics": metrics}
        if p.task == mt.CLASSIFICATION:
            results.update(classification_details(p))
        return results

    async def _store_reports(
        self, job_id: str, row: Any, task: str, rows: int, config: dict, results: dict
    ) -> list[dict[str, Any]]:
        data = report.ReportData(
            evaluation=f"evaluations/{job_id}",
            model_version=row.model_version,
            dataset_version=row.dataset_version,
            split=row.split,
            task=task,
            row_count=rows,
            confidence=config["confidence_level"],
            metrics={m["name"]: (m["value"], m["lower"], m["upper"]) for m in results["metrics"]},
            per_class=results.get("per_class", []),
            confusion=results.get("confusion", {}),
            curves=results.get("curves", []),
        )
        files = await asyncio.to_thread(report.render, data)
        stored = []
        for file_name, content in files.items():
            obj = await self.artifacts.put_bytes(content)
            stored.append(
                {"file_name": file_name, "uri": obj.uri, "sha256": obj.sha256,
                 "size_bytes": obj.size}
            )  # fmt: skip
        return stored

    async def _log_metrics(self, version: str, metrics: list[dict], split: str) -> None:
        prefix = "" if split == "test" else f"{split}_"
        finite = [
            common_pb2.Metric(
                name=f"{prefix}{m['name']}", value=m["value"], source=SOURCE,
                lower=m["lower"] if math.isfinite(m["lower"]) else 0.0,
                upper=m["upper"] if math.isfinite(m["upper"]) else 0.0,
            )
            for m in metrics
            if math.isfinite(m["value"])
        ]  # fmt: skip
        if finite:
            async with calling("registry"):
                await self.sources.registry.LogVersionMetrics(
                    registry_pb2.LogVersionMetricsRequest(name=version, metrics=finite)
                )

    def _succeed_evaluation(self, job_id: str, results: dict[str, Any]) -> None:
        with self.database.session() as session:
            row = st.get_evaluation(session, job_id, lock=True)
            if row.state != "RUNNING":
                return  # cancelled meanwhile: keep what Cancel wrote
            row.results = st.jsonable(results)
            row.report_uri = next(
                (r["uri"] for r in results["reports"] if r["file_name"] == "report.md"), ""
            )
            st.set_state(row, "SUCCEEDED")
            values = {m["name"]: m["value"] for m in results["metrics"]}
            st.add_job_event(session, row, values)
            payload = events_pb2.EvaluationCompleted(
                evaluation=f"evaluations/{job_id}",
                model_version=row.model_version,
                metrics={k: v for k, v in values.items() if math.isfinite(v)},
            )
            add_event(session, COMPLETED_TOPIC, payload, subject=f"evaluations/{job_id}",
                      source=SOURCE)  # fmt: skip
        self.notify_outbox()

    # -------------------------------------------------------------- benchmark

    async def _benchmark(self, job_id: str) -> None:
        row, config = await asyncio.to_thread(self._config, "benchmark", job_id)
        version = await self.sources.version(row.model_version)
        path = await self.sources.onnx_file(version)
        outcome = await self._run_child(job_id, path, config)
        outcome["model_size_bytes"] = path.stat().st_size
        if config.get("log_to_registry"):
            await self._log_benchmark(row.model_version, config["provider"], outcome)
        await asyncio.to_thread(self._succeed_benchmark, job_id, outcome)

    async def _run_child(self, job_id: str, path: Path, config: dict) -> dict[str, Any]:
        child_config = {**config, "model": str(path)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aimass.evaluation.bench_child", json.dumps(child_config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        cancelled = self.cancel_check("benchmark", job_id)
        results: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        total = len(config["batch_sizes"])
        try:
            while True:
                try:
                    line = await asyncio.wait_for(process.stdout.readline(), PROGRESS_INTERVAL_S)
                except TimeoutError:
                    if await asyncio.to_thread(cancelled):
                        raise Cancelled from None
                    continue
                if not line:
                    break
                value = json.loads(line)
                if "batch_size" in value:
                    results.append(value)
                    await asyncio.to_thread(
                        self._progress, "benchmark", job_id, len(results), total, "batch sizes"
                    )
                else:
                    final = value
            error = (await process.stderr.read()).decode(errors="replace").strip()
            if await process.wait() != 0 or not final:
                raise FailedPrecondition(f"the benchmark process failed: {error[-500:]}")
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return {"results": results, **final}

    async def _log_benchmark(self, version: str, provider: str, outcome: dict) -> None:
        prefix = "" if provider == "cpu" else f"{provider}_"
        values = {"peak_memory_bytes": float(outcome["peak_memory_bytes"])}
        for result in outcome["results"]:
            for key in BENCHMARK_FIGURES:
                values[f"{key}_b{result['batch_size']}"] = result[key]
        metrics = [
            common_pb2.Metric(name=f"{prefix}{name}", value=value, source="benchmark")
            for name, value in values.items()
        ]
        async with calling("registry"):
            await self.sources.registry.LogVersionMetrics(
                registry_pb2.LogVersionMetricsRequest(name=version, metrics=metrics)
            )

    def _succeed_benchmark(self, job_id: str, outcome: dict[str, Any]) -> None:
        with self.database.session() as session:
            row = st.get_benchmark(session, job_id, lock=True)
            if row.state != "RUNNING":
                return
            row.results = st.jsonable(outcome)
            st.set_state(row, "SUCCEEDED")
            st.add_job_event(session, row)
