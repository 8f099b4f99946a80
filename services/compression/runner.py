"""Runs one compression job: parent in, steps run and measured, the chosen result registered.

Everything it reads comes over gRPC (:mod:`aimass.compression.sources`); the
heavy work (quantization, torch, measurements) runs in a thread. The job row
is the truth: each step appends a Watch event with its figures, and the end
state, the reports and the outbox event (``aimass.compression.job.succeeded``
or ``failed``) commit together. A redelivered job that already ended is left
alone; one that died mid-run runs again from the start (steps are
deterministic, and the new version is created with the job id as request id,
so it is registered once).

Before registration the chosen model is checked: it loads in onnxruntime, its
outputs are within the recipe's tolerance of the parent's (for steps meant to
keep the function), and Triton accepts it (:mod:`aimass.compression.triton_check`: loaded
under a temporary name, one inference compared with ONNX Runtime); a refusal fails the
step with Triton's message and nothing is registered; without a Triton the report says
the check was skipped.

A model without labels to score (a sentence-embedding model, imported as ONNX) is checked
on the parent's outputs instead: with ``accuracy_budget.metric: "cosine"``, or when neither
the dataset nor the model's signature names a label column present in the check split,
the metric is the smallest per-row cosine similarity of the child's outputs to the
parent's (:data:`aimass.compression.recipe.COSINE`). An input the signature maps to no
columns reads the split's column of its name, or its columns ``<name>_0``, ``<name>_1``...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import torch
from google.protobuf import struct_pb2

from aimass.common.v1 import common_pb2
from aimass.compression import evaluations as ev
from aimass.compression import measure as ms
from aimass.compression import recipe as rc
from aimass.compression import store as st
from aimass.compression import structural as sx
from aimass.compression import training_jobs as tj
from aimass.compression import triton_check as tc
from aimass.compression.sources import Sources, artifact_of, require_onnx, version_config
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core import nn as ann
from aimass.core.artifacts import ArtifactStore
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, FailedPrecondition, Unavailable
from aimass.core.events import add_event
from aimass.core.triton.acceptance import Verdict
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2

log = logging.getLogger(__name__)

SUCCEEDED_TOPIC = "aimass.compression.job.succeeded"
FAILED_TOPIC = "aimass.compression.job.failed"
SPLIT_NAMES = {common_pb2.DATASET_SPLIT_TRAIN: "train", common_pb2.DATASET_SPLIT_VALID: "valid",
               common_pb2.DATASET_SPLIT_TEST: "test"}  # fmt: skip
CHECK_ROWS = 1024
DEFAULT_CALIBRATION_ROWS = 512
TritonCheck = Callable[[Path, dict[str, np.ndarray]], Awaitable[Verdict]]
# Rows of the check split sent through Triton by the acceptance check.
TRITON_SAMPLE_ROWS = 4


class JobCancelled(Exception):
    pass


def signature_of(config: dict[str, Any], table: pa.Table, label: str) -> ann.ModelSignature:
    """The parent's signature from its config, else one input "input" of the feature columns."""
    if "signature" in config:
        return ann.ModelSignature.from_dict(config["signature"])
    data = ann.data_signature_from_table(table, label)
    classes = tuple(str(c) for c in config.get("classes", data.classes))
    features = tuple(c.name for c in data.features)
    return ann.ModelSignature(
        inputs=(ann.TensorSpec("input", "FP32", (-1, data.feature_width), features),),
        outputs=(ann.TensorSpec("output", "FP32", (-1, len(classes) or 1)),),
        task=config.get("task", data.task), loss="cross_entropy" if classes else "mse",
        label_column=label, classes=classes,
    )  # fmt: skip


def is_unlabelled(requested_metric: str, label: str, table: pa.Table) -> bool:
    """Whether the job checks outputs against the parent's (no label to score on)."""
    return requested_metric == rc.COSINE or not label or label not in table.column_names


