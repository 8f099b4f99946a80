"""Webhooks: aimass events POSTed, signed, retried and logged, for receivers without NATS.

:class:`WebhookDispatcher` runs in the registry process. A durable consumer
(``aimass-webhooks``) reads every event of AIMASS_EVENTS once; for each enabled
webhook whose event types match the event's subject (NATS wildcards ``*`` and a
trailing ``>``) it writes a delivery row holding the exact JSON body, in one
transaction (the unique (webhook, event id) pair makes a redelivered event a
no-op). A sender loop POSTs due deliveries:

    POST <url>
    content-type: application/json
    x-aimass-event-id / x-aimass-event-type: the envelope's id and subject
    x-aimass-timestamp: unix seconds of the attempt
    x-aimass-signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

    {"id", "type", "source", "subject", "time", "topic", "payload": {"@type", ...}}

A 2xx answer ends the delivery (SUCCEEDED); anything else, or no answer, is
retried after ``retry_base_s * 2**(attempts-1)`` (capped at ``retry_max_s``)
until ``max_attempts`` (then FAILED). Receivers verify the signature with
:func:`verify_signature` (or its few lines in their language) and should
refuse timestamps older than a few minutes (replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
from google.protobuf import empty_pb2, json_format, timestamp_pb2
from sqlalchemy import select

from aimass.access.v1 import webhooks_pb2 as pb
from aimass.access.v1 import webhooks_pb2_grpc
from aimass.core.db.engine import Database
from aimass.core.db.models import Webhook, WebhookDelivery
from aimass.core.db.pagination import paginate
from aimass.core.errors import AlreadyExists, InvalidArgument, NotFound
from aimass.core.events import Envelope, EventBus
from aimass.core.events.envelope import validate_topic_filter
from aimass.core.interceptors import current_principal
from aimass.core.server import GrpcService

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-aimass-signature"
TIMESTAMP_HEADER = "x-aimass-timestamp"
DURABLE = "aimass-webhooks"
PENDING, SUCCEEDED, FAILED = "PENDING", "SUCCEEDED", "FAILED"
_STATES = {
    PENDING: pb.DELIVERY_STATE_PENDING,
    SUCCEEDED: pb.DELIVERY_STATE_SUCCEEDED,
    FAILED: pb.DELIVERY_STATE_FAILED,
}
_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The x-aimass-signature value of a body sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, *, max_age_s: float = 300.0
) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= max_age_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS matching: ``*`` one token, a trailing ``>`` one or more tokens."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(wanted) == len(tokens)


def envelope_body(envelope: Envelope) -> str:
    """The JSON body of an event: the envelope, payload included, as proto3 JSON."""
    return json.dumps(json_format.MessageToDict(envelope), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now."""

    id: int
    url: str
    secret: str
    event_id: str
    event_type: str
    body: str
    attempts: int


def _stamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _webhook_pb(row: Webhook, secret: str = "") -> pb.Webhook:
    return pb.Webhook(
        name=f"webhooks/{row.name}",
        description=row.description,
        url=row.url,
        event_types=list(row.events),
        secret=secret,
        disabled=not row.enabled,
        project=row.project,
        create_time=_stamp(row.create_time),
        update_time=_stamp(row.update_time),
        etag=row.etag,
    )


def _delivery_pb(row: WebhookDelivery, webhook: str) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        name=f"webhooks/{webhook}/deliveries/{row.id}",
        event_id=row.event_id,
        event_type=row.event_type,
        state=_STATES.get(row.state, pb.DELIVERY_STATE_UNSPECIFIED),
        attempts=row.attempts,
        last_status_code=row.last_status_code or 0,
        last_error=row.last_error,
        create_time=_stamp(row.create_time),
        next_attempt_time=_stamp(row.next_attempt_time),
        deliver_time=_stamp(row.deliver_time),
    )


def _webhook_id(name: str, field: str = "name") -> str:
    prefix, _, webhook_id = name.partition("/")
    if prefix != "webhooks" or not _ID_RE.match(webhook_id):
        raise InvalidArgument(field, f"must look like webhooks/{{webhook}}; got {name!r}")
    return webhook_id


