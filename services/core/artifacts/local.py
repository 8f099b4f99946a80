"""The artifact store on a local (or mounted) file system, for ``file://`` roots.

Writes go to a temporary file in a sibling folder of the root (``<parent>/.<root>.tmp``,
on the same file system, so the final rename is atomic), are fsynced, and are renamed
into place only when the whole stream arrived and matched; the folder is then fsynced so
that the rename survives a crash. Temporary files nobody touched for ``stale_after_s``
(writers that crashed) are removed when the store opens. Content-addressed files are made
read-only (0444) to say they never change; named files are 0644.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

from aimass.core.artifacts.base import (
    IO_BLOCK_SIZE,
    ArtifactStore,
    Chunk,
    Digest,
    StoredObject,
    discard_temp,
    read_and_hash,
    rechunk,
    verify_sum,
    write_and_hash,
)
from aimass.core.artifacts.uris import (
    RootUri,
    content_key,
    key_of,
    parse_root_uri,
    sha256_of_key,
    uri_of,
    validate_named_key,
)
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound

TEMP_PREFIX = "upload-"
CONTENT_MODE = 0o444
NAMED_MODE = 0o644


class LocalArtifactStore(ArtifactStore):
    """Artifacts under a local folder, addressed by ``file://`` URIs.

    Opening the store creates the root and its temporary folder and removes stale
    temporary files (a few directory entries: done at startup, before serving).
    """

    def __init__(self, root: RootUri | str, *, stale_after_s: float = 3600.0) -> None:
        self.root = parse_root_uri(root) if isinstance(root, str) else root
        if self.root.scheme != "file" or self.root.path is None:
            raise InvalidArgument("artifact_root", f"{self.root.uri} is not a file:// root")
        self.directory = self.root.path
        self.temp_directory = self.directory.parent / f".{self.directory.name}.tmp"
        self.stale_after_s = stale_after_s
        self.directory.mkdir(parents=True, exist_ok=True)
        self.temp_directory.mkdir(parents=True, exist_ok=True)
        self._real_root = self.directory.resolve()
        if self.directory.stat().st_dev != self.temp_directory.stat().st_dev:
            # A rename across file systems is a copy: neither atomic nor cheap.
            raise FailedPrecondition(
                f"artifact_root: {self.directory} and its temporary folder "
                f"{self.temp_directory} are on different file systems; mount the parent "
                "folder instead, so that writes can be renamed into place atomically"
            )
        self._remove_stale_temps()

    # -- writing ---------------------------------------------------------------------

    async def put_stream(
        self,
        chunks: AsyncIterator[Chunk],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> StoredObject:
        digest = Digest(expected_sha256, expected_size)
        return await self._write(chunks, digest, content_key, content_addressed=True)

    async def put_named(
        self,
        relative_key: str,
        chunks: AsyncIterator[Chunk],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> StoredObject:
        validate_named_key(relative_key)
        digest = Digest(expected_sha256, expected_size)
        return await self._write(
            chunks, digest, lambda _sha256: relative_key, content_addressed=False
        )

    async def _write(
        self,
        chunks: AsyncIterator[Chunk],
        digest: Digest,
        key_for: Callable[[str], str],
        *,
        content_addressed: bool,
    ) -> StoredObject:
        handle, temp = await asyncio.to_thread(self._new_temp)
        try:
            async for block in rechunk(chunks, IO_BLOCK_SIZE):
                await asyncio.to_thread(write_and_hash, handle, block, digest)
            sha256 = digest.finish()
            key = key_for(sha256)
            await asyncio.to_thread(self._commit, handle, temp, key, content_addressed)
        except BaseException:
            # Synchronous on purpose: the cleanup must run even while the task is being
            # cancelled, and closing + unlinking one file is quick.
            discard_temp(handle, temp)
            raise
        return StoredObject(uri=uri_of(self.root, key), sha256=sha256, size=digest.size)

    def _new_temp(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.temp_directory)
        return os.fdopen(fd, "wb"), Path(name)

    def _commit(self, handle: BinaryIO, temp: Path, key: str, content_addressed: bool) -> None:
        """Moves a complete temporary file into place (blocking: runs in a thread)."""
        uri = uri_of(self.root, key)
        field = "uri" if content_addressed else "relative_key"
        path = self._path_of(key, uri, field)
        size = handle.tell()
        if content_addressed and _is_file_of_size(path, size):
            # Stored already. (A file of another size at the address is corrupt: the
            # fresh bytes replace it below.)
            discard_temp(handle, temp)
            return
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.chmod(temp, CONTENT_MODE if content_addressed else NAMED_MODE)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, path)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as err:
            raise InvalidArgument(
                field, f"{uri} collides with a folder or file of other objects"
            ) from err
        _fsync_directory(path.parent)

    # -- reading ---------------------------------------------------------------------

    async def _read(
        self, key: str, uri: str, offset: int, chunk_size: int, expected_sha256: str | None
    ) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self._open_for_read, key, uri, offset)
        try:
            digest = Digest() if expected_sha256 is not None else None
            while chunk := await asyncio.to_thread(read_and_hash, handle, chunk_size, digest):
                yield chunk
            if digest is not None:
                verify_sum(uri, expected_sha256, digest)
        finally:
            handle.close()

    def _open_for_read(self, key: str, uri: str, offset: int) -> BinaryIO:
        path = self._path_of(key, uri)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFound(f"{uri}: no such artifact") from err
        size = os.fstat(handle.fileno()).st_size
        if offset > size:
            handle.close()
            raise InvalidArgument("offset", f"{offset} is past the end of {uri} ({size} bytes)")
        handle.seek(offset)
        return handle

    # -- metadata --------------------------------------------------------------------

    async def exists(self, uri: str) -> bool:
        key = key_of(self.root, uri)
        return await asyncio.to_thread(lambda: self._path_of(key, uri).is_file())

    async def stat(self, uri: str) -> StoredObject:
        key = key_of(self.root, uri)
        size = await asyncio.to_thread(self._size_of, key, uri)
        sha256 = sha256_of_key(key)
        if sha256 is None:
            return await self.hash_object(uri)
        return StoredObject(uri=uri, sha256=sha256, size=size)

    def _size_of(self, key: str, uri: str) -> int:
        path = self._path_of(key, uri)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError) as err:
            raise NotFound(f"{uri}: no such artifact") from err
        if not path.is_file():
            raise NotFound(f"{uri}: no such artifact")
        return info.st_size

    async def delete(self, uri: str) -> None:
        key = key_of(self.root, uri)
        await asyncio.to_thread(self._unlink, key, uri)

    def _unlink(self, key: str, uri: str) -> None:
        path = self._path_of(key, uri)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise NotFound(f"{uri}: no such artifact") from err
        _fsync_directory(path.parent)

    async def clean_stale_uploads(self) -> int:
        return await asyncio.to_thread(self._remove_stale_temps)

    def _remove_stale_temps(self) -> int:
        """Removes temporary files untouched for stale_after_s; returns how many.

        A live writer touches its file at every block, so only dead ones go stale; the
        age test keeps other processes sharing the root from losing their uploads.
        """
        deadline = time.time() - self.stale_after_s
        removed = 0
        for entry in os.scandir(self.temp_directory):
            if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < deadline:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- paths -----------------------------------------------------------------------

    def _path_of(self, key: str, uri: str, field: str = "uri") -> Path:
        """The file of a checked key; refuses keys that resolve outside the root (links)."""
        path = self.directory / key
        if not Path(os.path.realpath(path)).is_relative_to(self._real_root):
            raise InvalidArgument(field, f"{uri} resolves outside the artifact store root")
        return path


def _is_file_of_size(path: Path, size: int) -> bool:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return path.is_file() and info.st_size == size


def _fsync_directory(path: Path) -> None:
    """Makes a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
