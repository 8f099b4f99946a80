"""Monitoring of deployments: drift of captured predictions against the training split, alerts.

The routing service writes a sample of each deployment's Predict calls as
Parquet files and announces each with ``aimass.routing.predictions.logged``
(see :mod:`aimass.routing.prediction_log`). This module:

- records those announcements (:class:`BatchRecorder`, durable consumer
  ``evaluation-on-predictions-logged``) in ``monitored_batches``;
- runs each monitor on its schedule (:class:`MonitorScheduler`) or on demand
  (RunMonitor): the files whose calls fall in the monitor's window are read,
  their inputs compared with the train split of the dataset version the
  serving model version was trained on (read through the data service): PSI
  and KS per feature, PSI of the predicted classes against the training
  labels (of predicted values against the label values for regression),
  error rate and latency of the captured calls;
- judges each alert rule (value above threshold, once the window holds the
  rule's ``min_rows``) and fires ``aimass.monitoring.alert.fired`` when a rule
  starts firing (not again until it stopped). Webhooks subscribed to that
  event type deliver it (aimass.core.auth.webhooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aimass.core.artifacts import ArtifactStore
from aimass.core.errors import AimassError
from aimass.core.events import Envelope, EventBus, unpack
from aimass.core.splits import column_to_numpy
from aimass.evaluation import drift
from aimass.evaluation.inference import feature_matrix
from aimass.evaluation.monitor_store import Batch, FiredAlert, MonitorStore, monitor_config
from aimass.evaluation.sources import Sources, label_column, version_config
from aimass.evaluation.store import ts
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.events.v1 import events_pb2

log = logging.getLogger(__name__)

TOPIC_LOGGED = "aimass.routing.predictions.logged"
RECORDER_DURABLE = "evaluation-on-predictions-logged"
# At most this many reference rows are compared (a uniform sample of the split).
MAX_REFERENCE_ROWS = 50_000
CACHED_FILES = 64
CACHED_REFERENCES = 8


@dataclass(frozen=True)
class Reference:
    """The training split of a dataset version, as the monitor compares it."""

    dataset_version: str
    features: np.ndarray
    names: list[str]
    labels: np.ndarray
    classes: list[object]
    classification: bool


class BatchRecorder:
    """Follows routing's announcements of captured files."""

    def __init__(self, store: MonitorStore) -> None:
        self.store = store

    async def subscribe(self, bus: EventBus) -> None:
        await bus.subscribe(RECORDER_DURABLE, [TOPIC_LOGGED], self.on_logged)

    async def on_logged(self, envelope: Envelope) -> None:
        logged = unpack(envelope, events_pb2.PredictionsLogged)
        await asyncio.to_thread(self.store.record_batch, envelope.id, logged)


