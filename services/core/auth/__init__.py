"""Access control shared by every service: API keys, JWT, roles, rate limits.

How a call is admitted (:class:`aimass.core.auth.hook.AccessControl`, the
interceptor's auth hook when ``settings.auth.enabled``):

1. credentials from the metadata: ``x-api-key: <key>`` or
   ``authorization: Bearer <key or JWT>`` (a service forwarding a call sends
   ``x-aimass-internal``); none -> UNAUTHENTICATED;
2. the principal: an API key is hashed and looked up in ``api_keys`` (cached a
   few seconds, dropped at once everywhere when revoked; revoked or expired ->
   UNAUTHENTICATED), a JWT is verified
   (HS256 secret or RS256 through a JWKS file, issuer, audience, expiry) and
   its ``role`` claim read;
3. the method's permission (:mod:`aimass.core.auth.roles`, derived from the
   protos' google.api.http verbs) against the role -> PERMISSION_DENIED;
4. the key's token bucket, shared by every process through NATS ->
   RESOURCE_EXHAUSTED with RetryInfo.

Servicers then scope resources by the principal's project with :mod:`scope`.

Modules: ``roles`` (roles, permissions, method map), ``keys`` (key format and
the SQL key store), ``jwt`` (verification), ``ratelimit`` (token buckets, local and
cluster-wide), ``cluster`` (the NATS link: revocation events, the shared buckets),
``scope`` (per-project scoping of resources),
``hook`` (the auth hook), ``api`` (the AccessService servicer), ``bootstrap``
(the admin key ``aimass up`` writes on first start).
"""

from __future__ import annotations

from aimass.core.auth.hook import auth_hook_from_settings, outgoing_credentials

__all__ = ["auth_hook_from_settings", "outgoing_credentials"]
