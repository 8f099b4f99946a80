"""The compression service's background work: the job-queue consumer and policies.

- :class:`JobWorker` pulls ``aimassjobs.compression`` one job at a time,
  heartbeats while it runs, acks when the job is in an end state (naks when a
  service it needs is unavailable, so the job comes back later).
- :class:`PolicyTrigger` follows ``aimass.registry.version.created``: for a
  version that was not itself derived (compressed, distilled), every enabled
  policy of its model whose filter matches starts a job, in the same
  transaction that records the event as handled, so an event delivered twice
  starts one job per policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass.compression import store as st
from aimass.compression.api import create_job
from aimass.compression.runner import Runner
from aimass.compression.sources import Sources
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, Unavailable
from aimass.core.events import Envelope, EventBus, IdempotentHandler, unpack
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2

log = logging.getLogger(__name__)

VERSION_CREATED = "aimass.registry.version.created"
CONSUMER = "compression-policies"


class JobWorker:
    """One job at a time from the work queue, until stopped."""

    def __init__(self, bus: EventBus, runner: Runner, ack_wait_s: float = 60.0) -> None:
        self.bus = bus
        self.runner = runner
        self.ack_wait_s = ack_wait_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        queue = await self.bus.job_queue("compression", ack_wait_s=self.ack_wait_s)
        self._task = asyncio.create_task(self._loop(queue), name="compression-jobs")

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
                log.warning("compression jobs: %s", err.message)
                await asyncio.sleep(1.0)
                continue
            if job is None:
                continue
            try:
                async with job.keep_alive():
                    await self.runner.run(job.name)
            except Unavailable as err:
                log.warning("compression job %s: %s; retried later", job.name, err.message)
                with contextlib.suppress(Exception):
                    await job.nak(delay_s=5.0)
                continue
            with contextlib.suppress(Exception):
                await job.ack()


class PolicyTrigger:
    """Starts the jobs of matching policies for each new, non-derived model version."""

    def __init__(self, database: Database, sources: Sources, notify_outbox: object) -> None:
        self.database = database
        self.sources = sources
        self.notify_outbox = notify_outbox

    async def subscribe(self, bus: EventBus) -> None:
        await bus.subscribe(CONSUMER, [VERSION_CREATED], self.handle)

    async def handle(self, envelope: Envelope) -> None:
        created = unpack(envelope, events_pb2.ModelVersionCreated)
        if created.parent_version:
            return  # derived versions never trigger policies: no loops
        if not await asyncio.to_thread(self._has_policies, st.model_of(created.model_version)):
            return
        try:
            version = await self.sources.version(created.model_version)
        except Unavailable:
            raise
        except AimassError as err:
            log.warning("policy trigger: %s", err.message)
            return
        if version.source.parent_version or version.source.job.startswith("compressionJobs/"):
            return
        handler = IdempotentHandler(
            CONSUMER, self.database, lambda session, env: self._start_jobs(session, env, version)
        )
        if await handler(envelope):
            self.notify_outbox()  # type: ignore[operator]

    def _has_policies(self, model: str) -> bool:
        with self.database.session(read_only=True) as session:
            return (
                session.scalar(
                    select(m.CompressionPolicy.id).where(
                        m.CompressionPolicy.model == model, m.CompressionPolicy.enabled.is_(True)
                    )
                )
                is not None
            )

    def _start_jobs(
        self, session: Session, envelope: Envelope, version: registry_pb2.ModelVersion
    ) -> None:
        policies = session.scalars(
            select(m.CompressionPolicy).where(
                m.CompressionPolicy.model == st.model_of(version.name),
                m.CompressionPolicy.enabled.is_(True),
            )
        ).all()
        for policy in policies:
            clauses = st.check_version_filter(policy.config.get("version_filter", ""), "filter")
            if not st.version_matches(clauses, dict(version.tags), version.framework):
                continue
            job = pb.CompressionJob(
                parent_version=version.name, recipe=st.policy_recipe(policy),
                evaluate=bool(policy.config.get("evaluate", False)),
                target_model=policy.config.get("target_model", ""),
                labels={"trigger": "policy", "policy": policy.name},
            )  # fmt: skip
            message = create_job(
                self.database, job, policy.creator or f"policy:{policy.name}",
                f"policy-{policy.id}-{envelope.id}"[:64], policy, session=session,
            )  # fmt: skip
            policy.config = {**policy.config, "last_job": message.name}
