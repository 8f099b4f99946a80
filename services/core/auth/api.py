"""The AccessService servicer: API keys created, listed, revoked; the caller's identity."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.core.auth.cluster import KEY_REVOKED_TOPIC
from aimass.core.auth.hook import forget_key
from aimass.core.auth.keys import KeyRecord, SqlKeyStore, key_id_of_name
from aimass.core.errors import InvalidArgument, Unavailable
from aimass.core.events.bus import EventBus
from aimass.core.interceptors import current_principal
from aimass.core.server import GrpcService
from aimass.core.service import ServiceContext

log = logging.getLogger(__name__)

SERVICE_FULL_NAME = "aimass.access.v1.AccessService"

_ROLE_TO_PROTO = {
    "admin": access_pb2.ROLE_ADMIN,
    "developer": access_pb2.ROLE_DEVELOPER,
    "predictor": access_pb2.ROLE_PREDICTOR,
    "viewer": access_pb2.ROLE_VIEWER,
}
_PROTO_TO_ROLE = {value: key for key, value in _ROLE_TO_PROTO.items()}


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def key_to_proto(record: KeyRecord, secret: str = "") -> access_pb2.ApiKey:
    return access_pb2.ApiKey(
        name=record.name,
        description=record.description,
        role=_ROLE_TO_PROTO.get(record.role, access_pb2.ROLE_UNSPECIFIED),
        project=record.project,
        secret=secret,
        creator=record.creator,
        create_time=_timestamp(record.create_time),
        expire_time=_timestamp(record.expire_time),
        revoke_time=_timestamp(record.revoke_time),
        last_use_time=_timestamp(record.last_use_time),
        rate_limit_per_s=record.rate_limit_per_s,
    )


def _generated_id() -> str:
    return "key-" + datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    """API keys in the ``api_keys`` table (admin only, enforced by the interceptor)."""

    def __init__(self, store: SqlKeyStore, bus: EventBus | None = None) -> None:
        self.store = store
        self.bus = bus

    async def CreateApiKey(
        self, request: access_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ApiKey:
        key = request.api_key
        role = _PROTO_TO_ROLE.get(key.role)
        if role is None:
            raise InvalidArgument(
                "api_key.role",
                "is required: ROLE_ADMIN, ROLE_DEVELOPER, ROLE_PREDICTOR or ROLE_VIEWER",
            )
        expire = key.expire_time.ToDatetime(tzinfo=UTC) if key.HasField("expire_time") else None
        record, secret = await asyncio.to_thread(
            self.store.create,
            request.api_key_id or _generated_id(),
            role,
            project=key.project,
            description=key.description,
            creator=current_principal().subject,
            expire_time=expire,
            rate_limit_per_s=key.rate_limit_per_s,
        )
        return key_to_proto(record, secret)

    async def GetApiKey(
        self, request: access_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ApiKey:
        key_id = key_id_of_name(request.name)
        return key_to_proto(await asyncio.to_thread(self.store.get, key_id))

    async def ListApiKeys(
        self, request: access_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListApiKeysResponse:
        records, token = await asyncio.to_thread(
            self.store.list,
            request.page_size,
            request.page_token,
            show_revoked=request.show_revoked,
        )
        return access_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(r) for r in records], next_page_token=token
        )

    async def RevokeApiKey(
        self, request: access_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ApiKey:
        key_id = key_id_of_name(request.name)
        record = await asyncio.to_thread(self.store.revoke, key_id)
        forget_key(key_id)
        await self._announce_revocation(record)
        return key_to_proto(record)

    async def _announce_revocation(self, record: KeyRecord) -> None:
        """Tells every process to drop the key from its cache (aimass.core.auth.cluster).

        Published after the commit, straight to NATS rather than through the outbox:
        the outbox relay's latency is what this event exists to avoid. Should it be lost,
        the other processes' key caches still expire after auth.key_cache_s.
        """
        if self.bus is None:
            return
        try:
            await self.bus.publish(
                KEY_REVOKED_TOPIC, key_to_proto(record), subject=record.name, source="access"
            )
        except Unavailable as err:
            log.warning(
                "%s revoked, but the revocation event was not published: %s", record.name, err
            )

    async def LookupCallerIdentity(
        self, request: access_pb2.LookupCallerIdentityRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.CallerIdentity:
        principal = current_principal()
        return access_pb2.CallerIdentity(
            subject=principal.subject,
            role=_ROLE_TO_PROTO.get(principal.role, access_pb2.ROLE_UNSPECIFIED),
            project=principal.project,
        )


def access_service(store: SqlKeyStore, bus: EventBus | None = None) -> GrpcService:
    """The AccessService, to add to a process's services (the registry serves it); with
    ``bus``, revocations are announced to every process."""
    return GrpcService(
        full_name=SERVICE_FULL_NAME,
        servicer=AccessServicer(store, bus),
        add_to_server=access_pb2_grpc.add_AccessServiceServicer_to_server,
    )


async def access_services(ctx: ServiceContext) -> list[GrpcService]:
    """AccessService and WebhookService over ``ctx``'s database, and the webhook dispatcher
    on its event bus (stopped with the service). The registry process serves these."""
    from aimass.core.auth.webhooks import SqlWebhookStore, WebhookDispatcher, webhook_service

    database = ctx.database()
    webhooks = SqlWebhookStore(database)
    dispatcher = WebhookDispatcher(webhooks)
    bus = await ctx.event_bus()
    await dispatcher.start(bus)
    ctx.on_close(dispatcher.stop)
    return [access_service(SqlKeyStore(database), bus), webhook_service(webhooks)]