class MonitorRunner:
    """One run of a monitor: read the window, measure, judge the rules, fire alerts."""

    def __init__(self, store: MonitorStore, artifacts: ArtifactStore, sources: Sources) -> None:
        self.store = store
        self.artifacts = artifacts
        self.sources = sources
        self._files: OrderedDict[str, pa.Table] = OrderedDict()
        self._references: OrderedDict[str, Reference] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def run(self, monitor_id: str) -> pb.MonitorReport:
        lock = self._locks.setdefault(monitor_id, asyncio.Lock())
        async with lock:
            monitor = await asyncio.to_thread(self.store.get, monitor_id)
            config = monitor_config(monitor)
            end = datetime.now(UTC)
            start = end - timedelta(seconds=config["window_s"])
            batches = await asyncio.to_thread(self.store.batches, monitor.deployment, start, end)
            table = await self._window(batches, start, end)
            report = pb.MonitorReport(
                run_time=ts(end),
                window_start=ts(start),
                window_end=ts(end),
                batches=len(batches),
                dropped_calls=sum(b.dropped for b in batches),
            )
            details = await self._measure(report, table, config["bins"])
            firing, fired = judge(report, config["rules"], details)
            previous = set(monitor.firing_rules)
            new = [f for f in fired if f.rule not in previous]
            await asyncio.to_thread(self.store.save_run, monitor_id, report, firing, new)
            return report

    # ---- reading ----------------------------------------------------------------------

    async def _window(
        self, batches: list[Batch], start: datetime, end: datetime
    ) -> pa.Table | None:
        tables = [await self._file(b.uri) for b in batches]
        tables = [t for t in tables if t is not None and t.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="default")
        low = pa.scalar(start, pa.timestamp("us", tz="UTC"))
        high = pa.scalar(end, pa.timestamp("us", tz="UTC"))
        time = table.column("time")
        return table.filter(pc.and_(pc.greater_equal(time, low), pc.less_equal(time, high)))

    async def _file(self, uri: str) -> pa.Table | None:
        cached = self._files.get(uri)
        if cached is not None:
            self._files.move_to_end(uri)
            return cached
        with tempfile.TemporaryDirectory(prefix="aimass-monitor-") as folder:
            path = Path(folder) / "batch.parquet"
            try:
                await self.artifacts.get_file(uri, path)
            except AimassError as err:
                log.warning("captured file %s is unreadable: %s", uri, err.message)
                return None
            table = await asyncio.to_thread(pq.read_table, path)
        self._files[uri] = table
        while len(self._files) > CACHED_FILES:
            self._files.popitem(last=False)
        return table

    async def _reference(self, model_version: str) -> Reference:
        version = await self.sources.version(model_version)
        dataset_name = version.source.dataset_version
        if not dataset_name:
            raise ValueError(f"{model_version} names no dataset version it was trained on")
        cached = self._references.get(dataset_name)
        if cached is not None:
            return cached
        dataset = await self.sources.dataset_version(dataset_name)
        label = label_column(dataset)
        table = await self.sources.split_table(dataset_name, "train")
        classes = version_config(version).get("classes")
        reference = await asyncio.to_thread(
            build_reference, table, dataset_name, label, list(dataset.config.feature_columns),
            bool(dataset.label_distribution), classes,
        )  # fmt: skip
        self._references[dataset_name] = reference
        while len(self._references) > CACHED_REFERENCES:
            self._references.popitem(last=False)
        return reference

    # ---- measuring --------------------------------------------------------------------

    async def _measure(
        self, report: pb.MonitorReport, table: pa.Table | None, bins: int
    ) -> dict[str, str]:
        """Fills the report; returns why metrics could not be measured, by metric."""
        details: dict[str, str] = {}
        if table is None or not table.num_rows:
            return details
        health(report, table)
        ok = table.filter(pc.equal(table.column("code"), "OK"))
        if not ok.num_rows:
            return details
        versions = Counter(ok.column("model_version").to_pylist())
        report.model_version = versions.most_common(1)[0][0]
        try:
            reference = await self._reference(report.model_version)
        except (AimassError, ValueError) as err:
            reason = err.message if isinstance(err, AimassError) else str(err)
            return {"drift": f"no reference: {reason}"}
        report.reference_dataset_version = reference.dataset_version
        report.reference_rows = len(reference.features)
        problem = await asyncio.to_thread(compare, report, ok, reference, bins)
        if problem:
            details["drift"] = problem
        return details

    def forget(self, monitor_id: str) -> None:
        self._locks.pop(monitor_id, None)


def build_reference(
    table: pa.Table,
    dataset_version: str,
    label: str,
    feature_columns: list[str],
    classification: bool,
    classes: list[object] | None,
) -> Reference:
    """Feature matrix and labels of a train split, subsampled to MAX_REFERENCE_ROWS."""
    if table.num_rows > MAX_REFERENCE_ROWS:
        rng = np.random.default_rng(0)
        keep = np.sort(rng.choice(table.num_rows, MAX_REFERENCE_ROWS, replace=False))
        table = table.take(pa.array(keep))
    columns = feature_columns or [c for c in table.column_names if c != label]
    features = feature_matrix(table, columns)
    names = []
    for column in columns:
        width = column_to_numpy(table.column(column)).reshape(table.num_rows, -1).shape[1]
        names.extend([column] if width == 1 else [f"{column}[{i}]" for i in range(width)])
    labels = column_to_numpy(table.column(label)) if label in table.column_names else np.array([])
    order = list(classes) if classes else sorted(set(labels.tolist())) if classification else []
    return Reference(dataset_version, features, names, labels, order, classification)


def health(report: pb.MonitorReport, table: pa.Table) -> None:
    """Calls, failures and latency of the captured calls (one row per call: sample 0)."""
    calls = table.filter(pc.equal(table.column("sample"), 0))
    report.rows = table.num_rows
    report.calls = calls.num_rows
    report.failed_calls = calls.num_rows - pc.sum(pc.equal(calls.column("code"), "OK")).as_py()
    report.error_rate = report.failed_calls / report.calls if report.calls else 0.0
    latency = calls.column("latency_ms").to_numpy()
    if len(latency):
        report.latency_p50_ms = float(np.percentile(latency, 50))
        report.latency_p99_ms = float(np.percentile(latency, 99))


def captured_matrix(table: pa.Table, prefix: str) -> np.ndarray | None:
    """The ``<prefix>.*`` tensor columns as one [rows, d] float64 array, in column order."""
    parts = []
    for name in table.column_names:
        if not name.startswith(prefix + "."):
            continue
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            lengths = pc.unique(pc.list_value_length(column)).to_pylist()
            if len(lengths) != 1 or lengths[0] is None or column.null_count:
                return None
            width = lengths[0]
        else:
            return None
        if not pa.types.is_integer(column.type.value_type) and not pa.types.is_floating(
            column.type.value_type
        ):
            return None
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        parts.append(values.reshape(-1, width))
    return np.concatenate(parts, axis=1) if parts else None