class SqlWebhookStore:
    """Webhooks and their delivery log. Blocking: call from a thread in async code."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(self, webhook_id: str, webhook: pb.Webhook, creator: str) -> pb.Webhook:
        if not _ID_RE.match(webhook_id):
            raise InvalidArgument(
                "webhook_id", f"must be 1-63 lower-case letters, digits and '-'; got {webhook_id!r}"
            )
        if not webhook.url.startswith(("http://", "https://")):
            raise InvalidArgument("webhook.url", f"must be an http(s):// URL; got {webhook.url!r}")
        if not webhook.event_types:
            raise InvalidArgument("webhook.event_types", "must name at least one event type")
        for pattern in webhook.event_types:
            validate_topic_filter(pattern, field="webhook.event_types")
        secret = webhook.secret or secrets.token_urlsafe(32)
        with self.database.session(resource=f"webhooks/{webhook_id}") as session:
            if session.scalar(select(Webhook.id).where(Webhook.name == webhook_id)) is not None:
                raise AlreadyExists(f"webhooks/{webhook_id} already exists")
            row = Webhook(
                name=webhook_id,
                description=webhook.description,
                project=webhook.project,
                url=webhook.url,
                events=list(webhook.event_types),
                secret=secret,
                enabled=not webhook.disabled,
                creator=creator,
            )
            session.add(row)
            session.flush()
            return _webhook_pb(row, secret)

    def _row(self, session: Any, webhook_id: str) -> Webhook:
        row = session.scalar(select(Webhook).where(Webhook.name == webhook_id))
        if row is None:
            raise NotFound(f"webhooks/{webhook_id} does not exist")
        return row

    def get(self, webhook_id: str) -> pb.Webhook:
        with self.database.session(read_only=True) as session:
            return _webhook_pb(self._row(session, webhook_id))

    def list(self, page_size: int, page_token: str) -> tuple[list[pb.Webhook], str]:
        with self.database.session(read_only=True) as session:
            rows, token = paginate(session, select(Webhook), [Webhook.id], page_size, page_token)
            return [_webhook_pb(row) for row in rows], token

    def delete(self, webhook_id: str) -> None:
        with self.database.session() as session:
            session.delete(self._row(session, webhook_id))

    def deliveries(
        self, webhook_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.WebhookDelivery], str]:
        with self.database.session(read_only=True) as session:
            row = self._row(session, webhook_id)
            stmt = select(WebhookDelivery).where(WebhookDelivery.webhook_id == row.id)
            rows, token = paginate(
                session, stmt, [WebhookDelivery.id.desc()], page_size, page_token
            )
            return [_delivery_pb(r, webhook_id) for r in rows], token

    def enqueue(self, event_id: str, event_type: str, body: str) -> int:
        """Writes one delivery per matching enabled webhook; returns how many are new."""
        now = datetime.now(UTC)
        added = 0
        with self.database.session() as session:
            hooks = session.scalars(select(Webhook).where(Webhook.enabled.is_(True))).all()
            for hook in hooks:
                if not any(subject_matches(p, event_type) for p in hook.events):
                    continue
                exists = session.scalar(
                    select(WebhookDelivery.id).where(
                        WebhookDelivery.webhook_id == hook.id, WebhookDelivery.event_id == event_id
                    )
                )
                if exists is not None:
                    continue
                session.add(
                    WebhookDelivery(
                        webhook_id=hook.id,
                        event_id=event_id,
                        event_type=event_type,
                        body=body,
                        state=PENDING,
                        next_attempt_time=now,
                        create_time=now,
                    )
                )
                added += 1
        return added

    def due(self, now: datetime, limit: int) -> list[Due]:
        with self.database.session(read_only=True) as session:
            rows = session.execute(
                select(WebhookDelivery, Webhook)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_time <= now)
                .order_by(WebhookDelivery.next_attempt_time, WebhookDelivery.id)
                .limit(limit)
            ).all()
            return [
                Due(d.id, w.url, w.secret, d.event_id, d.event_type, d.body, d.attempts)
                for d, w in rows
            ]

    def next_due_time(self) -> datetime | None:
        with self.database.session(read_only=True) as session:
            return session.scalar(
                select(WebhookDelivery.next_attempt_time)
                .where(WebhookDelivery.state == PENDING)
                .order_by(WebhookDelivery.next_attempt_time)
                .limit(1)
            )

    def record(
        self, delivery_id: int, ok: bool, status: int | None, error: str, retry_at: datetime | None
    ) -> None:
        """Stores an attempt's outcome: SUCCEEDED, PENDING again at retry_at, or FAILED."""
        with self.database.session() as session:
            row = session.get(WebhookDelivery, delivery_id)
            if row is None:  # its webhook was deleted meanwhile
                return
            row.attempts += 1
            row.last_status_code = status
            row.last_error = error[:2000]
            if ok:
                row.state = SUCCEEDED
                row.deliver_time = datetime.now(UTC)
            elif retry_at is None:
                row.state = FAILED
            else:
                row.next_attempt_time = retry_at


