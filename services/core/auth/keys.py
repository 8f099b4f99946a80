"""API keys: their format, their hash, and the SQL store of the ``api_keys`` table.

A key reads ``aimass_<id>_<secret>``: ``<id>`` is the public name
(``apiKeys/<id>``, lower-case letters, digits and '-'), ``<secret>`` 32 random
bytes in base64url. Only the sha256 of the whole key is stored, so a stolen
database holds no usable key; the key itself is returned once, at creation.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from aimass.core.auth.roles import ROLES
from aimass.core.db.engine import Database
from aimass.core.db.models import ApiKey
from aimass.core.db.pagination import paginate
from aimass.core.errors import AlreadyExists, InvalidArgument, NotFound

KEY_PREFIX = "aimass_"
_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
_SECRET_BYTES = 32


@dataclass(frozen=True)
class KeyRecord:
    """An API key as the services see it (never its secret)."""

    key_id: str
    role: str
    project: str = ""
    description: str = ""
    creator: str = ""
    create_time: datetime | None = None
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    last_use_time: datetime | None = None
    rate_limit_per_s: float = 0.0

    @property
    def name(self) -> str:
        return f"apiKeys/{self.key_id}"

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at ``now``."""
        if self.revoke_time is not None:
            return False
        return self.expire_time is None or now < self.expire_time


def hash_key(key: str) -> str:
    """sha256 hex of a key: what the table stores and looks up."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> str:
    """A fresh key for ``key_id``."""
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def looks_like_key(credential: str) -> bool:
    """True for our key format (a JWT has two dots and no such prefix)."""
    return credential.startswith(KEY_PREFIX)


def check_key_id(key_id: str, field: str = "api_key_id") -> str:
    if not _ID_RE.match(key_id):
        raise InvalidArgument(
            field,
            f"must be 1-63 lower-case letters, digits and '-', starting with a letter;"
            f" got {key_id!r}",
        )
    return key_id


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidArgument("api_key.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
    return role


def key_id_of_name(name: str) -> str:
    """``apiKeys/{id}`` -> id; InvalidArgument naming ``name`` otherwise."""
    prefix, _, key_id = name.partition("/")
    if prefix != "apiKeys" or not key_id:
        raise InvalidArgument("name", f"must look like apiKeys/{{api_key}}; got {name!r}")
    return check_key_id(key_id, "name")


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        key_id=row.name,
        role=row.role,
        project=row.project,
        description=row.description,
        creator=row.creator,
        create_time=row.create_time,
        expire_time=row.expire_time,
        revoke_time=row.revoke_time,
        last_use_time=row.last_use_time,
        rate_limit_per_s=row.rate_limit_per_s,
    )


class SqlKeyStore:
    """API keys in the ``api_keys`` table. Blocking: call from a thread in async code."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(
        self,
        key_id: str,
        role: str,
        *,
        project: str = "",
        description: str = "",
        creator: str = "",
        expire_time: datetime | None = None,
        rate_limit_per_s: float = 0.0,
    ) -> tuple[KeyRecord, str]:
        """Stores a new key; returns it and its secret (shown once)."""
        check_key_id(key_id)
        check_role(role)
        if rate_limit_per_s < 0:
            raise InvalidArgument(
                "api_key.rate_limit_per_s", f"must be 0 or more; got {rate_limit_per_s}"
            )
        now = datetime.now(UTC)
        if expire_time is not None and expire_time <= now:
            raise InvalidArgument("api_key.expire_time", "must be in the future")
        key = new_key(key_id)
        with self.database.session(resource=f"apiKeys/{key_id}") as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.name == key_id)) is not None:
                raise AlreadyExists(f"apiKeys/{key_id} already exists")
            row = ApiKey(
                name=key_id,
                key_hash=hash_key(key),
                role=role,
                project=project,
                description=description,
                creator=creator,
                create_time=now,
                expire_time=expire_time,
                rate_limit_per_s=rate_limit_per_s,
            )
            session.add(row)
            session.flush()
            record = _record(row)
        return record, key

    def get(self, key_id: str) -> KeyRecord:
        with self.database.session(read_only=True) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == key_id))
            if row is None:
                raise NotFound(f"apiKeys/{key_id} does not exist")
            return _record(row)

    def list(
        self, page_size: int = 0, page_token: str = "", *, show_revoked: bool = False
    ) -> tuple[list[KeyRecord], str]:
        stmt = select(ApiKey)
        if not show_revoked:
            stmt = stmt.where(ApiKey.revoke_time.is_(None))
        with self.database.session(read_only=True) as session:
            rows, token = paginate(
                session, stmt, [ApiKey.create_time.desc(), ApiKey.id.desc()], page_size, page_token
            )
            return [_record(row) for row in rows], token

    def revoke(self, key_id: str) -> KeyRecord:
        """Marks the key revoked (idempotent: a second revoke keeps the first time)."""
        with self.database.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == key_id))
            if row is None:
                raise NotFound(f"apiKeys/{key_id} does not exist")
            if row.revoke_time is None:
                row.revoke_time = datetime.now(UTC)
            return _record(row)

    def lookup(self, key: str) -> KeyRecord | None:
        """The key's record by its hash, revoked or not; None for an unknown key."""
        with self.database.session(read_only=True) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
            return None if row is None else _record(row)

    def touch(self, key_ids: list[str], when: datetime) -> None:
        """Records the last use of keys (batched by the caller: a write per call is too dear)."""
        if not key_ids:
            return
        with self.database.session() as session:
            for row in session.scalars(select(ApiKey).where(ApiKey.name.in_(key_ids))):
                row.last_use_time = when
