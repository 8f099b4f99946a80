"""The pipeline's event handlers: every stage is started by an event and ended by one.

Two durable JetStream consumers drive every run:

- ``pipeline-stage-starter`` on ``aimass.pipeline.stage.started``: the event a
  transition wrote to the outbox when the stage before ended (or the run was
  created). The handler creates the stage's job (idempotency key = run, stage,
  attempt) and records it; release and the smoke test finish in the handler.
- ``pipeline-stage-events`` on the other services' events
  (``aimass.data.version.ready``, ``aimass.training.job.succeeded``,
  ``aimass.evaluation.completed``, ``aimass.compression.job.succeeded``,
  ``aimass.routing.deployment.updated``, and the ``*.failed`` ones): finds the
  run whose running stage waits for the event's resource, reads the job, and
  ends the stage; the transition writes the next stage's start event.

Stages act for their run's project (:func:`aimass.core.auth.hook.acting_for_project`):
the internal token then carries the project, so every service scopes the stage's calls as
it would a key of that project: what a stage creates (datasets, training jobs,
evaluations, compression jobs, model versions, deployments) lands in the run's project,
and a spec naming another project's dataset, version or deployment fails with NOT_FOUND.

Nothing lives only in memory: a killed pipeline process leaves its state in
the database and its unacked events in JetStream, and the next process
resumes. Duplicates change nothing (transitions are compare-and-set on the
stage's state and attempt). A watchdog re-reads running stages every few
seconds, for the endings no event announces (an ingest answered from the
cache, an evaluation that failed) and for events handled while a service was
down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from aimass.core.auth.hook import acting_for_project
from aimass.core.db.base import utcnow
from aimass.core.events import ConsumerOptions, Envelope, EventBus, Subscription, unpack
from aimass.events.v1 import events_pb2
from aimass.pipeline.stages import Launched, Outcome, Retry, StageFailed, Stages
from aimass.pipeline.store import STAGE_STARTED_TOPIC, ActiveStage, RunStore, run_id_of
from aimass.pipeline.v1 import pipeline_pb2 as pb

log = logging.getLogger(__name__)

STARTER = "pipeline-stage-starter"
LISTENER = "pipeline-stage-events"
STAGE_EVENT_TOPICS = [
    "aimass.data.version.ready",
    "aimass.data.version.failed",
    "aimass.training.job.succeeded",
    "aimass.training.job.failed",
    "aimass.evaluation.completed",
    "aimass.evaluation.failed",
    "aimass.compression.job.succeeded",
    "aimass.compression.job.failed",
    "aimass.routing.deployment.updated",
]
# Payload fields that name the resource an event is about.
_RESOURCE_FIELDS = ("job", "evaluation", "deployment", "dataset_version")
_PAYLOADS = (
    events_pb2.DatasetVersionReady,
    events_pb2.DatasetVersionFailed,
    events_pb2.TrainingJobSucceeded,
    events_pb2.TrainingJobFailed,
    events_pb2.EvaluationCompleted,
    events_pb2.CompressionJobSucceeded,
    events_pb2.CompressionJobFailed,
    events_pb2.DeploymentUpdated,
    events_pb2.JobStateChanged,
)
WATCHDOG_S = 5.0
# A stage STARTING this long is launched again by the watchdog: the process that took its
# start event may have died holding it (JetStream would only redeliver after the ack wait).
# Launches are idempotent, so a slow launcher still alive does no harm.
STALE_START_S = 20.0


class Engine:
    """Runs the two consumers and the watchdog of one pipeline process."""

    def __init__(
        self,
        store: RunStore,
        stages: Stages,
        notify_outbox: Callable[[], None],
        *,
        watchdog_s: float = WATCHDOG_S,
    ) -> None:
        self.store = store
        self.stages = stages
        self.notify_outbox = notify_outbox
        self.watchdog_s = watchdog_s
        self._subscriptions: list[Subscription] = []
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, bus: EventBus) -> None:
        # A launch may wait on a slow service (Predict after a model load): a long ack wait.
        starter = ConsumerOptions(ack_wait_s=180.0, max_retry_delay_s=30.0)
        self._subscriptions.append(
            await bus.subscribe(
                STARTER, [STAGE_STARTED_TOPIC], self.on_stage_started, options=starter
            )
        )
        listener = ConsumerOptions(ack_wait_s=120.0, max_retry_delay_s=30.0)
        self._subscriptions.append(
            await bus.subscribe(LISTENER, STAGE_EVENT_TOPICS, self.on_stage_event, options=listener)
        )
        self._watchdog = asyncio.create_task(self._watch(), name="pipeline-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for subscription in self._subscriptions:
            await subscription.stop()
        self._subscriptions.clear()

    # ------------------------------------------------------------ handlers

    async def on_stage_started(self, envelope: Envelope) -> bool:
        """Creates the job of the stage the event starts; True when this delivery moved the
        stage on (False: a duplicate, which at most asked again for the same job)."""
        started = unpack(envelope, events_pb2.PipelineStageStarted)
        run_id = run_id_of(started.run, "payload.run")
        active = await asyncio.to_thread(self.store.active_stage, run_id)
        if (
            active is None
            or active.state != "STARTING"
            or pb.Stage.Name(active.stage) != started.stage
            or active.attempt != started.attempt
        ):
            return False  # a redelivery, or the run moved on (cancelled, rerun)
        return await self._launch(active)

    async def on_stage_event(self, envelope: Envelope) -> int:
        """Ends the stages waiting for the event's resource; the number of runs looked at."""
        resources = resources_of(envelope)
        # An ingest that failed before its version was numbered names only its job: every
        # run at its ingest stage (waiting on a dataset) reads its own job.
        ingest = any(name.startswith("ingestJobs/") for name in resources)
        runs = await asyncio.to_thread(
            self.store.runs_waiting_on, sorted(resources), "datasets/" if ingest else ""
        )
        for run_id in runs:
            await self.reconcile(run_id)
        return len(runs)

    # ------------------------------------------------------------ transitions

    async def _launch(self, active: ActiveStage) -> bool:
        log.info("pipelineRuns/%s: starting %s", active.run, pb.Stage.Name(active.stage))
        try:
            with acting_for_project(active.project):
                result = await self.stages.launch(active)
        except StageFailed as failed:
            return await self._fail(active, failed.reason)
        except Retry:
            raise  # the start event comes back later
        except Exception as err:  # a bug must stop the run, not loop on redeliveries
            log.exception("pipelineRuns/%s: launching %s", active.run, pb.Stage.Name(active.stage))
            return await self._fail(active, f"internal error: {err!r}")
        if isinstance(result, Outcome):
            return await self._end(active, result)
        assert isinstance(result, Launched)
        recorded = await asyncio.to_thread(
            self.store.mark_running, active.run, active.stage, active.attempt,
            result.resource, result.waiting_on,
        )  # fmt: skip
        if recorded:
            # The job may have ended before it was recorded (its event then found no run);
            # if the job cannot be read now, its event or the watchdog will do it.
            with contextlib.suppress(Retry):
                await self.reconcile(active.run)
        return recorded

    async def reconcile(self, run_id: str) -> None:
        """Reads the running stage's job and ends the stage if the job has ended."""
        active = await asyncio.to_thread(self.store.active_stage, run_id)
        if active is None or active.state != "RUNNING":
            return
        try:
            with acting_for_project(active.project):
                outcome = await self.stages.check(active)
        except StageFailed as failed:
            await self._fail(active, failed.reason)
            return
        if outcome is not None:
            await self._end(active, outcome)

    async def _end(self, active: ActiveStage, outcome: Outcome) -> bool:
        if not outcome.succeeded:
            return await self._fail(active, outcome.reason)
        changed = await asyncio.to_thread(
            self.store.mark_succeeded, active.run, active.stage, active.attempt,
            outcome.summary, outcome.resource,
        )  # fmt: skip
        if changed:
            log.info("pipelineRuns/%s: %s succeeded", active.run, pb.Stage.Name(active.stage))
            self.notify_outbox()
        return changed

    async def _fail(self, active: ActiveStage, reason: str) -> bool:
        changed = await asyncio.to_thread(
            self.store.mark_failed, active.run, active.stage, active.attempt, reason, active.state
        )
        if changed:
            log.warning(
                "pipelineRuns/%s: %s failed: %s", active.run, pb.Stage.Name(active.stage), reason
            )
            self.notify_outbox()
        return changed

    # ------------------------------------------------------------ watchdog

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_s)
            try:
                runs = await asyncio.to_thread(self.store.running_runs)
            except Exception:  # the database is away: try again next round
                log.exception("pipeline watchdog: cannot list running runs")
                continue
            for run_id in runs:
                try:
                    await self._look_after(run_id)
                except Retry as err:
                    log.info("pipelineRuns/%s: %s (will retry)", run_id, err)
                except Exception:
                    log.exception("pipelineRuns/%s: watchdog check failed", run_id)

    async def _look_after(self, run_id: str) -> None:
        active = await asyncio.to_thread(self.store.active_stage, run_id)
        if active is None:
            return
        if active.state == "RUNNING":
            await self.reconcile(run_id)
        elif active.start_time and _age_s(active.start_time) > STALE_START_S:
            log.info("pipelineRuns/%s: %s is still starting, launching it again", run_id,
                     pb.Stage.Name(active.stage))  # fmt: skip
            await self._launch(active)


def _age_s(iso_time: str) -> float:
    return (utcnow() - datetime.fromisoformat(iso_time)).total_seconds()


def resources_of(envelope: Envelope) -> set[str]:
    """Names a stage may wait for that this event is about: its job, and a version's dataset."""
    names = {envelope.subject} if envelope.subject else set()
    for payload_type in _PAYLOADS:
        if envelope.payload.Is(payload_type.DESCRIPTOR):
            payload = unpack(envelope, payload_type)
            for field in _RESOURCE_FIELDS:
                value = getattr(payload, field, "")
                if value:
                    names.add(value)
            break
    for name in list(names):
        if name.startswith("datasets/") and "/versions/" in name:
            names.add(name.split("/versions/")[0])
    return names