class WebhookDispatcher:
    """Consumes events into delivery rows and sends the due ones (see the module docstring)."""

    def __init__(
        self,
        store: SqlWebhookStore,
        *,
        retry_base_s: float = 0.5,
        retry_max_s: float = 300.0,
        max_attempts: int = 8,
        http_timeout_s: float = 10.0,
        batch: int = 32,
    ) -> None:
        self.store = store
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.http_timeout_s = http_timeout_s
        self.batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscription: Any = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self, bus: EventBus) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.http_timeout_s))
        self._subscription = await bus.subscribe(DURABLE, ["aimass.>"], self.on_event)
        self._task = asyncio.get_running_loop().create_task(self._send_loop())

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def on_event(self, envelope: Envelope) -> None:
        added = await asyncio.to_thread(
            self.store.enqueue, envelope.id, envelope.topic, envelope_body(envelope)
        )
        if added:
            self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            try:
                due = await asyncio.to_thread(self.store.due, datetime.now(UTC), self.batch)
                await asyncio.gather(*(self._attempt(d) for d in due))
                if len(due) == self.batch:
                    continue
                await self._sleep_until_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup must not end deliveries for good
                log.exception("webhook sender: retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _sleep_until_due(self) -> None:
        upcoming = await asyncio.to_thread(self.store.next_due_time)
        wait_s = 5.0
        if upcoming is not None:
            wait_s = min(wait_s, max(0.0, (upcoming - datetime.now(UTC)).total_seconds()))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait_s)

    async def _attempt(self, due: Due) -> None:
        assert self._http is not None
        body = due.body.encode()
        stamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "x-aimass-event-id": due.event_id,
            "x-aimass-event-type": due.event_type,
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: sign(due.secret, stamp, body),
        }
        status: int | None = None
        error = ""
        try:
            async with self._http.post(due.url, data=body, headers=headers) as reply:
                status = reply.status
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {(await reply.text())[:500]}"
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            error = f"{type(err).__name__}: {err}"
        ok = not error
        attempts = due.attempts + 1
        retry_at = None
        if not ok and attempts < self.max_attempts:
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        await asyncio.to_thread(self.store.record, due.id, ok, status, error, retry_at)


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    """The WebhookService (admin only, enforced by the interceptor)."""

    def __init__(self, store: SqlWebhookStore) -> None:
        self.store = store

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.Webhook:
        creator = current_principal().subject
        return await asyncio.to_thread(
            self.store.create, request.webhook_id, request.webhook, creator
        )

    async def GetWebhook(
        self, request: pb.GetWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.Webhook:
        return await asyncio.to_thread(self.store.get, _webhook_id(request.name))

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhooksResponse:
        hooks, token = await asyncio.to_thread(
            self.store.list, request.page_size, request.page_token
        )
        return pb.ListWebhooksResponse(webhooks=hooks, next_page_token=token)

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.store.delete, _webhook_id(request.name))
        return empty_pb2.Empty()

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhookDeliveriesResponse:
        deliveries, token = await asyncio.to_thread(
            self.store.deliveries,
            _webhook_id(request.parent, "parent"),
            request.page_size,
            request.page_token,
        )
        return pb.ListWebhookDeliveriesResponse(
            webhook_deliveries=deliveries, next_page_token=token
        )


def webhook_service(store: SqlWebhookStore) -> GrpcService:
    return GrpcService(
        full_name="aimass.access.v1.WebhookService",
        servicer=WebhookServicer(store),
        add_to_server=webhooks_pb2_grpc.add_WebhookServiceServicer_to_server,
    )
