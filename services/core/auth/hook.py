"""The auth hook of the shared interceptor: who is calling, may they, and not too often.

:class:`AccessControl` implements :class:`aimass.core.interceptors.AuthHook`.
Its hot path is dictionary work: an API key's lookup is cached for
``auth.key_cache_s`` seconds, a JWT's verification until it expires, the
method's permission is a precomputed table and the rate limit spends a local
lease of the key's cluster-wide bucket, so a call costs microseconds
(tests/bench/bench_gateway.py, tests/bench/bench_ratelimit.py). A revocation
anywhere reaches every process's key cache over NATS
(:mod:`aimass.core.auth.cluster`); the cache's time to live only bounds what a
process that missed the event (NATS away) keeps trusting.
Credentials never reach a log line: errors name the key id at most.

:func:`outgoing_credentials` is what a service sends when it calls another:
the caller's own credential when serving a call (so the callee checks the
same principal), else the stack's internal token. Background work done for a
project (a pipeline run's stages) runs inside :func:`acting_for_project`: the internal
token then travels with ``x-aimass-project``, and the callee scopes the internal
principal to that project, so what it creates lands there and it reaches nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

from aimass.core.auth.cluster import ClusterLink
from aimass.core.auth.jwt import JwtVerifier
from aimass.core.auth.keys import KeyRecord, SqlKeyStore, looks_like_key
from aimass.core.auth.ratelimit import ClusterRateLimiter
from aimass.core.auth.roles import ADMIN, allowed, method_permissions
from aimass.core.db.engine import Database
from aimass.core.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from aimass.core.interceptors import AllowAll, AuthHook, Principal
from aimass.core.settings import AuthSettings, Settings

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
INTERNAL_HEADER = "x-aimass-internal"
# Honoured with the internal token only: the project background work acts for.
PROJECT_HEADER = "x-aimass-project"
_LAST_USE_FLUSH_S = 30.0

# The credential of the call being served (headers), forwarded on calls it makes.
_incoming: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "aimass_incoming_credential", default=None
)
# The project background work of this context acts for ("" = none: unscoped).
_acting_project: contextvars.ContextVar[str] = contextvars.ContextVar(
    "aimass_acting_project", default=""
)
_internal_token: str | None = None
_hooks: weakref.WeakSet[AccessControl] = weakref.WeakSet()
INTERNAL_PRINCIPAL = Principal(subject="aimass-internal", role=ADMIN)


def forget_key(key_id: str) -> None:
    """Drops a key from the caches of this process (after a revocation here)."""
    for hook in list(_hooks):
        hook.invalidate(key_id)


def outgoing_credentials() -> dict[str, str]:
    """Metadata to authenticate a call from this service to another (for ServiceChannels)."""
    incoming = _incoming.get()
    if incoming is not None:
        return dict(incoming)
    return internal_headers(_internal_token) if _internal_token else {}


def internal_headers(token: str) -> dict[str, str]:
    """The internal token's metadata, with the project the context acts for (if any)."""
    project = _acting_project.get()
    if project:
        return {INTERNAL_HEADER: token, PROJECT_HEADER: project}
    return {INTERNAL_HEADER: token}


@contextlib.contextmanager
def acting_for_project(project: str) -> Iterator[None]:
    """Calls made inside (with the internal token) act for ``project``: the callees scope
    them to it, as they would a caller's key of that project. "" leaves them unscoped."""
    token = _acting_project.set(project)
    try:
        yield
    finally:
        _acting_project.reset(token)


