"""The event bus: NATS JetStream with protobuf envelopes and trace context.

One :class:`EventBus` per process. It reconnects forever when the server goes
away (publishes wait in the client's buffer meanwhile), creates the streams
idempotently, publishes envelopes with ``Nats-Msg-Id`` = envelope id (so the
stream drops a republished event inside its duplicate window) and the W3C
trace context in the headers, and runs durable pull consumers whose handlers
see the publisher's trace context as the current one.

Delivery is at least once: a handler that raises gets the event again later
(nak with a growing delay); a consumer that dies without acking gets it again
after ``ack_wait``. Handlers dedupe by envelope id (see
:mod:`aimass.core.events.idempotent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import nats.errors
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from opentelemetry import context as otel_context
from opentelemetry import trace

from aimass.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from aimass.core.events.envelope import (
    EVENTS_PREFIX,
    EVENTS_STREAM,
    JOBS_PREFIX,
    JOBS_STREAM,
    MSG_ID_HEADER,
    Envelope,
    UndecodableEvent,
    build_envelope,
    decode_envelope,
    validate_name,
    validate_topic,
    validate_topic_filter,
)
from aimass.core.settings import Settings
from aimass.core.telemetry import extract_context, inject_headers

if TYPE_CHECKING:
    from aimass.core.events.jobs import JobQueue

logger = logging.getLogger(__name__)


def _tracer() -> trace.Tracer:
    # Looked up per use, not bound at import: the process's provider may be set later.
    return trace.get_tracer("aimass.core.events")


Handler = Callable[[Envelope], Awaitable[object]]

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StreamSettings:
    """Limits of the two streams; ``ensure_streams`` makes the server match them."""

    # Events are kept for replay (new consumers, DeliverPolicy.BY_START_TIME) this long.
    events_max_age_s: float = 7 * DAY_S
    events_max_bytes: int = -1
    # A message id seen again within this window is dropped (relay retries, crashes).
    duplicate_window_s: float = 120.0
    # Jobs leave the work queue when acked; this only bounds forgotten ones.
    jobs_max_age_s: float = 30 * DAY_S
    storage: api.StorageType = api.StorageType.FILE

    def events_config(self) -> api.StreamConfig:
        """AIMASS_EVENTS: every ``aimass.>`` subject, limits retention."""
        return api.StreamConfig(
            name=EVENTS_STREAM,
            description="aimass domain events",
            subjects=[f"{EVENTS_PREFIX}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=self.storage,
            max_age=self.events_max_age_s,
            max_bytes=self.events_max_bytes,
            duplicate_window=self.duplicate_window_s,
        )

    def jobs_config(self) -> api.StreamConfig:
        """AIMASS_JOBS: ``aimassjobs.<kind>``, each job removed once a worker acks it."""
        return api.StreamConfig(
            name=JOBS_STREAM,
            description="aimass jobs (training, compression, evaluation)",
            subjects=[f"{JOBS_PREFIX}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=self.storage,
            max_age=self.jobs_max_age_s,
            max_bytes=-1,
            duplicate_window=self.duplicate_window_s,
        )


# Fields ensure_streams owns; others (set by an operator) are left alone.
_MANAGED_STREAM_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "max_age",
    "max_bytes",
    "duplicate_window",
    "description",
)


def changed_stream_fields(current: api.StreamConfig, desired: api.StreamConfig) -> list[str]:
    """Names of the managed fields whose values differ between two stream configs."""
    changed = []
    for name in _MANAGED_STREAM_FIELDS:
        have, want = getattr(current, name), getattr(desired, name)
        if name == "subjects":
            have, want = sorted(have or []), sorted(want or [])
        elif isinstance(want, float) or isinstance(have, float):
            have, want = round(float(have or 0), 6), round(float(want or 0), 6)
        if have != want:
            changed.append(name)
    return changed


@dataclass(frozen=True)
class ConsumerOptions:
    """How a durable consumer fetches and retries."""

    ack_wait_s: float = 30.0
    # -1: redeliver forever (handlers are expected to succeed eventually).
    max_deliver: int = -1
    retry_delay_s: float = 1.0
    max_retry_delay_s: float = 60.0
    batch: int = 10
    fetch_timeout_s: float = 2.0

    def retry_delay(self, num_delivered: int) -> float:
        """Delay before redelivering an event whose handler failed ``num_delivered`` times."""
        exponent = max(num_delivered - 1, 0)
        return min(self.retry_delay_s * 2.0**exponent, self.max_retry_delay_s)


class EventBus:
    """A NATS connection with JetStream, publishing and consuming aimass envelopes."""

    def __init__(self, client: Client, name: str, *, request_timeout_s: float = 5.0) -> None:
        self.client = client
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.js: JetStreamContext = client.jetstream(timeout=request_timeout_s)
        self._subscriptions: list[Subscription] = []
        self._job_queues: list[JobQueue] = []
        self._closing = False

    @classmethod
    async def connect(
        cls,
        target: Settings | str,
        name: str,
        *,
        reconnect_time_wait_s: float = 0.5,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
    ) -> EventBus:
        """Connects to NATS (URL or ``settings.nats_url``) and keeps reconnecting forever."""
        url = target.nats_url if isinstance(target, Settings) else target
        client = Client()
        bus = cls(client, name, request_timeout_s=request_timeout_s)
        try:
            await client.connect(
                servers=[u.strip() for u in url.split(",")],
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_time_wait_s,
                connect_timeout=connect_timeout_s,
                error_cb=bus._on_error,
                disconnected_cb=bus._on_disconnected,
                reconnected_cb=bus._on_reconnected,
                closed_cb=bus._on_closed,
            )
        except (nats.errors.Error, OSError) as err:
            raise Unavailable(f"nats_url: cannot connect to {url}: {err}") from err
        bus.js = client.jetstream(timeout=request_timeout_s)
        return bus

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now (False while reconnecting)."""
        return bool(self.client.is_connected)

    async def _on_error(self, err: Exception) -> None:
        logger.warning("nats error on %s: %s", self.name, err)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            logger.warning("nats disconnected: %s reconnects", self.name)

    async def _on_reconnected(self) -> None:
        logger.info("nats reconnected: %s to %s", self.name, self.client.connected_url)

    async def _on_closed(self) -> None:
        logger.info("nats connection of %s closed", self.name)

    # ---- streams -------------------------------------------------------------------------

    async def ensure_streams(self, settings: StreamSettings | None = None) -> dict[str, str]:
        """Creates or updates AIMASS_EVENTS and AIMASS_JOBS; returns what happened to each.

        Each value is "created", "updated" or "unchanged", so running it on every
        start of every service is cheap and safe.
        """
        settings = settings or StreamSettings()
        results = {}
        for config in (settings.events_config(), settings.jobs_config()):
            results[str(config.name)] = await self.ensure_stream(config)
        return results

    async def ensure_stream(self, desired: api.StreamConfig) -> str:
        """Creates the stream, or updates it when a managed field differs."""
        name = str(desired.name)
        try:
            info = await self.js.stream_info(name)
        except NotFoundError:
            try:
                await self.js.add_stream(desired)
                return "created"
            except APIError as err:
                # Another process may have created it meanwhile: then compare.
                info = await self._stream_created_elsewhere(name, err)
        changed = changed_stream_fields(info.config, desired)
        if not changed:
            return "unchanged"
        try:
            await self.js.update_stream(desired)
        except APIError as err:
            raise FailedPrecondition(
                f"stream {name}: cannot change {', '.join(changed)}: {err.description}"
            ) from err
        logger.info("stream %s updated: %s", name, ", ".join(changed))
        return "updated"

    async def _stream_created_elsewhere(self, name: str, err: APIError) -> api.StreamInfo:
        try:
            return await self.js.stream_info(name)
        except NotFoundError:
            raise FailedPrecondition(f"stream {name}: cannot create: {err.description}") from err

    # ---- publishing ----------------------------------------------------------------------

    async def publish(self, topic: str, payload: Message, *, subject: str, source: str) -> Envelope:
        """Wraps ``payload`` in a new envelope, publishes it, waits for the stream's ack."""
        validate_topic(topic)
        envelope = build_envelope(topic, payload, subject=subject, source=source)
        await self.publish_envelope(envelope)
        return envelope

    async def publish_envelope(
        self, envelope: Envelope, *, trace_headers: Mapping[str, str] | None = None
    ) -> api.PubAck:
        """Publishes a built envelope on its topic; ``trace_headers`` default to the current span.

        The outbox relay passes the trace headers stored with the row, so the
        event continues the trace of the transaction that wrote it.
        """
        return await self.publish_raw(
            envelope.topic, envelope.SerializeToString(), envelope.id, trace_headers
        )

    async def publish_raw(
        self,
        topic: str,
        data: bytes,
        msg_id: str,
        trace_headers: Mapping[str, str] | None = None,
    ) -> api.PubAck:
        """Publishes serialized bytes with ``Nats-Msg-Id`` = ``msg_id``; raises Unavailable."""
        parent = extract_context(trace_headers) if trace_headers is not None else None
        with _tracer().start_as_current_span(
            f"{topic} publish", context=parent, kind=trace.SpanKind.PRODUCER
        ) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", topic)
            span.set_attribute("messaging.message.id", msg_id)
            headers = inject_headers()
            headers[MSG_ID_HEADER] = msg_id
            try:
                return await self.js.publish(
                    topic, data, headers=headers, timeout=self.request_timeout_s
                )
            except nats.errors.Error as err:
                raise Unavailable(
                    f"NATS did not store the message on {topic}: {type(err).__name__} {err}"
                ) from err

    # ---- jobs ----------------------------------------------------------------------------

    async def enqueue_job(
        self,
        kind: str,
        job_name: str,
        payload: Message,
        *,
        source: str = "",
        msg_id: str | None = None,
    ) -> Envelope:
        """Puts one job on the work queue ``aimassjobs.<kind>``; the envelope subject is the job.

        ``msg_id`` (default: the envelope id) de-duplicates enqueues within the
        stream's duplicate window, e.g. the job name when a retried RPC may
        enqueue the same job twice.
        """
        from aimass.core.events.jobs import job_topic

        topic = job_topic(kind)
        envelope = build_envelope(topic, payload, subject=job_name, source=source)
        await self.publish_raw(topic, envelope.SerializeToString(), msg_id or envelope.id)
        return envelope

    async def job_queue(
        self, kind: str, *, ack_wait_s: float = 30.0, max_deliver: int = 5, subqueue: str = ""
    ) -> JobQueue:
        """The work queue of one job kind (or of one of its sub-queues), for a worker to pull."""
        from aimass.core.events.jobs import JobQueue

        queue = await JobQueue.open(
            self, kind, ack_wait_s=ack_wait_s, max_deliver=max_deliver, subqueue=subqueue
        )
        self._job_queues.append(queue)
        return queue

    async def pending_jobs(self, kind: str) -> int:
        """Jobs of ``kind`` waiting on its queue and sub-queues (not yet handed to a worker).

        A subject some worker consumes counts its consumer's pending messages; a subject no
        worker has bound yet (no consumer) counts every message on it.
        """
        from aimass.core.events.jobs import job_topic

        topic = job_topic(kind)

        def ours(subject: str) -> bool:
            return subject == topic or subject.startswith(topic + ".")

        consumers = [
            c
            for c in await self.js.consumers_info(JOBS_STREAM)
            if ours(c.config.filter_subject or "")
        ]
        waiting = sum(int(c.num_pending or 0) for c in consumers)
        bound = {c.config.filter_subject for c in consumers}
        stream = await self.js.stream_info(JOBS_STREAM, subjects_filter=f"{topic}.>")
        subjects = dict(stream.state.subjects or {})
        plain = await self.js.stream_info(JOBS_STREAM, subjects_filter=topic)
        subjects.update(plain.state.subjects or {})
        return waiting + sum(n for subject, n in subjects.items() if subject not in bound)

    # ---- consuming -----------------------------------------------------------------------

    async def subscribe(
        self,
        durable: str,
        topics: Sequence[str],
        handler: Handler,
        *,
        deliver_policy: api.DeliverPolicy = api.DeliverPolicy.ALL,
        start_time: datetime | None = None,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """Runs ``handler`` for every event on ``topics`` through the durable consumer ``durable``.

        The consumer outlives the process: a restarted service resumes where it
        acked. ``start_time`` (or ``deliver_policy``) only matters when the
        consumer is first created: it replays the stream from that point.
        """
        options = options or ConsumerOptions()
        config = consumer_config(durable, topics, deliver_policy, start_time, options)
        await self.add_consumer(EVENTS_STREAM, config)
        pull = await self.js.pull_subscribe_bind(durable=durable, stream=EVENTS_STREAM)
        subscription = Subscription(self, pull, durable, handler, options)
        self._subscriptions.append(subscription)
        subscription.start()
        return subscription

    async def add_consumer(self, stream: str, config: api.ConsumerConfig) -> api.ConsumerInfo:
        """Creates a durable consumer or updates its mutable settings."""
        try:
            return await self.js.add_consumer(stream, config)
        except APIError as err:
            raise FailedPrecondition(
                f"consumer {config.durable_name} on {stream}: {err.description}"
            ) from err
        except nats.errors.Error as err:
            raise Unavailable(f"consumer {config.durable_name}: NATS unreachable: {err}") from err

    async def close(self) -> None:
        """Stops every subscription (finishing the event in hand), then drains the connection.

        Pull subscriptions are closed first: a drain would otherwise wait for
        messages that arrived after a fetch expired and that nobody reads.
        """
        self._closing = True
        for subscription in list(self._subscriptions):
            await subscription.stop()
        for queue in self._job_queues:
            await queue.close()
        self._job_queues.clear()
        if self.client.is_closed:
            return
        try:
            await self.client.drain()
        except (nats.errors.Error, OSError) as err:
            logger.warning("nats drain of %s failed: %s", self.name, err)
            await self.client.close()

    def _forget(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)


def consumer_config(
    durable: str,
    topics: Sequence[str],
    deliver_policy: api.DeliverPolicy,
    start_time: datetime | None,
    options: ConsumerOptions,
) -> api.ConsumerConfig:
    """The JetStream config of an event consumer; raises InvalidArgument on bad input."""
    validate_name(durable, "durable")
    if isinstance(topics, str) or not topics:
        raise InvalidArgument("topics", "must be a non-empty list of subjects")
    for topic in topics:
        validate_topic_filter(topic)
    if start_time is not None:
        deliver_policy = api.DeliverPolicy.BY_START_TIME
    elif deliver_policy == api.DeliverPolicy.BY_START_TIME:
        raise InvalidArgument("start_time", "is required when deliver_policy is by_start_time")
    if start_time is not None and start_time.tzinfo is None:
        raise InvalidArgument("start_time", "must be timezone-aware")
    return api.ConsumerConfig(
        name=durable,
        durable_name=durable,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=deliver_policy,
        opt_start_time=start_time,
        ack_wait=options.ack_wait_s,
        max_deliver=options.max_deliver,
        filter_subject=topics[0] if len(topics) == 1 else None,
        filter_subjects=list(topics) if len(topics) > 1 else None,
    )


class Subscription:
    """A running durable consumer: fetches, runs the handler, acks / naks / terms."""

    def __init__(
        self,
        bus: EventBus,
        pull: JetStreamContext.PullSubscription,
        durable: str,
        handler: Handler,
        options: ConsumerOptions,
    ) -> None:
        self.bus = bus
        self.durable = durable
        self._pull = pull
        self._handler = handler
        self._options = options
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # True while a fetched batch is being handled: stop() then waits instead of cancelling.
        self._busy = False

    def start(self) -> None:
        """Starts the fetch loop as a task of the running event loop."""
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.durable}")

    async def stop(self) -> None:
        """Stops fetching; an event being handled is finished and acked first."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if not self._busy:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(nats.errors.Error):
            await self._pull.unsubscribe()
        self.bus._forget(self)

    async def consumer_info(self) -> api.ConsumerInfo:
        """The server's view of the consumer: pending, ack pending, redelivered counts."""
        return await self._pull.consumer_info()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                messages = await self._pull.fetch(
                    self._options.batch, timeout=self._options.fetch_timeout_s
                )
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as err:
                # Disconnected or the server is restarting: the client reconnects on its own.
                failures += 1
                logger.warning("consumer %s fetch failed: %s", self.durable, err)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            self._busy = True
            try:
                await self._handle_batch(messages)
            finally:
                self._busy = False

    async def _handle_batch(self, messages: list[Msg]) -> None:
        for index, message in enumerate(messages):
            if self._stopping:
                # Give the rest back at once rather than after ack_wait.
                for rest in messages[index:]:
                    await _settle(rest.nak)
                return
            await self._handle(message)

    async def _handle(self, message: Msg) -> None:
        try:
            envelope = decode_envelope(message.data)
        except UndecodableEvent as err:
            logger.error("consumer %s drops message on %s: %s", self.durable, message.subject, err)
            await _settle(message.term)
            return
        token = otel_context.attach(extract_context(message.headers))
        try:
            with _tracer().start_as_current_span(
                f"{message.subject} process", kind=trace.SpanKind.CONSUMER
            ) as span:
                span.set_attribute("messaging.system", "nats")
                span.set_attribute("messaging.consumer.group.name", self.durable)
                span.set_attribute("messaging.message.id", envelope.id)
                await self._handler(envelope)
        except Exception as err:
            delivered = message.metadata.num_delivered
            delay = self._options.retry_delay(delivered)
            logger.warning(
                "consumer %s: handler failed on event %s (delivery %d), retry in %.1fs: %r",
                self.durable,
                envelope.id,
                delivered,
                delay,
                err,
            )
            await _settle(lambda: message.nak(delay=delay))
            return
        finally:
            otel_context.detach(token)
        await _settle(message.ack_sync)


async def _settle(action: Callable[[], Awaitable[object]]) -> None:
    """Runs ack / nak / term; a lost one only means a redelivery, so it is logged, not raised."""
    try:
        await action()
    except (nats.errors.Error, OSError) as err:
        logger.warning("ack not delivered (event will be redelivered): %s", err)
