"""The artifact store: bytes by URI, content-addressed by sha256, written atomically,
verified on read. ``file://`` roots on a local or mounted folder, ``s3://`` roots on S3,
MinIO or any S3-compatible server.

    store = open_artifact_store(settings.artifact_root, settings.s3)
    obj = await store.put_stream(chunks)              # -> StoredObject(uri, sha256, size)
    async for chunk in store.open_stream(obj.uri):     # verified against its address
        ...

See :mod:`aimass.core.artifacts.base` for the interface and its errors.
"""

from __future__ import annotations

from aimass.core.artifacts.base import (
    DEFAULT_CHUNK_SIZE,
    ArtifactStore,
    IntegrityError,
    StoredObject,
)
from aimass.core.artifacts.local import LocalArtifactStore
from aimass.core.artifacts.s3 import S3ArtifactStore, make_s3_client
from aimass.core.artifacts.uris import (
    RootUri,
    check_sha256,
    content_key,
    parse_root_uri,
    validate_key,
)
from aimass.core.settings import S3Settings

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ArtifactStore",
    "IntegrityError",
    "LocalArtifactStore",
    "RootUri",
    "S3ArtifactStore",
    "StoredObject",
    "check_sha256",
    "content_key",
    "make_s3_client",
    "open_artifact_store",
    "parse_root_uri",
    "validate_key",
]


def open_artifact_store(root_uri: str, s3: S3Settings | None = None) -> ArtifactStore:
    """The store for a root URI: LocalArtifactStore for file://, S3ArtifactStore for s3://.

    Raises InvalidArgument ("artifact_root") for an unknown scheme or a malformed root.
    Opening a local store creates its folders and removes stale temporary files.
    """
    root = parse_root_uri(root_uri)
    if root.scheme == "file":
        return LocalArtifactStore(root)
    return S3ArtifactStore(root, s3 if s3 is not None else S3Settings())