def unlabelled_signature(
    config: dict[str, Any], parent: registry_pb2.ModelVersion, table: pa.Table
) -> ann.ModelSignature:
    """The parent's signature, each input fed from the split's columns named after it."""
    if "signature" in config:
        signature = ann.ModelSignature.from_dict(config["signature"])
    else:
        signature = ann.ModelSignature(
            inputs=tuple(ann.TensorSpec(t.name, t.datatype, tuple(t.shape))
                         for t in parent.signature.inputs),
            outputs=tuple(ann.TensorSpec(t.name, t.datatype, tuple(t.shape))
                          for t in parent.signature.outputs),
            task="", loss="",
        )  # fmt: skip
    inputs = tuple(
        spec if spec.columns else replace(spec, columns=columns_named(spec.name, table))
        for spec in signature.inputs
    )
    return replace(signature, inputs=inputs, label_column="")


def columns_named(name: str, table: pa.Table) -> tuple[str, ...]:
    """The column ``name``, else ``name_0``, ``name_1``... in index order."""
    if name in table.column_names:
        return (name,)
    prefix = f"{name}_"
    indexed = [c for c in table.column_names
               if c.startswith(prefix) and c[len(prefix):].isdigit()]  # fmt: skip
    if not indexed:
        raise FailedPrecondition(
            f"the check split has no column for the model input {name!r} (expected a column "
            f"{name!r} or {name}_0, {name}_1, ...; it has {', '.join(table.column_names)})"
        )
    return tuple(sorted(indexed, key=lambda c: int(c[len(prefix) :])))


def input_names_of(path: Path) -> list[str]:
    return [i.name for i in ms.session(path).get_inputs()]  # type: ignore[attr-defined]


def eval_data(
    table: pa.Table, signature: ann.ModelSignature, names: list[str], metric: str
) -> rc.EvalData:
    arrays = ann.input_arrays(table, signature)
    feeds = dict(zip(names, arrays, strict=False))
    if metric == rc.COSINE:  # no labels: the rows are compared with the parent's outputs
        return rc.EvalData(feeds, np.zeros(table.num_rows), signature.task, metric)
    labels = ann.label_array(table, signature)
    task = signature.task
    return rc.EvalData(feeds, np.asarray(labels).reshape(-1), task, metric)


def default_metric(task: str, requested: str) -> str:
    if requested:
        return requested
    return "accuracy" if task == ann.CLASSIFICATION else "mse"


def step_report(outcome: rc.Outcome, metric: str, figures: ms.Figures | None) -> pb.StepReport:
    params = struct_pb2.Struct()
    params.update(_jsonable(outcome.params))
    report = pb.StepReport(
        step_name=outcome.name, status=pb.StepStatus.Value(f"STEP_STATUS_{outcome.status}"),
        reason=outcome.reason, params=params,
        max_output_difference=_finite(outcome.max_output_difference),
    )  # fmt: skip
    if outcome.metric_before == outcome.metric_before:
        report.metrics_before.add(name=metric, value=outcome.metric_before, source="compression")
    if outcome.metric_after == outcome.metric_after:
        report.metrics_after.add(name=metric, value=outcome.metric_after, source="compression")
    if figures is not None:
        _fill(report, figures)
    return report


def _finite(value: float) -> float:
    return value if np.isfinite(value) else 0.0


def _fill(report: pb.StepReport, figures: ms.Figures) -> None:
    report.file_size_bytes = figures.file_size_bytes
    report.peak_memory_bytes = figures.peak_memory_bytes
    report.latency_p50_ms = figures.latency_p50_ms
    report.latency_p99_ms = figures.latency_p99_ms
    report.throughput_rows_per_second = figures.throughput_rows_per_second
    if "parameters" not in report.params.fields:  # a Struct has no .get()
        report.params["parameters"] = figures.parameter_count


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float | np.number):
        return float(value)
    return str(value)


