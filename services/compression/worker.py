"""The compression service's background work: the job-queue consumer and policies.

- :class:`JobWorker` pulls ``aimassjobs.compression`` one job at a time,
  heartbeats while it runs, acks when the job is in an end state (naks when a
  service it needs is unavailable, so the job comes back later).
- :func:`main` (``aimass worker compression``): a process that only consumes
  the work queue, beside the service (which consumes it too), so heavy jobs
  can run on other machines; the same :class:`Runner` as the service.
- :class:`PolicyTrigger` follows ``aimass.registry.version.created``: for a
  version that was not itself derived (compressed, distilled), every enabled
  policy of its model whose filter matches starts a job, in the same
  transaction that records the event as handled, so an event delivered twice
  starts one job per policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass.compression import store as st
from aimass.compression.api import create_job
from aimass.compression.evaluations import Evaluations
from aimass.compression.runner import Runner
from aimass.compression.sources import Sources
from aimass.compression.triton_check import triton_checker
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.db import models as m
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, Unavailable
from aimass.core.events import Envelope, EventBus, IdempotentHandler, unpack
from aimass.core.logging import configure_logging
from aimass.core.service import ServiceContext, close_context
from aimass.core.settings import Settings, load_settings
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


async def open_runner(ctx: ServiceContext) -> tuple[Runner, Sources]:
    """The job runner over the context's database, artifacts, channels and configured Triton."""
    home = ctx.settings.home
    sources = Sources(ctx.channels(), home / "cache" / "compression" / "models")
    checker = triton_checker()
    if checker is not None:
        ctx.on_close(checker.close)
    runner = Runner(
        ctx.database(), await ctx.artifacts(), sources, ctx.notify_outbox,
        home / "work" / "compression", checker.check if checker is not None else None,
        Evaluations(ctx.channels()), ctx.channels().get("training"),
    )  # fmt: skip
    return runner, sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aimass worker compression", description="Pull compression jobs until SIGTERM."
    )
    parser.add_argument("--ack-wait", type=float, default=60.0, help="seconds before redelivery")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, settings: Settings, stop: asyncio.Event) -> None:
    """Consumes the compression queue until ``stop`` is set, then closes everything."""
    ctx = ServiceContext(name="compression-worker", settings=settings)
    try:
        runner, _ = await open_runner(ctx)
        worker = JobWorker(await ctx.event_bus(), runner, ack_wait_s=args.ack_wait)
        await worker.start()
        ctx.on_close(worker.stop)
        await stop.wait()
    finally:
        await close_context(ctx)


async def _serve_until_signal(args: argparse.Namespace, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(args, settings, stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings()
    configure_logging("compression-worker", settings.log_level, settings.log_format)
    asyncio.run(_serve_until_signal(args, settings))
