"""Jobs on the work-queue stream AIMASS_JOBS, shared by any number of workers.

A job of kind ``training`` is an envelope on subject ``aimassjobs.training``
whose ``subject`` is the job's resource name. All workers of a kind pull from
one durable consumer, so each job goes to exactly one worker at a time. A
worker acks when done (the stream then deletes the job), sends ``in_progress``
heartbeats while it works (:meth:`Job.keep_alive`) so a live worker keeps its
job past ``ack_wait``, and a worker that dies without acking loses the job to
another worker after ``ack_wait``. After ``max_deliver`` deliveries the job is
no longer handed out; a worker that sees the last attempt fail should
:meth:`Job.term` it and record the failure.

    queue = await bus.job_queue("training", ack_wait_s=30)
    job = await queue.pull(timeout_s=5)
    if job is not None:
        async with job.keep_alive():
            await train(job.envelope)
        await job.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from opentelemetry import trace

from aimass.core.errors import Unavailable
from aimass.core.events.envelope import (
    JOBS_PREFIX,
    JOBS_STREAM,
    Envelope,
    UndecodableEvent,
    decode_envelope,
    validate_name,
)
from aimass.core.telemetry import extract_context

if TYPE_CHECKING:
    from aimass.core.events.bus import EventBus

logger = logging.getLogger(__name__)


def _tracer() -> trace.Tracer:
    # Looked up per use, not bound at import: the process's provider may be set later.
    return trace.get_tracer("aimass.core.events.jobs")


def job_topic(kind: str) -> str:
    """The subject jobs of ``kind`` are queued on; raises InvalidArgument for a bad kind."""
    return f"{JOBS_PREFIX}.{validate_name(kind, 'kind')}"


def job_consumer_name(kind: str) -> str:
    """The durable consumer every worker of ``kind`` shares."""
    return f"jobs_{validate_name(kind, 'kind')}"


def subqueue_topic(kind: str, subqueue: str) -> str:
    """The subject of one sub-queue of ``kind``, e.g. a resource class of training workers."""
    return f"{job_topic(kind)}.{validate_name(subqueue, 'subqueue')}"


@dataclass
class Job:
    """One delivery of a job to this worker; settle it with ack, nak or term."""

    kind: str
    envelope: Envelope
    message: Msg
    ack_wait_s: float

    @property
    def name(self) -> str:
        """The job's resource name, e.g. "trainingJobs/42"."""
        return self.envelope.subject

    @property
    def num_delivered(self) -> int:
        """How many times the job has been handed out, this delivery included."""
        return int(self.message.metadata.num_delivered)

    async def ack(self) -> None:
        """Done: the job leaves the queue. Waits until the server has recorded it."""
        await self.message.ack_sync(timeout=5.0)

    async def nak(self, delay_s: float | None = None) -> None:
        """Give the job back for another delivery (after ``delay_s``)."""
        await self.message.nak(delay=delay_s)

    async def term(self) -> None:
        """Never deliver this job again (it failed for good)."""
        await self.message.term()

    async def in_progress(self) -> None:
        """Heartbeat: restarts the ack_wait clock so the job stays with this worker."""
        await self.message.in_progress()

    @contextlib.asynccontextmanager
    async def keep_alive(self, interval_s: float | None = None) -> AsyncIterator[Job]:
        """Sends ``in_progress`` every ``interval_s`` (default ack_wait / 3) during the block.

        The block runs in a CONSUMER span that continues the trace of whoever enqueued the
        job (the trace context rides in the message headers), so the calls a worker makes
        join the trace of the Create call that started the job.
        """
        interval = interval_s if interval_s is not None else self.ack_wait_s / 3
        task = asyncio.create_task(self._heartbeat(interval), name=f"heartbeat-{self.name}")
        try:
            with _tracer().start_as_current_span(
                f"{self.kind} job",
                context=extract_context(self.message.headers or {}),
                kind=trace.SpanKind.CONSUMER,
                attributes={"aimass.job": self.name, "aimass.job.attempt": self.num_delivered},
            ):
                yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.in_progress()
            except (nats.errors.Error, OSError) as err:
                # Reconnecting: the next beat may still arrive within ack_wait.
                logger.warning("heartbeat of job %s not sent: %s", self.name, err)


class JobQueue:
    """The pull side of the work queue of one job kind."""

    def __init__(
        self, kind: str, pull: JetStreamContext.PullSubscription, ack_wait_s: float
    ) -> None:
        self.kind = kind
        self.ack_wait_s = ack_wait_s
        self._pull = pull

    @classmethod
    async def open(
        cls,
        bus: EventBus,
        kind: str,
        *,
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
        subqueue: str = "",
    ) -> JobQueue:
        """Creates (or updates) the kind's shared consumer and binds to it.

        With ``subqueue`` the consumer is that sub-queue's (``aimassjobs.<kind>.<subqueue>``),
        shared by the workers of that sub-queue only.
        """
        durable = job_consumer_name(kind) + (f"_{subqueue}" if subqueue else "")
        topic = subqueue_topic(kind, subqueue) if subqueue else job_topic(kind)
        config = api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            filter_subject=topic,
        )
        await bus.add_consumer(JOBS_STREAM, config)
        pull = await bus.js.pull_subscribe_bind(durable=durable, stream=JOBS_STREAM)
        return cls(kind, pull, ack_wait_s)

    async def pull(self, timeout_s: float = 5.0) -> Job | None:
        """The next job, or None when none arrives within ``timeout_s``.

        Messages that are not envelopes are terminated (they can never run).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0.01:
            try:
                messages = await self._pull.fetch(1, timeout=left)
            except nats.errors.TimeoutError:
                return None
            except nats.errors.Error as err:
                raise Unavailable(f"jobs of kind {self.kind}: NATS unreachable: {err}") from err
            message = messages[0]
            try:
                envelope = decode_envelope(message.data)
            except UndecodableEvent as err:
                logger.error("job queue %s drops a message: %s", self.kind, err)
                await message.term()
                continue
            return Job(self.kind, envelope, message, self.ack_wait_s)
        return None

    async def consumer_info(self) -> api.ConsumerInfo:
        """The server's view of the queue's consumer."""
        return await self._pull.consumer_info()

    async def close(self) -> None:
        """Stops pulling; the shared consumer stays for other workers."""
        with contextlib.suppress(nats.errors.Error):
            await self._pull.unsubscribe()