def version_metrics(
    baseline: ms.Figures, chosen: ms.Figures, parameters: int, parent_parameters: int,
    metric: str, before: float, after: float,
) -> list[common_pb2.Metric]:  # fmt: skip
    """What the new version records: its figures, the parent's, and ratios."""

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    values = {
        "file_size_bytes": chosen.file_size_bytes,
        "parameter_count": parameters,
        "peak_memory_bytes": chosen.peak_memory_bytes,
        "latency_p50_ms": chosen.latency_p50_ms,
        "latency_p99_ms": chosen.latency_p99_ms,
        "throughput_rows_per_second": chosen.throughput_rows_per_second,
        "file_size_ratio": ratio(chosen.file_size_bytes, baseline.file_size_bytes),
        "parameter_ratio": ratio(parameters, parent_parameters),
        "throughput_ratio": ratio(
            chosen.throughput_rows_per_second, baseline.throughput_rows_per_second
        ),
        "latency_p50_ratio": ratio(chosen.latency_p50_ms, baseline.latency_p50_ms),
        f"{metric}": after,
        f"parent_{metric}": before,
    }
    return [
        common_pb2.Metric(name=k, value=float(v), source="compression") for k, v in values.items()
    ]


def ranked(
    outcomes: list[rc.Outcome], figures: dict[str, ms.Figures], recipe: pb.Recipe, metric: str
) -> list[rc.Outcome]:
    """The APPLIED steps, best first: the recipe's choice, then the next best, and so on.

    Chain: the last APPLIED step, then the one before (each within the budget). Candidates:
    by the selection (fastest by default, measured in ``figures`` as ``step-<index>``).
    """
    applied = [(i, o) for i, o in enumerate(outcomes) if o.status == rc.APPLIED]
    if recipe.mode != pb.RECIPE_MODE_CANDIDATES:
        return [o for _, o in reversed(applied)]
    selection = recipe.selection

    def key(pair: tuple[int, rc.Outcome]) -> float:
        index, outcome = pair
        figure = figures[f"step-{index}"]
        if selection == pb.SELECTION_SMALLEST:
            return float(figure.file_size_bytes)
        if selection == pb.SELECTION_MOST_ACCURATE:
            sign = 1.0 if metric in rc.LOWER_IS_BETTER else -1.0
            return sign * outcome.metric_after
        if selection == pb.SELECTION_LOWEST_LATENCY:
            return figure.latency_p50_ms
        return -figure.throughput_rows_per_second

    return [o for _, o in sorted(applied, key=key)]


