"""Helpers of the artifact store tests: streams, patterns, and a backdoor to the storage."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aimass.core.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore

MiB = 1024 * 1024


class Backdoor:
    """Direct access to what a store wrote, for checks the store's API cannot make."""

    def __init__(self, store: ArtifactStore, s3_client: Any = None) -> None:
        self.store = store
        self.s3 = s3_client

    def object_keys(self) -> list[str]:
        """Every stored object, as keys relative to the root (sorted)."""
        if isinstance(self.store, LocalArtifactStore):
            root = self.store.directory
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert isinstance(self.store, S3ArtifactStore)
        prefix = self.store.root.prefix + "/"
        listing = self.s3.list_objects_v2(Bucket=self.store.bucket, Prefix=prefix)
        return sorted(item["Key"][len(prefix) :] for item in listing.get("Contents", []))

    def leftovers(self) -> list[str]:
        """Temporary files, multipart uploads in progress and staging objects."""
        if isinstance(self.store, LocalArtifactStore):
            return sorted(os.listdir(self.store.temp_directory))
        uploads = self.s3.list_multipart_uploads(Bucket=self.store.bucket).get("Uploads", [])
        staging = [k for k in self.object_keys() if k.startswith(".staging/")]
        return sorted([u["Key"] for u in uploads] + staging)

    def overwrite(self, key: str, data: bytes) -> None:
        """Replaces the stored bytes of a key behind the store's back."""
        if isinstance(self.store, LocalArtifactStore):
            path = self.store.directory / key
            path.chmod(0o644)
            path.write_bytes(data)
            return
        assert isinstance(self.store, S3ArtifactStore)
        self.s3.put_object(
            Bucket=self.store.bucket, Key=f"{self.store.root.prefix}/{key}", Body=data
        )


async def stream_of(blocks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """A list of blocks as the async stream the store consumes."""
    for block in blocks:
        yield block


async def read_all(store: ArtifactStore, uri: str, **options: Any) -> bytes:
    return b"".join([chunk async for chunk in store.open_stream(uri, **options)])


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ from position to position (and seed to seed)."""
    block = bytes((i * 7 + seed * 13 + i // 251) % 256 for i in range(4093))
    return (block * (size // len(block) + 1))[:size]
