"""The admin key of an embedded stack, created on its first start.

``aimass up`` calls :func:`ensure_admin_key` after migrating the database:
the first time it creates ``apiKeys/admin`` and writes the key to
``$AIMASS_HOME/credentials/admin.key`` (mode 0600), later starts find the file
and leave it. The internal token the stack's services use between themselves
lives beside it. The SDK and the CLI read the admin key from there when
AIMASS_API_KEY is not set.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from aimass.core.auth.keys import SqlKeyStore
from aimass.core.db.engine import Database
from aimass.core.errors import AlreadyExists

ADMIN_KEY_FILE = "credentials/admin.key"
INTERNAL_TOKEN_FILE = "credentials/internal.token"


def admin_key_path(home: Path) -> Path:
    return home / ADMIN_KEY_FILE


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")


def ensure_admin_key(home: Path, database_url: str) -> tuple[Path, bool]:
    """(path of the admin key file, True when created now). The database must be migrated."""
    path = admin_key_path(home)
    if path.is_file():
        return path, False
    database = Database(database_url)
    try:
        store = SqlKeyStore(database)
        key_id = "admin"
        while True:
            try:
                _, key = store.create(
                    key_id, "admin", description="created by aimass up", creator="aimass up"
                )
                break
            except AlreadyExists:
                # The file was deleted: a new key, the old one stays until revoked.
                key_id = f"admin-{secrets.token_hex(3)}"
    finally:
        database.dispose()
    _write_secret(path, key)
    return path, True


def ensure_internal_token(home: Path) -> str:
    """The stack's internal token (created once, kept in home, mode 0600)."""
    path = home / INTERNAL_TOKEN_FILE
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    _write_secret(path, token)
    return token


def read_admin_key(home: Path) -> str | None:
    """The admin key written by ``aimass up``, or None."""
    path = admin_key_path(home)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
