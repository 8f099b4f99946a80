"""The ingest consumer: pulls ingest jobs from the JetStream work queue and runs them.

Every data-service replica runs one :class:`IngestWorker`; all of them share the durable
consumer of ``aimassjobs.ingest``, so each job goes to one replica at a time. A replica
runs one ingest at a time (each ingest already keeps both cores busy) and sends
``in_progress`` heartbeats while it works. It acks a job once the job is in a terminal
state in the database; a replica that dies before that loses the job to another replica
after ``ACK_WAIT_S``, which resumes it (see :class:`aimass.data.ingest.Ingestor`). A
replica that shuts down gracefully naks its running job so it is redelivered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

import nats.errors

from aimass.core.errors import AimassError, NotFound, Unavailable
from aimass.core.events import EventBus
from aimass.core.events.envelope import unpack
from aimass.core.events.jobs import Job, JobQueue
from aimass.data import store as st
from aimass.data.ingest import Ingestor
from aimass.data.v1 import data_pb2 as pb

log = logging.getLogger(__name__)

JOB_KIND = "ingest"
# Without a heartbeat for this long, a job goes back to the queue (heartbeats: every third).
ACK_WAIT_S = 30.0
# Attempts before a job that keeps killing its workers is given up. The queue delivers
# once more than this, and that extra delivery only records the job as FAILED, so a job
# never stays RUNNING after its last worker died.
MAX_ATTEMPTS = 5
PULL_TIMEOUT_S = 2.0
RETRY_DELAY_S = 2.0


async def enqueue_ingest(bus: EventBus, job_name: str, request: pb.IngestDatasetRequest) -> None:
    """Puts an ingest job on the queue; the job name de-duplicates a repeated enqueue."""
    await bus.enqueue_job(JOB_KIND, job_name, request, source="aimass.data", msg_id=job_name)


class IngestWorker:
    """The consumer loop of one data-service process."""

    def __init__(self, bus: EventBus, ingestor: Ingestor) -> None:
        self.bus = bus
        self.ingestor = ingestor
        self.queue: JobQueue | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.queue = await self.bus.job_queue(
            JOB_KIND, ack_wait_s=ACK_WAIT_S, max_deliver=MAX_ATTEMPTS + 1
        )
        self.task = asyncio.create_task(self._loop(), name="ingest-worker")

    async def stop(self) -> None:
        """Stops pulling; a running job is left RUNNING and given back to the queue."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.queue is not None:
            await self.queue.close()

    async def _loop(self) -> None:
        assert self.queue is not None
        while True:
            try:
                job = await self.queue.pull(timeout_s=PULL_TIMEOUT_S)
            except Unavailable as err:
                log.warning("ingest queue: %s; retrying", err.message)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if job is not None:
                await self._handle(job)

    async def _handle(self, job: Job) -> None:
        try:
            request = unpack(job.envelope, pb.IngestDatasetRequest)
            job_id = st.parse_simple_name(job.name, "ingestJobs")
        except (AimassError, ValueError) as err:
            log.error("ingest queue drops %s: %s", job.name, err)
            await _settle(job.term())
            return
        if job.num_delivered > MAX_ATTEMPTS:
            await self._give_up(job, job_id)
            return
        try:
            async with job.keep_alive():
                await self.ingestor.run(job_id, request.force)
        except asyncio.CancelledError:
            await _settle(job.nak())
            raise
        except NotFound:
            # The job (or its dataset) was deleted while it waited: nothing left to do.
            await _settle(job.ack())
            return
        except Exception:  # the database or store failed: try again later
            log.exception("ingest job %s could not run; it will be redelivered", job.name)
            await _settle(job.nak(RETRY_DELAY_S))
            return
        await _settle(job.ack())

    async def _give_up(self, job: Job, job_id: str) -> None:
        reason = (
            f"ingest stopped {MAX_ATTEMPTS} times without finishing (its worker died each time)"
        )
        log.error("ingest job %s: %s", job.name, reason)
        try:
            await self.ingestor.give_up(job_id, reason)
        except NotFound:
            pass
        except Exception:  # the database is away: let the queue deliver it again later
            log.exception("ingest job %s could not be marked failed", job.name)
            await _settle(job.nak(RETRY_DELAY_S))
            return
        await _settle(job.term())


async def _settle(action: Awaitable[object]) -> None:
    """Acks, naks or terms; a lost connection only means the queue redelivers the job."""
    try:
        await action
    except (TimeoutError, nats.errors.Error, OSError) as err:
        log.warning("ingest queue: could not settle a job: %s", err)
