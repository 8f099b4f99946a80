"""JWT verification: HS256 with a shared secret, RS256 with the keys of a JWKS file.

The algorithm is taken from the token's header but only ever matched with its
own kind of key (HS256 with the secret, RS256 with the JWKS's RSA keys), so a
token cannot pick a weaker check ("alg": "none", or HS256 signed with the
public RSA key). The issuer (and audience when configured) must match and
``exp`` is required. The role is the ``role`` claim (or the first of a
``roles`` list that is an aimass role); ``project`` scopes the caller.
Verified tokens are cached until they expire, so a caller that sends the same
token on every call pays for one signature check.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import OrderedDict
from typing import Any

from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey

from aimass.core.auth.roles import ROLES
from aimass.core.errors import Unauthenticated
from aimass.core.settings import AuthSettings

_CACHE_SIZE = 4096


class JwtVerifier:
    """Turns a bearer JWT into (subject, role, project, expiry) or raises Unauthenticated."""

    def __init__(self, settings: AuthSettings) -> None:
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self._hs_key = OctKey.import_key(settings.hs256_secret) if settings.hs256_secret else None
        self._rs_keys = (
            KeySet.import_key_set(json.loads(settings.jwks_file.read_text()))
            if settings.jwks_file
            else None
        )
        self._cache: OrderedDict[str, tuple[str, str, str, float]] = OrderedDict()

    @property
    def configured(self) -> bool:
        return self._hs_key is not None or self._rs_keys is not None

    def verify(self, token: str) -> tuple[str, str, str]:
        """(subject, role, project) of a valid token."""
        cached = self._cache.get(token)
        if cached is not None and cached[3] > time.time():
            return cached[0], cached[1], cached[2]
        subject, role, project, expires = self._verify_uncached(token)
        self._cache[token] = (subject, role, project, expires)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return subject, role, project

    def _verify_uncached(self, token: str) -> tuple[str, str, str, float]:
        algorithm = _header(token).get("alg")
        key: Any
        if algorithm == "HS256" and self._hs_key is not None:
            key = self._hs_key
        elif algorithm == "RS256" and self._rs_keys is not None:
            key = self._rs_keys
        else:
            raise Unauthenticated(f"JWT algorithm {algorithm!r} is not accepted here")
        try:
            decoded = jose_jwt.decode(token, key, algorithms=[algorithm])
            self._claims_registry().validate(decoded.claims)
        except (JoseError, ValueError) as err:
            raise Unauthenticated(f"JWT rejected: {_describe(err)}") from err
        claims = decoded.claims
        return (
            str(claims.get("sub") or ""),
            _role(claims),
            str(claims.get("project") or ""),
            float(claims["exp"]),
        )

    def _claims_registry(self) -> jose_jwt.JWTClaimsRegistry:
        checks: dict[str, Any] = {"exp": {"essential": True}, "sub": {"essential": True}}
        if self.issuer:
            checks["iss"] = {"essential": True, "value": self.issuer}
        if self.audience:
            checks["aud"] = {"essential": True, "value": self.audience}
        return jose_jwt.JWTClaimsRegistry(leeway=30, **checks)


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated("bearer token is neither an aimass API key nor a JWT")
    try:
        padded = parts[0] + "=" * (-len(parts[0]) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded))
    except (binascii.Error, ValueError) as err:
        raise Unauthenticated("JWT header is not base64url JSON") from err
    if not isinstance(header, dict):
        raise Unauthenticated("JWT header is not a JSON object")
    return header


def _role(claims: dict[str, Any]) -> str:
    role = claims.get("role")
    if isinstance(role, str) and role in ROLES:
        return role
    for candidate in claims.get("roles") or ():
        if candidate in ROLES:
            return str(candidate)
    raise Unauthenticated(f"JWT has no aimass role claim (role: one of {', '.join(ROLES)})")


def _describe(err: Exception) -> str:
    # joserfc's errors carry an "error" code and an optional description.
    code = getattr(err, "error", "") or type(err).__name__
    description = getattr(err, "description", "") or str(err)
    return f"{code}: {description}" if description and description != code else str(code)