def compare(report: pb.MonitorReport, table: pa.Table, reference: Reference, bins: int) -> str:
    """Per-feature PSI and KS, and the prediction shift, into ``report``; a problem or ""."""
    inputs = captured_matrix(table, "inputs")
    problem = ""
    if inputs is None or inputs.shape[1] != reference.features.shape[1]:
        width = "no numeric input" if inputs is None else f"{inputs.shape[1]} input values"
        problem = (
            f"captured calls have {width} per row; the training split has"
            f" {reference.features.shape[1]} features"
        )
    else:
        for j, name in enumerate(reference.names):
            statistic, p_value = drift.ks_test(reference.features[:, j], inputs[:, j])
            report.features.add(
                feature=name,
                psi=drift.psi(reference.features[:, j], inputs[:, j], bins),
                ks=statistic,
                ks_p_value=p_value,
            )
    report.prediction_psi = prediction_shift(table, reference, bins)
    return problem


def prediction_shift(table: pa.Table, reference: Reference, bins: int) -> float:
    """PSI of what the model predicts against the training labels (NaN when not comparable)."""
    outputs = captured_matrix(table, "outputs")
    if outputs is None or not len(reference.labels):
        return math.nan
    if reference.classification:
        index = {value: i for i, value in enumerate(reference.classes)}
        labels = np.array([index.get(v, -1) for v in reference.labels.tolist()])
        if outputs.shape[1] > 1:
            predicted = outputs.argmax(axis=1)
        else:
            scores = outputs[:, 0]
            cut = 0.5 if scores.min() >= 0 and scores.max() <= 1 else 0.0
            predicted = (scores > cut).astype(np.int64)
        return drift.categorical_psi(labels, predicted)
    return drift.psi(reference.labels.astype(np.float64), outputs[:, 0], bins)


METRIC_ROWS = {
    "MONITOR_METRIC_ERROR_RATE": "calls",
    "MONITOR_METRIC_LATENCY_P99_MS": "calls",
    "MONITOR_METRIC_LATENCY_P50_MS": "calls",
}


def _worst(report: pb.MonitorReport, attribute: str) -> tuple[float, str]:
    values = [(getattr(f, attribute), f.feature) for f in report.features]
    values = [v for v in values if not math.isnan(v[0])]
    return max(values) if values else (math.nan, "")


def metric_value(report: pb.MonitorReport, metric: str) -> tuple[float, str]:
    """The value a rule of ``metric`` compares, and the feature it comes from."""
    if metric == "MONITOR_METRIC_FEATURE_PSI":
        return _worst(report, "psi")
    if metric == "MONITOR_METRIC_FEATURE_KS":
        return _worst(report, "ks")
    simple = {
        "MONITOR_METRIC_PREDICTION_PSI": report.prediction_psi,
        "MONITOR_METRIC_ERROR_RATE": report.error_rate,
        "MONITOR_METRIC_LATENCY_P99_MS": report.latency_p99_ms,
        "MONITOR_METRIC_LATENCY_P50_MS": report.latency_p50_ms,
    }
    return simple[metric], ""


def judge(
    report: pb.MonitorReport, rules: list[dict], details: dict[str, str]
) -> tuple[list[str], list[FiredAlert]]:
    """Each rule's result into the report; the names of firing rules and their alerts."""
    firing, fired = [], []
    for rule in rules:
        metric = rule["metric"]
        rows = report.calls if METRIC_ROWS.get(metric) == "calls" else report.rows
        result = report.rules.add(
            rule=rule["name"],
            metric=pb.MonitorMetric.Value(metric),
            threshold=rule["threshold"],
            value=math.nan,
        )
        if rows < rule["min_rows"]:
            result.detail = f"{rows} rows in the window; the rule needs {rule['min_rows']}"
            continue
        value, feature = metric_value(report, metric)
        if math.isnan(value):
            result.detail = details.get("drift", "not measurable on these calls")
            continue
        result.value = value
        result.detail = feature
        result.firing = value > rule["threshold"]
        if result.firing:
            firing.append(rule["name"])
            fired.append(FiredAlert(rule["name"], metric, value, rule["threshold"], feature))
    return firing, fired


class MonitorScheduler:
    """Runs due monitors: every ``tick_s`` claims those whose next run time passed."""

    def __init__(self, store: MonitorStore, runner: MonitorRunner, tick_s: float = 1.0) -> None:
        self.store = store
        self.runner = runner
        self.tick_s = tick_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                due = await asyncio.to_thread(self.store.claim_due, datetime.now(UTC))
            except Exception:
                log.exception("claiming due monitors failed")
                continue
            for monitor_id in due:
                try:
                    await self.runner.run(monitor_id)
                except Exception:
                    # One broken monitor must not stop the others; the next slot retries.
                    log.exception("monitors/%s: run failed", monitor_id)