def credential_of(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """(header, value) of the credential sent, or None."""
    key = metadata.get(API_KEY_HEADER)
    if key:
        return API_KEY_HEADER, key
    authorization = metadata.get(AUTHORIZATION_HEADER)
    if authorization:
        return AUTHORIZATION_HEADER, authorization
    internal = metadata.get(INTERNAL_HEADER)
    if internal:
        return INTERNAL_HEADER, internal
    return None


class _CachedKey:
    __slots__ = ("expires_at", "principal", "record")

    def __init__(self, record: KeyRecord | None, ttl_s: float) -> None:
        self.record = record
        self.principal = (
            None
            if record is None
            else Principal(
                subject=record.name, role=record.role, project=record.project, key_id=record.key_id
            )
        )
        self.expires_at = time.monotonic() + ttl_s


class AccessControl:
    """API keys, JWTs, internal token -> Principal; role vs method; per-key token bucket."""

    def __init__(
        self,
        settings: AuthSettings,
        keys: SqlKeyStore | None,
        permissions: Mapping[str, frozenset[str]] | None = None,
        *,
        nats_url: str = "",
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.jwt = JwtVerifier(settings)
        self.permissions = dict(method_permissions() if permissions is None else permissions)
        # No NATS URL: a link that never connects, so per-process buckets and the cache TTL.
        self.cluster = ClusterLink(nats_url, self.invalidate, self.invalidate)
        self.limiter = ClusterRateLimiter(
            settings.rate_limit_per_s, settings.rate_limit_burst_s, self.cluster.rate_bucket
        )
        self._key_cache: dict[str, _CachedKey] = {}
        # Bumped by every invalidation: a lookup that overlapped one is not cached (it may
        # have read the key just before its revocation was committed).
        self._generation = 0
        self._used: set[str] = set()
        self._last_flush = time.monotonic()
        _hooks.add(self)

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        credential = credential_of(metadata)
        if credential is None:
            raise Unauthenticated(
                "no credentials: send an API key as x-api-key (or authorization: Bearer <key>)"
                " or a JWT as authorization: Bearer <token>"
            )
        principal, rate = await self._principal(*credential)
        internal = principal is INTERNAL_PRINCIPAL
        forwarded = {credential[0]: credential[1]}
        project = metadata.get(PROJECT_HEADER, "") if internal else ""
        if project:
            principal = Principal(subject=principal.subject, role=principal.role, project=project)
            forwarded[PROJECT_HEADER] = project
        self._authorize(principal, method)
        wait_s = 0.0 if internal else await self.limiter.check(principal.subject, rate)
        if wait_s > 0:
            raise ResourceExhausted(
                f"rate limit of {principal.subject} exceeded; retry in {wait_s:.3f} s", wait_s
            )
        _incoming.set(forwarded)
        return principal

    async def start(self) -> None:
        """Connects this process to the others (revocations, shared rate limits)."""
        await self.cluster.start()

    async def close(self) -> None:
        await self.cluster.close()

    def invalidate(self, key_id: str | None = None) -> None:
        """Forgets cached keys (all, or one), so a revocation takes effect in this process now."""
        self._generation += 1
        if key_id is None:
            self._key_cache.clear()
            return
        for digest, cached in list(self._key_cache.items()):
            if cached.record is not None and cached.record.key_id == key_id:
                del self._key_cache[digest]

    def _authorize(self, principal: Principal, method: str) -> None:
        accepted = self.permissions.get(method, frozenset({"manage"}))
        if not allowed(principal.role, accepted):
            raise PermissionDenied(
                f"{principal.subject} (role {principal.role}) may not call {method.lstrip('/')}:"
                f" it needs {' or '.join(sorted(accepted))} permission"
            )

    async def _principal(self, header: str, value: str) -> tuple[Principal, float]:
        if header == INTERNAL_HEADER:
            return self._internal(value), 0.0
        token = value
        if header == AUTHORIZATION_HEADER:
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must read 'Bearer <API key or JWT>'")
            token = token.strip()
        if looks_like_key(token):
            return await self._key_principal(token)
        if header == API_KEY_HEADER:
            raise Unauthenticated("x-api-key is not an aimass API key (aimass_<id>_<secret>)")
        if not self.jwt.configured:
            raise Unauthenticated("bearer token is not an API key, and JWTs are not configured")
        subject, role, project = self.jwt.verify(token)
        return Principal(subject=subject, role=role, project=project), 0.0

    def _internal(self, value: str) -> Principal:
        expected = self.settings.internal_token
        if not expected or not hmac.compare_digest(value.encode(), expected.encode()):
            raise Unauthenticated("x-aimass-internal token is not valid")
        return INTERNAL_PRINCIPAL

    async def _key_principal(self, key: str) -> tuple[Principal, float]:
        self.cluster.ensure_started()
        cached = self._key_cache.get(key)
        if cached is None or cached.expires_at <= time.monotonic():
            generation = self._generation
            record = await self._lookup(key)
            cached = _CachedKey(record, self.settings.key_cache_s)
            if generation == self._generation:
                self._key_cache[key] = cached
            if len(self._key_cache) > 10_000:
                self._key_cache.pop(next(iter(self._key_cache)))
        record, principal = cached.record, cached.principal
        if record is None or principal is None:
            raise Unauthenticated("API key is not valid")
        now = datetime.now(UTC)
        if record.revoke_time is not None:
            raise Unauthenticated(f"API key {record.name} was revoked")
        if record.expire_time is not None and now >= record.expire_time:
            raise Unauthenticated(f"API key {record.name} expired")
        self._note_use(record.key_id)
        return principal, record.rate_limit_per_s

    async def _lookup(self, key: str) -> KeyRecord | None:
        if self.keys is None:
            return None
        return await asyncio.to_thread(self.keys.lookup, key)

    def _note_use(self, key_id: str) -> None:
        # last_use_time is written in batches: a database write per call would cost more
        # than the call.
        self._used.add(key_id)
        if time.monotonic() - self._last_flush < _LAST_USE_FLUSH_S or self.keys is None:
            return
        used, self._used = sorted(self._used), set()
        self._last_flush = time.monotonic()
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.keys.touch, used, datetime.now(UTC))
        )
        task.add_done_callback(_log_touch_failure)


def _log_touch_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not record the last use of API keys: %s", task.exception())


def auth_hook_from_settings(settings: Settings, database: Database | None = None) -> AuthHook:
    """AllowAll when auth is off, else AccessControl over the stack's ``api_keys`` table."""
    global _internal_token
    if not settings.auth.enabled:
        return AllowAll()
    _internal_token = settings.auth.internal_token
    store = SqlKeyStore(database or Database(settings.database_url))
    return AccessControl(settings.auth, store, nats_url=settings.nats_url)
