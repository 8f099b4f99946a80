"""What the access control of one process shares with the others, over NATS.

Each process's :class:`aimass.core.auth.hook.AccessControl` holds one
:class:`ClusterLink`, a NATS connection of its own (the hook is built before a
service's event bus, and must not depend on whether the service uses events):

- revocations: the AccessService publishes ``aimass.access.key.revoked`` when a key is
  revoked; every link subscribes to it (plain NATS, no consumer state) and drops the
  key from its process's key cache, so a revoked key stops working everywhere within a
  NATS hop instead of after ``auth.key_cache_s``. A link that was disconnected may have
  missed revocations, so it drops the whole cache when it reconnects;
- rate limits: the JetStream key-value bucket ``AIMASS_RATELIMITS`` holds one token
  bucket per caller, updated with compare-and-set on the entry's revision
  (:class:`aimass.core.auth.ratelimit.ClusterRateLimiter`).

The link never blocks a call: until it is connected (or while NATS is away) the hook
uses its per-process buckets and the key cache's time to live, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from aimass.access.v1 import access_pb2
from aimass.core.errors import InvalidArgument
from aimass.core.events.envelope import UndecodableEvent, decode_envelope, unpack

log = logging.getLogger(__name__)

KEY_REVOKED_TOPIC = "aimass.access.key.revoked"
RATE_LIMIT_BUCKET = "AIMASS_RATELIMITS"
# An idle caller's bucket is full again long before this; the entry then just goes away.
_BUCKET_ENTRY_TTL_S = 3600.0
_RETRY_CONNECT_S = 2.0


class ClusterLink:
    """A NATS connection for access control: revocations in, the shared rate-limit bucket.

    ``on_revoked(key_id)`` runs for every revocation published anywhere;
    ``on_reconnected()`` when the connection comes back (revocations may have been missed).
    """

    def __init__(
        self,
        nats_url: str,
        on_revoked: Callable[[str], None],
        on_reconnected: Callable[[], None],
        *,
        name: str = "aimass-access",
    ) -> None:
        self.nats_url = nats_url
        self.name = name
        self._on_revoked = on_revoked
        self._on_reconnected = on_reconnected
        self._client: Client | None = None
        self.kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        # Set once the first connection attempt succeeded or failed.
        self._attempted = asyncio.Event()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    def rate_bucket(self) -> KeyValue | None:
        """The shared bucket while it can be reached, else None (callers use local buckets)."""
        return self.kv if self.connected else None

    async def start(self, wait_s: float = 2.0) -> None:
        """Connects in the background and waits (up to ``wait_s``) for the first attempt, so
        a server that starts with NATS up is subscribed before it serves its first call,
        and one that starts without NATS does not wait for it."""
        if self._task is not None or self._closed or not self.nats_url:
            return
        self._task = asyncio.get_running_loop().create_task(self._connect_until_done())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), wait_s)

    def ensure_started(self) -> None:
        """Starts the link from a running loop without waiting (hooks built outside a server)."""
        if self._task is None and not self._closed and self.nats_url:
            self._task = asyncio.get_running_loop().create_task(self._connect_until_done())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client, self._client, self.kv = self._client, None, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await client.close()

    async def _connect_until_done(self) -> None:
        # The client retries its first connection forever; this loop covers the rest
        # (subscribing, the key-value bucket).
        while not self._closed:
            try:
                await self._connect()
                return
            except (nats.errors.Error, OSError, TimeoutError) as err:
                self._unreachable(err)
                await asyncio.sleep(_RETRY_CONNECT_S)
            finally:
                self._attempted.set()

    def _unreachable(self, err: BaseException) -> None:
        # The URL is not logged: it may carry a password.
        log.warning(
            "access control: NATS unreachable (%s); per-process rate limits and the key"
            " cache's time to live until it is",
            type(err).__name__,
        )

    async def _connect(self) -> None:
        client = Client()
        await client.connect(
            servers=[u.strip() for u in self.nats_url.split(",")],
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2.0,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
        )
        try:
            await client.subscribe(KEY_REVOKED_TOPIC, cb=self._revoked)
            kv = await _rate_limit_bucket(client)
        except BaseException:
            await client.close()
            raise
        self._client, self.kv = client, kv

    async def _revoked(self, message: Msg) -> None:
        try:
            key = unpack(decode_envelope(message.data), access_pb2.ApiKey)
        except (UndecodableEvent, InvalidArgument) as err:
            log.warning("access control: ignored an undecodable key revocation: %s", err)
            return
        _, _, key_id = key.name.partition("/")
        if key_id:
            self._on_revoked(key_id)

    async def _reconnected(self) -> None:
        self._on_reconnected()

    async def _error(self, err: Exception) -> None:
        if not self._attempted.is_set():
            self._attempted.set()
            self._unreachable(err)
        log.debug("access control: NATS error: %s", err)


async def _rate_limit_bucket(client: Client) -> KeyValue:
    """AIMASS_RATELIMITS, created on first use (in memory: limits need not outlive NATS)."""
    js = client.jetstream(timeout=2.0)
    try:
        return await js.key_value(RATE_LIMIT_BUCKET)
    except NotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=RATE_LIMIT_BUCKET,
            history=1,
            ttl=_BUCKET_ENTRY_TTL_S,
            storage=api.StorageType.MEMORY,
            description="aimass: token buckets per API key and JWT subject",
        )
    except APIError:
        # Another process created it meanwhile.
        return await js.key_value(RATE_LIMIT_BUCKET)
