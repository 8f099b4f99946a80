"""The compression service's gRPC servicer: checks requests, queues jobs, serves results.

CreateCompressionJob checks everything it can before anything is written:
the parent exists and has an ONNX file, every step's parameters are in range
(each problem names its field, ``compression_job.recipe.steps[i]....``), a
distillation student is smaller than its teacher, a calibration split has
rows. Then the job row, its first Watch event and the work-queue message
commit in one transaction.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from aimass.common.v1 import common_pb2
from aimass.compression import recipe as rc
from aimass.compression import store as st
from aimass.compression import structural as sx
from aimass.compression.sources import Sources, require_onnx, version_config
from aimass.compression.v1 import compression_pb2 as pb
from aimass.compression.v1 import compression_pb2_grpc
from aimass.core import nn as ann
from aimass.core.auth import scope
from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.db.pagination import paginate
from aimass.core.errors import Aborted, AlreadyExists, InvalidArgument
from aimass.core.events import add_event
from aimass.core.interceptors import current_principal
from aimass.registry.v1 import registry_pb2

T = TypeVar("T")
Context = grpc.aio.ServicerContext
JOB_TOPIC = "aimassjobs.compression"
WATCH_POLL_S = 0.1
MAX_EPOCHS = 1000


def principal() -> str:
    try:
        return current_principal().subject
    except Exception:  # no auth interceptor in this deployment
        return ""


def _fraction(value: float, field: str) -> None:
    sx.check_fraction(value, field)


def _at_least(value: float, low: float, field: str) -> None:
    if math.isnan(value) or value < low:
        raise InvalidArgument(field, f"must be >= {low:g}, got {value}")


def check_recipe(recipe: pb.Recipe, field: str) -> None:
    """Every parameter of every step in range; InvalidArgument naming the first bad one."""
    if not recipe.steps:
        raise InvalidArgument(f"{field}.steps", "needs at least one step")
    names: set[str] = set()
    for index, step in enumerate(recipe.steps):
        path = f"{field}.steps[{index}]"
        method = rc.method_of(step)
        if not method:
            raise InvalidArgument(path, "set one method (quantize_dynamic, quantize_static, ...)")
        name = rc.step_name(step)
        if name in names:
            raise InvalidArgument(f"{path}.name", f"{name!r} is used by another step")
        names.add(name)
        _check_step(getattr(step, method), method, f"{path}.{method}")
    _at_least(recipe.output_tolerance, 0, f"{field}.output_tolerance")
    if recipe.HasField("accuracy_budget"):
        _at_least(recipe.accuracy_budget.max_drop, 0, f"{field}.accuracy_budget.max_drop")
        metric = recipe.accuracy_budget.metric
        if metric and metric not in ("accuracy", "mse", "mae", "cosine"):
            raise InvalidArgument(
                f"{field}.accuracy_budget.metric",
                f"{metric!r} is not one of accuracy, mse, mae, cosine",
            )
    st.check_dataset_version(
        recipe.evaluation_dataset_version, f"{field}.evaluation_dataset_version"
    )


def _check_step(s: Any, method: str, path: str) -> None:
    if method in ("prune_unstructured", "prune_structured"):
        _fraction(s.sparsity, f"{path}.sparsity")
    elif method == "low_rank":
        _fraction(s.rank_ratio, f"{path}.rank_ratio")
    elif method == "quantize_static":
        _at_least(s.calibration_rows, 0, f"{path}.calibration_rows")
        if s.percentile and not 0 < s.percentile <= 100:
            raise InvalidArgument(f"{path}.percentile", f"must be in (0, 100], got {s.percentile}")
        st.check_dataset_version(
            s.calibration_dataset_version, f"{path}.calibration_dataset_version"
        )
    elif method == "fine_tune":
        _check_training(s.epochs, s.learning_rate, path)
        _at_least(s.batch_size, 0, f"{path}.batch_size")
        st.check_dataset_version(s.dataset_version, f"{path}.dataset_version")
    elif method == "distill":
        _check_training(s.epochs, s.learning_rate, path)
        if s.WhichOneof("student") == "scale_factor":
            _fraction(s.scale_factor, f"{path}.scale_factor")
        sx.check_fraction(s.alpha, f"{path}.alpha", closed=True)
        _at_least(s.temperature, 0, f"{path}.temperature")
        st.check_dataset_version(s.dataset_version, f"{path}.dataset_version")


def _check_training(epochs: int, learning_rate: float, path: str) -> None:
    if not 0 <= epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"{path}.epochs", f"must be 0-{MAX_EPOCHS}, got {epochs}")
    _at_least(learning_rate, 0, f"{path}.learning_rate")


def check_students(recipe: pb.Recipe, config: dict[str, Any], field: str) -> None:
    """Every distillation student has fewer parameters than the teacher (the parent)."""
    distills = [(i, s.distill) for i, s in enumerate(recipe.steps) if rc.method_of(s) == "distill"]
    if not distills or "model" not in config or "data_signature" not in config:
        return
    teacher = ann.rebuild_model(config)
    data = ann.DataSignature.from_dict(config["data_signature"])
    teacher_spec = ann.spec_from_dict(config["model"])
    for index, distill in distills:
        path = f"{field}.steps[{index}].distill"
        if distill.WhichOneof("student") == "student_spec":
            spec, where = distill.student_spec, f"{path}.student_spec"
        else:
            spec, where = (
                sx.scaled_spec(teacher_spec, distill.scale_factor or 0.5),
                f"{path}.scale_factor",
            )
        try:
            student = ann.build_model(spec, data)
        except InvalidArgument as err:
            raise InvalidArgument(where, err.message) from err
        if student.parameter_count >= teacher.parameter_count:
            raise InvalidArgument(
                where,
                f"the student has {student.parameter_count} parameters, not fewer than the "
                f"teacher's {teacher.parameter_count}",
            )


class CompressionServicer(compression_pb2_grpc.CompressionServiceServicer):
    """aimass.compression.v1.CompressionService."""

    def __init__(
        self, database: Database, sources: Sources, notify_outbox: Callable[[], None]
    ) -> None:
        self.database = database
        self.sources = sources
        self.notify_outbox = notify_outbox

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # ------------------------------------------------------------------ jobs

    async def check_job(self, job: pb.CompressionJob, field: str) -> None:
        """Everything about a new job that can be known before it runs."""
        st.check_version_name(job.parent_version, f"{field}.parent_version")
        if job.target_model:
            st.check_model_name(job.target_model, f"{field}.target_model")
        check_recipe(job.recipe, f"{field}.recipe")
        parent = await self.sources.version(job.parent_version)
        require_onnx(parent, f"{field}.parent_version")
        config = version_config(parent)
        await asyncio.to_thread(check_students, job.recipe, config, f"{field}.recipe")
        await self._check_calibration(job.recipe, parent, f"{field}.recipe")

    async def _check_calibration(
        self, recipe: pb.Recipe, parent: registry_pb2.ModelVersion, field: str
    ) -> None:
        for index, step in enumerate(recipe.steps):
            if rc.method_of(step) != "quantize_static":
                continue
            s = step.quantize_static
            path = f"{field}.steps[{index}].quantize_static"
            dataset_name = s.calibration_dataset_version or parent.source.dataset_version
            if not dataset_name:
                raise InvalidArgument(
                    f"{path}.calibration_dataset_version",
                    f"is required: {parent.name} records no dataset version it was trained on",
                )
            dataset = await self.sources.dataset_version(dataset_name)
            split = s.calibration_split or common_pb2.DATASET_SPLIT_TRAIN
            if split not in common_pb2.DatasetSplit.values():  # proto3 enums are open
                raise InvalidArgument(f"{path}.calibration_split", f"unknown value {split}")
            rows = next((x.row_count for x in dataset.splits if x.split == split), 0)
            if rows == 0:
                name = common_pb2.DatasetSplit.Name(split).removeprefix("DATASET_SPLIT_").lower()
                raise InvalidArgument(
                    f"{path}.calibration_split",
                    f"the {name} split of {dataset_name} is empty: nothing to calibrate on",
                )

    def _by_request_id(self, request_id: str) -> pb.CompressionJob | None:
        with self.database.session(read_only=True) as session:
            row = session.scalar(
                select(m.CompressionJob).where(m.CompressionJob.request_id == request_id)
            )
            if row is None:
                return None
            # Request ids are unique across projects: another project's job answers
            # NotFound, never the job itself.
            scope.check_visible(row.project, f"request_id {request_id!r}")
            return st.job_to_proto(row)

    async def CreateCompressionJob(
        self, request: pb.CreateCompressionJobRequest, context: Context
    ) -> pb.CompressionJob:
        if request.request_id:
            existing = await self._db(self._by_request_id, request.request_id)
            if existing is not None:
                return existing
        await self.check_job(request.compression_job, "compression_job")
        message = await self._db(
            create_job, self.database, request.compression_job, principal(),
            request.request_id, None,
        )  # fmt: skip
        self.notify_outbox()
        return message

    async def GetCompressionJob(
        self, request: pb.GetCompressionJobRequest, context: Context
    ) -> pb.CompressionJob:
        job_id = st.parse_job_name(request.name)

        def get() -> pb.CompressionJob:
            with self.database.session(read_only=True) as session:
                return st.job_to_proto(st.get_job(session, job_id))

        return await self._db(get)

    async def ListCompressionJobs(
        self, request: pb.ListCompressionJobsRequest, context: Context
    ) -> pb.ListCompressionJobsResponse:
        J = m.CompressionJob
        if request.order_by and request.order_by.strip() != "create_time desc":
            raise InvalidArgument("order_by", 'only "create_time desc" is supported')
        columns = {"state": J.state, "parent_version": J.source_version,
                   "model_version": J.result_version}  # fmt: skip
        clauses = _filter(request.filter, columns)

        def page() -> tuple[list[pb.CompressionJob], str]:
            with self.database.session(read_only=True) as session:
                rows, token = paginate(
                    session, select(J).where(*clauses, *scope.project_filter(J.project)),
                    [J.create_time.desc(), J.id.desc()],
                    request.page_size, request.page_token,
                )  # fmt: skip
                return [st.job_to_proto(r) for r in rows], token

        jobs, token = await self._db(page)
        return pb.ListCompressionJobsResponse(compression_jobs=jobs, next_page_token=token)

    async def WatchCompressionJob(
        self, request: pb.WatchCompressionJobRequest, context: Context
    ) -> AsyncIterator[common_pb2.JobEvent]:
        job_id = st.parse_job_name(request.name)
        job = f"compressionJobs/{job_id}"

        def fetch(after: int) -> tuple[list[common_pb2.JobEvent], str]:
            with self.database.session(read_only=True) as session:
                state = st.get_job(session, job_id).state
                return st.events_after(session, job, after), state

        after = request.after_sequence
        while True:
            events, state = await self._db(fetch, after)
            for event in events:
                after = event.sequence
                yield event
            if state in st.TERMINAL and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_S)

    async def CancelCompressionJob(
        self, request: pb.CancelCompressionJobRequest, context: Context
    ) -> pb.CompressionJob:
        job_id = st.parse_job_name(request.name)

        def cancel() -> pb.CompressionJob:
            with self.database.session(resource=request.name) as session:
                row = st.get_job(session, job_id, lock=True)
                if row.state in st.TERMINAL or row.state == "CANCELLING":
                    return st.job_to_proto(row)
                if row.state == "QUEUED":
                    st.set_state(row, "CANCELLED", "cancelled on request")
                else:  # RUNNING: the runner sees it between steps and stops
                    st.set_state(row, "CANCELLING", "cancel requested")
                st.add_job_event(session, row)
                return st.job_to_proto(row)

        return await self._db(cancel)

    # -------------------------------------------------------------- policies

    async def CreateCompressionPolicy(
        self, request: pb.CreateCompressionPolicyRequest, context: Context
    ) -> pb.CompressionPolicy:
        model = st.check_model_name(request.parent, "parent")
        policy_id = st.check_policy_id(request.compression_policy_id, "compression_policy_id")
        policy = request.compression_policy
        _check_policy(policy)

        def create() -> pb.CompressionPolicy:
            try:
                with self.database.session(resource=model) as session:
                    row = m.CompressionPolicy(
                        name=policy_id, model=model, description=policy.description,
                        config=st.policy_config(policy), enabled=policy.enabled,
                        creator=principal(),
                    )  # fmt: skip
                    session.add(row)
                    session.flush()
                    return st.policy_to_proto(row)
            except IntegrityError as err:
                raise AlreadyExists(f"{model}/compressionPolicies/{policy_id} exists") from err

        return await self._db(create)

    async def GetCompressionPolicy(
        self, request: pb.GetCompressionPolicyRequest, context: Context
    ) -> pb.CompressionPolicy:
        model, policy_id = st.parse_policy_name(request.name)

        def get() -> pb.CompressionPolicy:
            with self.database.session(read_only=True) as session:
                return st.policy_to_proto(st.get_policy(session, model, policy_id))

        return await self._db(get)

    async def ListCompressionPolicies(
        self, request: pb.ListCompressionPoliciesRequest, context: Context
    ) -> pb.ListCompressionPoliciesResponse:
        P = m.CompressionPolicy
        clauses = []
        if request.parent != "models/-":
            clauses.append(P.model == st.check_model_name(request.parent, "parent"))
        if request.filter.strip():
            text = request.filter.replace(" ", "")
            if text not in ("enabled=true", "enabled=false"):
                raise InvalidArgument("filter", "only `enabled = true` or `enabled = false`")
            clauses.append(P.enabled == (text == "enabled=true"))

        def page() -> tuple[list[pb.CompressionPolicy], str]:
            with self.database.session(read_only=True) as session:
                rows, token = paginate(
                    session, select(P).where(*clauses), [P.model.asc(), P.name.asc(), P.id.asc()],
                    request.page_size, request.page_token,
                )  # fmt: skip
                return [st.policy_to_proto(r) for r in rows], token

        policies, token = await self._db(page)
        return pb.ListCompressionPoliciesResponse(
            compression_policies=policies, next_page_token=token
        )

    async def UpdateCompressionPolicy(
        self, request: pb.UpdateCompressionPolicyRequest, context: Context
    ) -> pb.CompressionPolicy:
        given = request.compression_policy
        model, policy_id = st.parse_policy_name(given.name, "compression_policy.name")
        paths = list(request.update_mask.paths) or [
            f.name for f, _ in given.ListFields() if f.name not in ("name", "etag")
        ]
        allowed = {"description", "recipe", "evaluate", "target_model", "enabled", "version_filter"}
        for path in paths:
            if path not in allowed:
                raise InvalidArgument(
                    "update_mask", f"{path!r} cannot be updated; use {sorted(allowed)}"
                )

        def update() -> pb.CompressionPolicy:
            with self.database.session(resource=given.name) as session:
                row = st.get_policy(session, model, policy_id)
                _check_etag(row.etag, given.etag)
                current = st.policy_to_proto(row)
                for path in paths:
                    if path == "recipe":
                        current.recipe.CopyFrom(given.recipe)
                    else:
                        setattr(current, path, getattr(given, path))
                _check_policy(current)
                row.description = current.description
                row.enabled = current.enabled
                row.config = {
                    **st.policy_config(current),
                    "last_job": row.config.get("last_job", ""),
                }
                session.flush()
                return st.policy_to_proto(row)

        return await self._db(update)

    async def DeleteCompressionPolicy(
        self, request: pb.DeleteCompressionPolicyRequest, context: Context
    ) -> empty_pb2.Empty:
        model, policy_id = st.parse_policy_name(request.name)

        def delete() -> None:
            with self.database.session(resource=request.name) as session:
                row = st.get_policy(session, model, policy_id)
                _check_etag(row.etag, request.etag)
                session.delete(row)

        await self._db(delete)
        return empty_pb2.Empty()


def _check_etag(current: str, given: str) -> None:
    if given and given != current:
        raise Aborted(f"etag {given!r} is stale: the policy changed (current etag {current})")


def _check_policy(policy: pb.CompressionPolicy) -> None:
    check_recipe(policy.recipe, "compression_policy.recipe")
    if policy.target_model:
        st.check_model_name(policy.target_model, "compression_policy.target_model")
    st.check_version_filter(policy.version_filter, "compression_policy.version_filter")


def _filter(text: str, columns: dict[str, Any]) -> list[Any]:
    import re

    if not text.strip():
        return []
    clauses = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = re.match(r'^\s*([a-z_]+)\s*=\s*"([^"]*)"\s*$', part)
        if match is None:
            raise InvalidArgument("filter", f'{part!r}: expected field = "value" joined by AND')
        field, value = match.groups()
        if field not in columns:
            raise InvalidArgument(
                "filter", f"{field!r} cannot be filtered on; use {sorted(columns)}"
            )
        clauses.append(columns[field] == (value.upper() if field == "state" else value))
    return clauses


def create_job(
    database: Database,
    job: pb.CompressionJob,
    creator: str,
    request_id: str,
    policy: m.CompressionPolicy | None,
    session: Any = None,
) -> pb.CompressionJob:
    """Writes the job row, its first event and the work-queue message (one transaction)."""

    def write(session: Any) -> pb.CompressionJob:
        config = {"job": st.job_input_dict(job)}
        if policy is not None:
            config["policy"] = st.policy_resource(policy)
        row = m.CompressionJob(
            name=st.new_id(), source_version=job.parent_version,
            method=st.method_summary(job.recipe), config=config, state="QUEUED",
            creator=creator, request_id=request_id or None,
            policy_id=policy.id if policy is not None else None,
            project=policy.project if policy is not None else scope.caller_project(),
        )  # fmt: skip
        session.add(row)
        session.flush()
        st.add_job_event(session, row)
        message = st.job_to_proto(row)
        add_event(session, JOB_TOPIC, message, subject=message.name, source="compression")
        return message

    if session is not None:
        return write(session)
    with database.session(resource="compressionJobs") as own:
        return write(own)