class Runner:
    """Runs compression jobs by name."""

    def __init__(
        self,
        database: Database,
        artifacts: ArtifactStore,
        sources: Sources,
        notify_outbox: Callable[[], None],
        work_dir: Path,
        triton_check: TritonCheck | None = None,
        evaluations: ev.Evaluations | None = None,
        training: grpc.aio.Channel | None = None,
    ) -> None:
        self.training = training  # fine_tune / distill steps become training jobs there
        self.database = database
        self.artifacts = artifacts
        self.sources = sources
        self.notify_outbox = notify_outbox
        self.work_dir = work_dir
        self.triton_check = triton_check
        self.evaluations = evaluations

    # --------------------------------------------------------------- state changes

    def _start(self, job_id: str) -> pb.CompressionJob | None:
        with self.database.session(resource=f"compressionJobs/{job_id}") as session:
            row = st.get_job(session, job_id, lock=True)
            if row.state in st.TERMINAL:
                return None
            if row.state == "CANCELLING":
                st.set_state(row, "CANCELLED", "cancelled on request")
                st.add_job_event(session, row)
                return None
            st.set_state(row, "RUNNING")
            st.set_progress(row, 0, len(st.job_input(row).recipe.steps))
            st.add_job_event(session, row, log_line=f"started (attempt {row.attempt})")
            return st.job_to_proto(row)

    def _state(self, job_id: str) -> str:
        with self.database.session(read_only=True) as session:
            return st.get_job(session, job_id).state

    def _step_done(self, job_id: str, index: int, total: int, report: pb.StepReport) -> None:
        with self.database.session(resource=f"compressionJobs/{job_id}") as session:
            row = st.get_job(session, job_id, lock=True)
            st.set_progress(row, index + 1, total)
            steps = list((row.metrics or {}).get("steps", []))
            steps.append(st.report_dict(report))
            row.metrics = {**(row.metrics or {}), "steps": steps}
            figures = {m.name: m.value for m in report.metrics_after}
            figures["max_output_difference"] = report.max_output_difference
            status = pb.StepStatus.Name(report.status).removeprefix("STEP_STATUS_")
            line = f"step {report.step_name}: {status}" + (
                f" ({report.reason})" if report.reason else ""
            )
            st.add_job_event(session, row, figures, line, step=index + 1)

    def _finish(
        self, job_id: str, state: str, reason: str, results: dict[str, Any] | None,
        model_version: str = "",
    ) -> None:  # fmt: skip
        with self.database.session(resource=f"compressionJobs/{job_id}") as session:
            row = st.get_job(session, job_id, lock=True)
            if results is not None:
                row.metrics = results
            row.result_version = model_version
            st.set_state(row, state, reason)
            st.add_job_event(session, row, log_line=reason)
            job = st.job_to_proto(row)
            if state == "SUCCEEDED":
                payload = events_pb2.CompressionJobSucceeded(
                    job=job.name, parent_version=job.parent_version,
                    model_version=model_version, evaluate=job.evaluate and bool(model_version),
                )  # fmt: skip
                add_event(session, SUCCEEDED_TOPIC, payload, subject=job.name, source="compression")
            elif state == "FAILED":
                payload_failed = events_pb2.CompressionJobFailed(job=job.name, reason=reason)
                add_event(
                    session, FAILED_TOPIC, payload_failed, subject=job.name, source="compression"
                )
        self.notify_outbox()

    # ----------------------------------------------------------------------- run

    async def run(self, job_name: str) -> None:
        job_id = job_name.removeprefix("compressionJobs/")
        job = await asyncio.to_thread(self._start, job_id)
        if job is None:
            return
        try:
            results, version = await self._execute(job_id, job)
        except JobCancelled:
            await asyncio.to_thread(self._finish, job_id, "CANCELLED", "cancelled on request", None)
        except Unavailable:
            raise  # the worker naks: another attempt later
        except AimassError as err:
            await asyncio.to_thread(self._finish, job_id, "FAILED", err.message, None)
        except Exception as err:
            log.exception("compression job %s failed", job_id)
            await asyncio.to_thread(
                self._finish, job_id, "FAILED", f"{type(err).__name__}: {err}", None
            )
        else:
            chosen = results.get("chosen_step", "")
            reason = "" if chosen else "no step passed: nothing registered (see the step reports)"
            await asyncio.to_thread(self._finish, job_id, "SUCCEEDED", reason, results, version)

    async def _execute(self, job_id: str, job: pb.CompressionJob) -> tuple[dict[str, Any], str]:
        parent = await self.sources.version(job.parent_version)
        require_onnx(parent, "compression_job.parent_version")
        onnx_path = await self.sources.artifact_file(parent, "onnx")
        config = version_config(parent)
        recipe = job.recipe
        dataset_version = recipe.evaluation_dataset_version or parent.source.dataset_version
        if not dataset_version:
            raise FailedPrecondition(
                f"{parent.name} records no dataset version: set recipe.evaluation_dataset_version"
            )
        dataset = await self.sources.dataset_version(dataset_version)
        label = dataset.config.label_column or config.get("signature", {}).get("label_column", "")
        split = SPLIT_NAMES.get(recipe.evaluation_split, "test")
        table = await self.sources.split_table(dataset_version, split)
        if table.num_rows == 0:
            raise FailedPrecondition(f"{dataset_version} split {split} has no rows to check on")
        table = table.slice(0, CHECK_ROWS)
        if is_unlabelled(recipe.accuracy_budget.metric, label, table):
            signature, metric = unlabelled_signature(config, parent, table), rc.COSINE
        else:
            signature = signature_of(config, table, label)
            metric = default_metric(signature.task, recipe.accuracy_budget.metric)
        evaluation = eval_data(table, signature, input_names_of(onnx_path), metric)
        torch_model, no_torch = await self._torch_model(parent, config)
        tables = await self._prefetch(recipe, dataset_version)
        work = self.work_dir / job_id
        work.mkdir(parents=True, exist_ok=True)
        inputs = rc.Inputs(
            parent_onnx=onnx_path, torch_model=torch_model, no_torch_reason=no_torch,
            evaluation=evaluation,
            calibration=lambda s: self._calibration(
                s, tables, dataset_version, signature, evaluation
            ),
            train=self._remote_training(
                job, parent.source.dataset_version or dataset_version, work
            ),
            parent_learning_rate=float(
                config.get("training", {}).get("learning_rate", 1e-3) or 1e-3
            ),
            parent_batch_size=int(config.get("training", {}).get("batch_size", 64) or 64),
            parent_version=parent.name,
        )  # fmt: skip
        last_check = [0.0, False]

        def cancelled() -> bool:
            if time.monotonic() - last_check[0] > 1.0:
                last_check[0] = time.monotonic()
                last_check[1] = self._state(job_id) in ("CANCELLING", "CANCELLED")
            return bool(last_check[1])

        total = len(recipe.steps)

        def progress(index: int, outcome: rc.Outcome) -> None:
            self._step_done(job_id, index, total, step_report(outcome, metric, None))

        result = await asyncio.to_thread(
            rc.run_recipe, recipe, inputs, work, progress=progress, cancelled=cancelled
        )
        if cancelled():
            raise JobCancelled
        return await self._conclude(
            job_id, job, parent, config, result, evaluation, metric, onnx_path
        )

    async def _torch_model(
        self, parent: registry_pb2.ModelVersion, config: dict[str, Any]
    ) -> tuple[sx.TorchModel | None, str]:
        if artifact_of(parent, "state_dict") is None:
            return None, f"{parent.name} has no state_dict artifact"
        if "model" not in config or "data_signature" not in config:
            return (
                None,
                f"{parent.name}'s config has no model spec and data signature to rebuild it",
            )
        path = await self.sources.artifact_file(parent, "state_dict")

        def load() -> sx.TorchModel:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return sx.load_torch_model(config, state)

        try:
            return await asyncio.to_thread(load), ""
        except Exception as err:
            return None, f"cannot rebuild {parent.name} in PyTorch: {err}"

    async def _prefetch(
        self, recipe: pb.Recipe, default_dataset: str
    ) -> dict[tuple[str, str], pa.Table]:
        """The splits the steps need, read once: calibration splits and the train split."""
        wanted: set[tuple[str, str]] = set()
        for step in recipe.steps:
            method = step.WhichOneof("method")
            if method == "quantize_static":
                s = step.quantize_static
                wanted.add((s.calibration_dataset_version or default_dataset,
                            SPLIT_NAMES.get(s.calibration_split, "train")))  # fmt: skip
        return {key: await self.sources.split_table(*key) for key in sorted(wanted)}

    @staticmethod
    def _calibration(
        step: pb.QuantizeStatic, tables: dict[tuple[str, str], pa.Table], default_dataset: str,
        signature: ann.ModelSignature, evaluation: rc.EvalData,
    ) -> list[dict[str, np.ndarray]]:  # fmt: skip
        key = (step.calibration_dataset_version or default_dataset,
               SPLIT_NAMES.get(step.calibration_split, "train"))  # fmt: skip
        table = tables[key]
        if table.num_rows == 0:
            raise FailedPrecondition(
                f"quantize_static.calibration_split: {key[0]} split {key[1]} is empty: "
                "static quantization needs rows to calibrate on"
            )
        table = table.slice(0, step.calibration_rows or DEFAULT_CALIBRATION_ROWS)
        arrays = ann.input_arrays(table, signature)
        names = list(evaluation.feeds)
        return [
            {name: a[i : i + 64] for name, a in zip(names, arrays, strict=False)}
            for i in range(0, table.num_rows, 64)
        ]

    def _remote_training(
        self, job: pb.CompressionJob, dataset_version: str, work: Path
    ) -> rc.Train:
        """Training jobs for the fine_tune / distill steps, on the parent's dataset version."""
        if self.training is None:

            def unavailable(request: rc.TrainRequest, cancelled: Callable[[], bool]) -> rc.Trained:
                raise FailedPrecondition(
                    f"{request.kind} runs as a training job: this compression runner has no "
                    "training service client"
                )

            return unavailable
        return tj.RemoteTraining(
            self.training, self.artifacts, job.name, dataset_version, work,
            asyncio.get_running_loop(), project=job.project,
        )  # fmt: skip

    async def _conclude(
        self, job_id: str, job: pb.CompressionJob, parent: registry_pb2.ModelVersion,
        config: dict[str, Any], result: rc.RecipeResult, evaluation: rc.EvalData, metric: str,
        parent_onnx: Path,
    ) -> tuple[dict[str, Any], str]:  # fmt: skip
        measured = {f"step-{i}": o.onnx_path for i, o in enumerate(result.outcomes)
                    if o.onnx_path is not None
                    and o.status in (rc.APPLIED, rc.OVER_BUDGET)}  # fmt: skip
        paths = {"baseline": parent_onnx, **measured}
        figures = await asyncio.to_thread(
            ms.measure_all, paths, evaluation.sample(1), evaluation.sample(64)
        )
        chosen, triton_line = await self._first_accepted(
            ranked(result.outcomes, figures, job.recipe, evaluation.metric), evaluation
        )
        baseline = rc.Outcome("baseline", "", rc.APPLIED, metric_before=result.parent_metric,
                              metric_after=result.parent_metric,
                              max_output_difference=0.0)  # fmt: skip
        baseline_report = step_report(baseline, metric, figures["baseline"])
        reports = []
        for index, outcome in enumerate(result.outcomes):
            report = step_report(outcome, metric, figures.get(f"step-{index}"))
            if outcome.onnx_path is not None and outcome.status in (rc.APPLIED, rc.OVER_BUDGET):
                stored = await self.artifacts.put_file(outcome.onnx_path)
                report.artifact.CopyFrom(common_pb2.Artifact(
                    kind="onnx", uri=stored.uri, size_bytes=stored.size, sha256=stored.sha256,
                    file_name=f"{outcome.name}.onnx",
                ))  # fmt: skip
            reports.append(report)
        results = {
            "baseline": st.report_dict(baseline_report),
            "steps": [st.report_dict(r) for r in reports],
            "chosen_step": chosen.name if chosen is not None else "",
            "triton_check": triton_line,
        }
        if chosen is None:
            return results, ""
        index = result.outcomes.index(chosen)
        version = await self._register(
            job_id, job, parent, config, chosen, figures["baseline"], figures[f"step-{index}"],
            metric, result.parent_metric,
        )  # fmt: skip
        own = (result.parent_metric, chosen.metric_after)
        results["before_after"] = (await self._before_after(job_id, job, parent, version, metric,
                                                            own)).to_dict()  # fmt: skip
        return results, version

    async def _before_after(
        self, job_id: str, job: pb.CompressionJob, parent: registry_pb2.ModelVersion,
        version: str, metric: str, own: tuple[float, float],
    ) -> ev.BeforeAfter:  # fmt: skip
        """The evaluation service's figures for parent and child, else the job's own."""
        if self.evaluations is None:
            return ev.BeforeAfter(metric, *own, f"{ev.FALLBACK}: no evaluation service client")
        if metric == rc.COSINE:  # a comparison with the parent: only the job can measure it
            return ev.BeforeAfter(metric, *own, f"{ev.FALLBACK}: cosine to the parent's outputs")
        dataset_version = job.recipe.evaluation_dataset_version or parent.source.dataset_version
        split = job.recipe.evaluation_split or common_pb2.DATASET_SPLIT_TEST
        return await self.evaluations.before_after(
            parent.name, version, dataset_version, split, metric, job_id, own
        )

    async def _first_accepted(
        self, candidates: list[rc.Outcome], evaluation: rc.EvalData
    ) -> tuple[rc.Outcome | None, str]:
        """The best candidate Triton accepts, and the report line (naming those refused).

        A refused candidate is marked FAILED and the next best within the budget is
        checked, so one model Triton cannot serve does not leave the job without a result.
        """
        refused: list[str] = []
        line = ""
        for candidate in candidates:
            line = await self._check_in_triton(candidate, evaluation)
            if not line.startswith("failed"):
                if refused:
                    line += f"; chosen after Triton refused {', '.join(refused)}"
                return candidate, line
            refused.append(candidate.name)
        if len(refused) > 1:
            line += f" (every candidate refused: {', '.join(refused)})"
        return None, line

    async def _check_in_triton(self, chosen: rc.Outcome, evaluation: rc.EvalData) -> str:
        """The report line of the Triton check; a refusal marks the step FAILED."""
        if self.triton_check is None:
            return tc.SKIPPED
        assert chosen.onnx_path is not None
        verdict = await self.triton_check(chosen.onnx_path, evaluation.sample(TRITON_SAMPLE_ROWS))
        if not verdict.accepted:
            chosen.status, chosen.reason = rc.FAILED, f"Triton refused the model: {verdict.message}"
            return f"failed: {verdict.message}"
        return f"passed ({verdict.message})"

    async def _register(
        self, job_id: str, job: pb.CompressionJob, parent: registry_pb2.ModelVersion,
        config: dict[str, Any], chosen: rc.Outcome, baseline: ms.Figures, figures: ms.Figures,
        metric: str, parent_metric: float,
    ) -> str:  # fmt: skip
        assert chosen.onnx_path is not None
        artifacts = [await self.sources.upload(chosen.onnx_path, "onnx", "model.onnx")]
        new_config = dict(config)
        network = chosen.network
        if network is not None and network.spec is not None:
            new_config["model"] = ann.spec_to_dict(network.spec)
            if chosen.torch_model is not None:  # the file is this network: its weights go along
                state_path = chosen.onnx_path.with_suffix(".pt")
                await asyncio.to_thread(torch.save, network.module.state_dict(), state_path)
                artifacts.append(await self.sources.upload(state_path, "state_dict", "model.pt"))
        elif network is not None:  # factorized: no catalogue spec describes it
            new_config.pop("model", None)
        new_config["compression"] = {
            "job": f"compressionJobs/{job_id}", "step": chosen.name, "method": chosen.method,
            "params": _jsonable(chosen.params), "parent_version": parent.name,
        }  # fmt: skip
        values = struct_pb2.Struct()
        values.update(_jsonable(new_config))
        parent_parameters = parent.parameter_count or baseline.parameter_count
        parameters = int(chosen.params.get("parameters", figures.parameter_count))
        version = registry_pb2.ModelVersion(
            description=f"{parent.name} compressed by {chosen.name} (compressionJobs/{job_id})",
            artifacts=artifacts, signature=parent.signature, framework="onnx",
            opset=parent.opset, config=common_pb2.Config(values=values),
            metrics=version_metrics(baseline, figures, parameters, parent_parameters, metric,
                                    parent_metric, chosen.metric_after),
            tags={"compression.step": chosen.name[:200], "compression.method": chosen.method},
            source=registry_pb2.VersionSource(
                dataset_version=parent.source.dataset_version, job=f"compressionJobs/{job_id}",
                parent_version=parent.name, derivation=chosen.name,
            ),
            parameter_count=parameters,
        )  # fmt: skip
        target = job.target_model or st.model_of(parent.name)
        created = await self.sources.create_version(
            target, version, request_id=f"compression-{job_id}"
        )
        return created.name
