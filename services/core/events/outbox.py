"""The transactional outbox: events written with the state change, published after commit.

A service calls :func:`add_event` inside the transaction that changes its
state; the event is a row of ``outbox_events`` and commits or rolls back with
that change. :class:`OutboxRelay` publishes unpublished rows in ``seq`` order,
waits for the stream's ack, then sets ``publish_time``. A crash anywhere loses
nothing: a row committed but not published is published by the next relay,
and a row published but not marked is published again with the same
``Nats-Msg-Id`` (the event id), which the stream drops inside its duplicate
window; consumers dedupe by event id as well (IdempotentHandler).

Several relays may run at once. PostgreSQL: each claims a batch with
``SELECT ... FOR UPDATE SKIP LOCKED`` and holds it until marked, so relays
never publish the same row; order is kept within a relay's batches but not
across relays. SQLite has one writer at a time; relays there read without a
lock, so two relays may publish a row twice, and the duplicate window drops
the second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Engine, delete, event, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.db.outbox import OutboxEvent
from aimass.core.errors import AimassError, Unavailable
from aimass.core.events.bus import DAY_S, EventBus
from aimass.core.events.envelope import (
    JOBS_PREFIX,
    Envelope,
    build_envelope,
    decode_headers,
    encode_headers,
    validate_topic,
)
from aimass.core.telemetry import inject_headers

logger = logging.getLogger(__name__)

T = TypeVar("T")

# session.info key: the session holds outbox rows, so its commit should wake the relays.
_PENDING = "aimass_outbox_pending"

# Points where the fault hook is called (crash tests kill the process there).
BEFORE_PUBLISH = "before_publish"
AFTER_PUBLISH = "after_publish"

FaultHook = Callable[[str, int], None]


def add_event(
    session: Session,
    topic: str,
    payload: Message,
    *,
    subject: str,
    source: str,
    trace: Mapping[str, str] | None = None,
) -> Envelope:
    """Adds the event to the caller's transaction; it is published once the transaction commits.

    ``topic`` is an event subject (``aimass.registry.version.created``) or a
    job subject (``aimassjobs.training``, with ``subject`` the job name), so a
    job can be enqueued atomically with the row that describes it.
    ``trace`` (W3C headers) publishes the event in that trace instead of the current one:
    a job released later by a scheduler stays in the trace of the request that created it.
    """
    prefix = JOBS_PREFIX if topic.startswith(f"{JOBS_PREFIX}.") else "aimass"
    validate_topic(topic, prefix=prefix)
    envelope = build_envelope(topic, payload, subject=subject, source=source)
    session.add(
        OutboxEvent(
            event_id=envelope.id,
            topic=topic,
            envelope=envelope.SerializeToString(),
            trace_headers=encode_headers(dict(trace) if trace else inject_headers()),
        )
    )
    session.info[_PENDING] = True
    return envelope


@dataclass(frozen=True)
class _Row:
    seq: int
    event_id: str
    topic: str
    envelope: bytes
    trace_headers: str


class OutboxRelay:
    """Publishes committed outbox rows to NATS; run one or more per database."""

    def __init__(
        self,
        db: Database | Engine,
        bus: EventBus,
        *,
        batch_size: int = 100,
        poll_interval_s: float = 1.0,
        retention_s: float = 7 * DAY_S,
        prune_interval_s: float = 600.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.db = db if isinstance(db, Database) else Database(db)
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.retention_s = retention_s
        self.prune_interval_s = prune_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._fault_hook = fault_hook
        self._postgres = self.db.engine.dialect.name == "postgresql"
        # One thread for every DB call: a claimed session stays on the thread that opened it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-relay")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watched: list[Any] = []

    # ---- waking --------------------------------------------------------------------------

    def notify(self) -> None:
        """Wakes the relay now (from any thread) instead of at the next poll."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def watch(self, target: Any = Session) -> None:
        """Wakes the relay after each commit of a session (class, maker or instance) of ``target``

        that added outbox rows. The default, the Session class, covers every
        session of this process.
        """
        event.listen(target, "after_commit", self._after_commit)
        event.listen(target, "after_rollback", self._after_rollback)
        self._watched.append(target)

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(_PENDING, False):
            self.notify()

    def _after_rollback(self, session: Session) -> None:
        session.info.pop(_PENDING, None)

    # ---- running -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Runs :meth:`run` as a task of the current loop."""
        self._task = asyncio.create_task(self.run(), name="outbox-relay")
        return self._task

    async def stop(self) -> None:
        """Finishes the batch in hand, then stops; unpublished rows wait for the next relay."""
        self._stopped.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for target in self._watched:
            event.remove(target, "after_commit", self._after_commit)
            event.remove(target, "after_rollback", self._after_rollback)
        self._watched.clear()
        self._executor.shutdown(wait=True)

    async def run(self) -> None:
        """Publishes until stopped: at once when woken, else every ``poll_interval_s``.

        While NATS or the database is unreachable it retries with exponential
        backoff; the rows simply wait.
        """
        self._loop = asyncio.get_running_loop()
        backoff = self.backoff_initial_s
        next_prune = self._loop.time()
        while not self._stopped.is_set():
            self._wake.clear()
            try:
                published = await self.relay_once()
                if self._loop.time() >= next_prune:
                    await self.prune()
                    next_prune = self._loop.time() + self.prune_interval_s
            except (AimassError, SQLAlchemyError) as err:
                logger.warning("outbox relay: %s; retrying in %.2fs", err, backoff)
                await self._pause(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            backoff = self.backoff_initial_s
            if published < self.batch_size:
                await self._pause(self.poll_interval_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def drain(self) -> int:
        """Publishes every unpublished row now; returns how many. Raises Unavailable on failure."""
        total = 0
        while (published := await self.relay_once()) > 0:
            total += published
        return total

    async def relay_once(self) -> int:
        """Publishes one batch in seq order; returns how many rows it published.

        Raises Unavailable when NATS did not ack a row (the rows before it are
        marked, the rest wait).
        """
        self._loop = self._loop or asyncio.get_running_loop()
        if self._postgres:
            return await self._relay_locked_batch()
        return await self._relay_unlocked_batch()

    async def _relay_locked_batch(self) -> int:
        session = Session(self.db.engine)
        try:
            rows = await self._in_db(lambda: self._claim(session, lock=True))
            published, error = await self._publish_rows(rows)
            if published or error:
                await self._in_db(lambda: self._mark(session, rows, published, error))
        finally:
            await self._in_db(session.close)
        return self._result(published, error)

    async def _relay_unlocked_batch(self) -> int:
        def claim() -> list[_Row]:
            with self.db.session(read_only=True) as session:
                return self._claim(session, lock=False)

        rows = await self._in_db(claim)
        published, error = await self._publish_rows(rows)

        def mark() -> None:
            with self.db.session() as session:
                self._mark(session, rows, published, error)

        if published or error:
            await self._in_db(mark)
        return self._result(published, error)

    def _claim(self, session: Session, *, lock: bool) -> list[_Row]:
        query = (
            select(
                OutboxEvent.seq,
                OutboxEvent.event_id,
                OutboxEvent.topic,
                OutboxEvent.envelope,
                OutboxEvent.trace_headers,
            )
            .where(OutboxEvent.publish_time.is_(None))
            .order_by(OutboxEvent.seq)
            .limit(self.batch_size)
        )
        if lock:
            query = query.with_for_update(skip_locked=True)
        return [_Row(*row) for row in session.execute(query).all()]

    async def _publish_rows(self, rows: list[_Row]) -> tuple[list[int], Unavailable | None]:
        """Publishes rows in order, stopping at the first failure so order is kept."""
        published: list[int] = []
        for row in rows:
            self._fault(BEFORE_PUBLISH, row.seq)
            try:
                await self.bus.publish_raw(
                    row.topic, row.envelope, row.event_id, decode_headers(row.trace_headers)
                )
            except Unavailable as err:
                return published, err
            self._fault(AFTER_PUBLISH, row.seq)
            published.append(row.seq)
        return published, None

    def _mark(
        self, session: Session, rows: list[_Row], published: list[int], error: Exception | None
    ) -> None:
        """Sets publish_time of the published rows (and counts the failed attempt); commits."""
        if published:
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.seq.in_(published), OutboxEvent.publish_time.is_(None))
                .values(publish_time=utcnow(), attempts=OutboxEvent.attempts + 1)
            )
        if error is not None and len(published) < len(rows):
            failed = rows[len(published)].seq
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.seq == failed)
                .values(attempts=OutboxEvent.attempts + 1)
            )
        session.commit()

    @staticmethod
    def _result(published: list[int], error: Unavailable | None) -> int:
        if error is not None:
            raise error
        return len(published)

    async def prune(self, older_than_s: float | None = None) -> int:
        """Deletes rows published more than ``older_than_s`` (default: retention) ago."""
        age_s = self.retention_s if older_than_s is None else older_than_s
        cutoff = utcnow() - timedelta(seconds=age_s)

        def delete_old() -> int:
            with self.db.session() as session:
                result = session.execute(
                    delete(OutboxEvent).where(OutboxEvent.publish_time < cutoff)
                )
                return int(getattr(result, "rowcount", 0) or 0)

        return await self._in_db(delete_old)

    async def pending(self) -> int:
        """How many rows wait to be published."""

        def count() -> int:
            with self.db.session(read_only=True) as session:
                query = select(func.count()).where(OutboxEvent.publish_time.is_(None))
                return int(session.execute(query).scalar_one())

        return await self._in_db(count)

    async def _in_db(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, work)
        except SQLAlchemyError as err:
            raise Unavailable(f"outbox: database error: {err}") from err

    def _fault(self, point: str, seq: int) -> None:
        if self._fault_hook is not None:
            self._fault_hook(point, seq)
