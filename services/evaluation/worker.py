"""The evaluation service's background work: the job-queue consumer and auto-evaluation.

- :class:`JobWorker` pulls ``aimassjobs.evaluation`` (evaluations and
  benchmarks) one at a time, heartbeats while the job runs, acks when it is in
  an end state. A worker that dies leaves the job to be redelivered.
- :class:`AutoEvaluator` follows ``aimass.training.job.succeeded`` and
  ``aimass.compression.job.succeeded``. When the job asked for it
  (``evaluate``), it queues an evaluation of the new version, logged to the
  registry, in the same transaction that records the event id as handled: the
  same event delivered twice makes one evaluation.

Payload fields read: TrainingJobSucceeded.{job, model_version, evaluate};
CompressionJobSucceeded.{job, model_version, parent_version, evaluate}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, Unavailable
from aimass.core.events import Envelope, EventBus, IdempotentHandler, add_event, unpack
from aimass.evaluation import metrics as mt
from aimass.evaluation import store as st
from aimass.evaluation.api import JOB_TOPIC
from aimass.evaluation.runner import Runner
from aimass.evaluation.sources import Sources, label_column, resolve_task
from aimass.events.v1 import events_pb2

log = logging.getLogger(__name__)

TRAINING_TOPIC = "aimass.training.job.succeeded"
COMPRESSION_TOPIC = "aimass.compression.job.succeeded"
CONSUMER = "evaluation-auto"
AUTO_BOOTSTRAP_SAMPLES = 200


class JobWorker:
    """One job at a time from the work queue, until stopped."""

    def __init__(self, bus: EventBus, runner: Runner, ack_wait_s: float = 60.0) -> None:
        self.bus = bus
        self.runner = runner
        self.ack_wait_s = ack_wait_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        queue = await self.bus.job_queue("evaluation", ack_wait_s=self.ack_wait_s)
        self._task = asyncio.create_task(self._loop(queue), name="evaluation-jobs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, queue: object) -> None:
        while True:
            try:
                job = await queue.pull(timeout_s=1.0)  # type: ignore[attr-defined]
            except Unavailable as err:
                log.warning("evaluation jobs: %s", err.message)
                await asyncio.sleep(1.0)
                continue
            if job is None:
                continue
            async with job.keep_alive():
                await self.runner.run(job.name)
            with contextlib.suppress(Exception):
                await job.ack()


@dataclass(frozen=True)
class AutoPlan:
    """What an automatic evaluation will run on, or why it cannot."""

    model_version: str
    source_job: str
    dataset_version: str = ""
    task: str = ""
    reason: str = ""


class AutoEvaluator:
    """Queues an evaluation for each succeeded training or compression job that asked."""

    def __init__(self, database: Database, sources: Sources, notify_outbox: object) -> None:
        self.database = database
        self.sources = sources
        self.notify_outbox = notify_outbox

    async def subscribe(self, bus: EventBus) -> None:
        await bus.subscribe(CONSUMER, [TRAINING_TOPIC, COMPRESSION_TOPIC], self.handle)

    async def handle(self, envelope: Envelope) -> None:
        plan = await self.plan(envelope)
        handler = IdempotentHandler(
            CONSUMER, self.database, lambda session, env: self._queue(session, env, plan)
        )
        if await handler(envelope) and plan is not None:
            self.notify_outbox()  # type: ignore[operator]

    async def plan(self, envelope: Envelope) -> AutoPlan | None:
        """None when the job did not ask for an evaluation."""
        if envelope.topic == TRAINING_TOPIC:
            training = unpack(envelope, events_pb2.TrainingJobSucceeded)
            if not training.evaluate:
                return None
            version_name, job, parent = training.model_version, training.job, ""
        else:
            compression = unpack(envelope, events_pb2.CompressionJobSucceeded)
            if not compression.evaluate:
                return None
            version_name, job = compression.model_version, compression.job
            parent = compression.parent_version
        try:
            version = await self.sources.version(version_name)
            await self.sources.onnx_file(version)
            dataset_version = version.source.dataset_version
            if not dataset_version and parent:
                dataset_version = (await self.sources.version(parent)).source.dataset_version
            if not dataset_version:
                raise AimassError(f"{version_name} records no dataset version to evaluate on")
            dataset = await self.sources.dataset_version(dataset_version)
            label_column(dataset)
            task = resolve_task(None, version, dataset)
        except Unavailable:
            raise  # try the event again later
        except AimassError as err:
            return AutoPlan(version_name, job, reason=err.message)
        return AutoPlan(version_name, job, dataset_version, task)

    def _queue(self, session: Session, envelope: Envelope, plan: AutoPlan | None) -> None:
        if plan is None:
            return
        config = {
            "task": plan.task or mt.CLASSIFICATION, "metric_names": [], "k": 10,
            "bootstrap_samples": AUTO_BOOTSTRAP_SAMPLES, "confidence_level": 0.95,
            "batch_size": 256, "seed": 0, "log_to_registry": True,
            "labels": {"trigger": envelope.topic.split(".")[1], "job": plan.source_job[:63]},
        }  # fmt: skip
        row = m.Evaluation(
            name=st.new_id(), model_version=plan.model_version,
            dataset_version=plan.dataset_version, split="test", config=config,
            state="QUEUED", creator=f"event:{envelope.source}",
        )  # fmt: skip
        session.add(row)
        session.flush()
        if plan.reason:
            st.set_state(row, "FAILED", plan.reason)
            st.add_job_event(session, row, log_line=plan.reason)
            return
        st.add_job_event(session, row)
        message = st.evaluation_to_proto(row)
        add_event(session, JOB_TOPIC, message, subject=message.name, source="evaluation")
