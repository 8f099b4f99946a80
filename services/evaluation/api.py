"""The evaluation service's gRPC servicer: checks requests, queues jobs, serves results.

Create checks everything it can before anything is written (the version
exists and has an ONNX file, the dataset version has labels, the metric names
are known and fit the task), then writes the job row, its first Watch event
and the job message for the work queue in one transaction. CompareVersions
runs while the call waits.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from sqlalchemy import select

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.core.interceptors import current_principal
from aimass.data.v1 import data_pb2
from aimass.evaluation import metrics as mt
from aimass.evaluation import stats
from aimass.evaluation import store as st
from aimass.evaluation.inference import PROVIDERS
from aimass.evaluation.monitor_api import MonitorMethods
from aimass.evaluation.sources import Sources, label_column, resolve_task, score
from aimass.evaluation.v1 import evaluation_pb2 as pb
from aimass.evaluation.v1 import evaluation_pb2_grpc
from aimass.registry.v1 import registry_pb2

T = TypeVar("T")
Context = grpc.aio.ServicerContext
JOB_TOPIC = "aimassjobs.evaluation"
WATCH_POLL_S = 0.1
MAX_BOOTSTRAP = 10_000
MAX_BATCH = 65_536
MAX_BENCH_BATCH = 4096
DEFAULT_COMPARE_SAMPLES = 1000


def principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


def check_confidence(value: float, field: str) -> float:
    if value == 0:
        return 0.95
    if not 0 < value < 1 or math.isnan(value):
        raise InvalidArgument(field, f"must be in (0, 1), got {value}")
    return value


def check_range(value: int, low: int, high: int, field: str) -> int:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be {low}-{high}, got {value}")
    return value


class EvaluationServicer(MonitorMethods, evaluation_pb2_grpc.EvaluationServiceServicer):
    """aimass.evaluation.v1.EvaluationService (monitor methods: :mod:`.monitor_api`)."""

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

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # ---------------------------------------------------------------- create

    async def _plan_evaluation(self, evaluation: pb.Evaluation) -> tuple[str, str, list[str]]:
        """Dataset version, task and metric names of a new evaluation, all checked."""
        name = st.check_version_name(evaluation.model_version, "evaluation.model_version")
        if evaluation.split not in st.SPLIT_NAMES:
            raise InvalidArgument("evaluation.split", f"unknown split {evaluation.split}")
        if evaluation.task and evaluation.task not in st.TASK_NAMES:
            raise InvalidArgument("evaluation.task", f"unknown task {evaluation.task}")
        task = st.TASK_NAMES.get(evaluation.task)
        names = mt.resolve_names(list(evaluation.metric_names), task, "evaluation.metric_names")
        check_range(evaluation.bootstrap_samples, 0, MAX_BOOTSTRAP, "evaluation.bootstrap_samples")
        check_range(evaluation.batch_size, 0, MAX_BATCH, "evaluation.batch_size")
        check_range(evaluation.k, 0, 100_000, "evaluation.k")
        check_confidence(evaluation.confidence_level, "evaluation.confidence_level")
        version = await self.sources.version(name)
        await self.sources.onnx_file(version)
        dataset_version = evaluation.dataset_version or version.source.dataset_version
        if not dataset_version:
            raise InvalidArgument(
                "evaluation.dataset_version",
                f"is required: {name} records no dataset version it was trained on",
            )
        st.check_dataset_version(dataset_version, "evaluation.dataset_version")
        dataset = await self._ready_dataset(dataset_version)
        task = resolve_task(task, version, dataset)
        names = mt.resolve_names(names, task, "evaluation.metric_names") if names else []
        return dataset_version, task, names

    async def _ready_dataset(self, name: str) -> data_pb2.DatasetVersion:
        dataset = await self.sources.dataset_version(name)
        if dataset.state != data_pb2.DATASET_VERSION_STATE_READY:
            raise FailedPrecondition(f"{name} is not ready")
        label_column(dataset)
        return dataset

    async def CreateEvaluation(
        self, request: pb.CreateEvaluationRequest, context: Context
    ) -> pb.Evaluation:
        if request.request_id:
            existing = await self._db(self._by_request_id, m.Evaluation, request.request_id)
            if existing is not None:
                return st.evaluation_to_proto(existing)
        evaluation = request.evaluation
        dataset_version, task, names = await self._plan_evaluation(evaluation)
        config = st.evaluation_config(evaluation, task, names)

        def create() -> pb.Evaluation:
            with self.database.session(resource="evaluation") as session:
                row = m.Evaluation(
                    name=st.new_id(), model_version=evaluation.model_version,
                    dataset_version=dataset_version, split=st.SPLIT_NAMES[evaluation.split],
                    config=config, state="QUEUED", creator=principal(),
                    request_id=request.request_id or None, project=scope.caller_project(),
                )  # fmt: skip
                session.add(row)
                session.flush()
                st.add_job_event(session, row)
                message = st.evaluation_to_proto(row)
                add_event(session, JOB_TOPIC, message, subject=message.name, source="evaluation")
                return message

        message = await self._db(create)
        self.notify_outbox()
        return message

    def _by_request_id(self, model: type, request_id: str) -> Any:
        """The row an earlier call with ``request_id`` made; NotFound when it is another
        project's (request ids are unique across projects: a replay must not return it)."""
        with self.database.session(read_only=True) as session:
            row = session.scalar(select(model).where(model.request_id == request_id))
            if row is not None:
                scope.check_visible(row.project, f"request_id {request_id!r}")
                session.expunge(row)
            return row

    async def CreateBenchmark(
        self, request: pb.CreateBenchmarkRequest, context: Context
    ) -> pb.Benchmark:
        if request.request_id:
            existing = await self._db(self._by_request_id, m.Benchmark, request.request_id)
            if existing is not None:
                return st.benchmark_to_proto(existing)
        benchmark = request.benchmark
        name = st.check_version_name(benchmark.model_version, "benchmark.model_version")
        if benchmark.provider not in st.PROVIDER_NAMES:
            raise InvalidArgument("benchmark.provider", f"unknown provider {benchmark.provider}")
        provider = st.PROVIDER_NAMES[benchmark.provider]
        import onnxruntime as ort

        if PROVIDERS[provider] not in ort.get_available_providers():
            raise FailedPrecondition(
                f"benchmark.provider: {provider} is not available here "
                f"(ONNX Runtime has {ort.get_available_providers()})"
            )
        for index, size in enumerate(benchmark.batch_sizes):
            check_range(size, 1, MAX_BENCH_BATCH, f"benchmark.batch_sizes[{index}]")
        check_range(benchmark.iterations, 0, 100_000, "benchmark.iterations")
        check_range(benchmark.warmup_iterations, 0, 100_000, "benchmark.warmup_iterations")
        check_range(benchmark.threads, 0, 1024, "benchmark.threads")
        await self.sources.onnx_file(await self.sources.version(name))
        config = st.benchmark_config(benchmark)

        def create() -> pb.Benchmark:
            with self.database.session(resource="benchmark") as session:
                row = m.Benchmark(
                    name=st.new_id(), model_version=name, config=config, state="QUEUED",
                    creator=principal(), request_id=request.request_id or None,
                    project=scope.caller_project(),
                )  # fmt: skip
                session.add(row)
                session.flush()
                st.add_job_event(session, row)
                message = st.benchmark_to_proto(row)
                add_event(session, JOB_TOPIC, message, subject=message.name, source="evaluation")
                return message

        message = await self._db(create)
        self.notify_outbox()
        return message

    # ------------------------------------------------------------- get, list

    async def GetEvaluation(
        self, request: pb.GetEvaluationRequest, context: Context
    ) -> pb.Evaluation:
        job_id = st.parse_name(request.name, "evaluations")

        def get() -> pb.Evaluation:
            with self.database.session(read_only=True) as session:
                return st.evaluation_to_proto(st.get_evaluation(session, job_id))

        return await self._db(get)

    async def GetBenchmark(self, request: pb.GetBenchmarkRequest, context: Context) -> pb.Benchmark:
        job_id = st.parse_name(request.name, "benchmarks")

        def get() -> pb.Benchmark:
            with self.database.session(read_only=True) as session:
                return st.benchmark_to_proto(st.get_benchmark(session, job_id))

        return await self._db(get)

    def _list(self, model: Any, columns: dict[str, Any], request: Any) -> tuple[list[Any], str]:
        if request.order_by and request.order_by.strip() != "create_time desc":
            raise InvalidArgument("order_by", 'only "create_time desc" is supported')
        clauses = st.filter_clauses(request.filter, columns)
        clauses += scope.project_filter(model.project)
        with self.database.session(read_only=True) as session:
            rows, token = paginate(
                session, select(model).where(*clauses), [model.create_time.desc(), model.id.desc()],
                request.page_size, request.page_token,
            )  # fmt: skip
            to_proto = st.evaluation_to_proto if model is m.Evaluation else st.benchmark_to_proto
            return [to_proto(r) for r in rows], token

    async def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: Context
    ) -> pb.ListEvaluationsResponse:
        E = m.Evaluation
        columns = {"state": E.state, "model_version": E.model_version,
                   "dataset_version": E.dataset_version, "split": E.split}  # fmt: skip
        items, token = await self._db(self._list, E, columns, request)
        return pb.ListEvaluationsResponse(evaluations=items, next_page_token=token)

    async def ListBenchmarks(
        self, request: pb.ListBenchmarksRequest, context: Context
    ) -> pb.ListBenchmarksResponse:
        columns = {"state": m.Benchmark.state, "model_version": m.Benchmark.model_version}
        items, token = await self._db(self._list, m.Benchmark, columns, request)
        return pb.ListBenchmarksResponse(benchmarks=items, next_page_token=token)

    # ------------------------------------------------------------ watch, cancel

    async def _watch(self, job: str, after: int) -> AsyncIterator[common_pb2.JobEvent]:
        collection, _, job_id = job.partition("/")
        get = st.get_evaluation if collection == "evaluations" else st.get_benchmark

        def fetch(after: int) -> tuple[list[common_pb2.JobEvent], str]:
            with self.database.session(read_only=True) as session:
                state = get(session, job_id).state
                return st.events_after(session, job, after), state

        while True:
            events, state = await self._db(fetch, after)
            for event in events:
                after = event.sequence
                yield event
            if state in st.TERMINAL and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_S)

    async def WatchEvaluation(
        self, request: pb.WatchEvaluationRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job_id = st.parse_name(request.name, "evaluations")
        async for event in self._watch(f"evaluations/{job_id}", request.after_sequence):
            yield event

    async def WatchBenchmark(
        self, request: pb.WatchBenchmarkRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job_id = st.parse_name(request.name, "benchmarks")
        async for event in self._watch(f"benchmarks/{job_id}", request.after_sequence):
            yield event

    def _cancel(self, get: Callable[..., Any], job_id: str) -> Any:
        with self.database.session() as session:
            row = get(session, job_id, lock=True)
            if row.state in st.TERMINAL or row.state == "CANCELLING":
                return row
            if row.state == "QUEUED":
                st.set_state(row, "CANCELLED", "cancelled on request")
            else:  # RUNNING: the worker sees it between batches and stops
                st.set_state(row, "CANCELLING", "cancel requested")
            st.add_job_event(session, row)
            session.flush()
            return row

    async def CancelEvaluation(
        self, request: pb.CancelEvaluationRequest, context: Context
    ) -> pb.Evaluation:
        job_id = st.parse_name(request.name, "evaluations")
        await self._db(self._cancel, st.get_evaluation, job_id)
        return await self.GetEvaluation(pb.GetEvaluationRequest(name=request.name), context)

    async def CancelBenchmark(
        self, request: pb.CancelBenchmarkRequest, context: Context
    ) -> pb.Benchmark:
        job_id = st.parse_name(request.name, "benchmarks")
        await self._db(self._cancel, st.get_benchmark, job_id)
        return await self.GetBenchmark(pb.GetBenchmarkRequest(name=request.name), context)

    # ---------------------------------------------------------------- report

    async def GetEvaluationReport(
        self, request: pb.GetEvaluationReportRequest, context: Context
    ) -> AsyncIterator[common_pb2.ByteChunk]:
        evaluation = await self.GetEvaluation(pb.GetEvaluationRequest(name=request.name), context)
        if evaluation.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            state = common_pb2.JobState.Name(evaluation.status.state).removeprefix("JOB_STATE_")
            raise FailedPrecondition(f"{request.name} is {state.lower()}: it has no report")
        file_name = request.file_name or "report.md"
        artifact = next((a for a in evaluation.report_artifacts if a.file_name == file_name), None)
        if artifact is None:
            files = sorted(a.file_name for a in evaluation.report_artifacts)
            raise NotFound(f"{request.name} has no report file {file_name!r}; it has {files}")
        if not 0 <= request.offset <= artifact.size_bytes:
            raise InvalidArgument("offset", f"must be 0-{artifact.size_bytes}")
        offset = request.offset
        async for data in self.artifacts.open_stream(artifact.uri, offset=offset):
            yield common_pb2.ByteChunk(offset=offset, data=data)
            offset += len(data)

    # --------------------------------------------------------------- compare

    async def CompareVersions(
        self, request: pb.CompareVersionsRequest, context: Context
    ) -> pb.CompareVersionsResponse:
        st.check_version_name(request.version_a, "version_a")
        st.check_version_name(request.version_b, "version_b")
        if not request.dataset_version:
            raise InvalidArgument("dataset_version", "is required")
        st.check_dataset_version(request.dataset_version, "dataset_version")
        if request.split not in st.SPLIT_NAMES:
            raise InvalidArgument("split", f"unknown split {request.split}")
        if request.task and request.task not in st.TASK_NAMES:
            raise InvalidArgument("task", f"unknown task {request.task}")
        names = mt.resolve_names(
            list(request.metric_names), st.TASK_NAMES.get(request.task), "metric_names"
        )
        samples = check_range(request.bootstrap_samples, 0, MAX_BOOTSTRAP, "bootstrap_samples")
        confidence = check_confidence(request.confidence_level, "confidence_level")
        version_a = await self.sources.version(request.version_a)
        version_b = await self.sources.version(request.version_b)
        dataset = await self._ready_dataset(request.dataset_version)
        task = resolve_task(st.TASK_NAMES.get(request.task), version_a, dataset)
        names = mt.resolve_names(names, task, "metric_names") or list(mt.DEFAULTS[task])
        split = st.SPLIT_NAMES[request.split]
        table = await self.sources.split_table(dataset.name, split)
        k = request.k or 10
        scored_a = await score(self.sources, version_a, dataset, split, task, k=k, table=table)
        scored_b = await score(self.sources, version_b, dataset, split, task, k=k, table=table)
        comparisons = await asyncio.to_thread(
            stats.compare, scored_a.predictions, scored_b.predictions, names,
            samples or DEFAULT_COMPARE_SAMPLES, confidence, request.seed,
        )  # fmt: skip
        return pb.CompareVersionsResponse(
            comparisons=[
                pb.MetricComparison(
                    metric=c.metric,
                    value_a=c.value_a,
                    value_b=c.value_b,
                    difference=c.difference,
                    lower=c.lower,
                    upper=c.upper,
                    p_value=c.p_value,
                    test=c.test,
                )
                for c in comparisons
            ],
            row_count=scored_a.predictions.rows,
            confidence_level=confidence,
        )


def version_dataset(version: registry_pb2.ModelVersion) -> str:
    return version.source.dataset_version
