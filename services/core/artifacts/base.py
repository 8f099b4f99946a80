"""The artifact store interface, its result type, its integrity error and shared helpers.

Two kinds of objects live in a store:

- content-addressed objects, written by :meth:`ArtifactStore.put_stream` (and
  ``put_file``/``put_bytes``) under ``<root>/sha256/ab/cd/<hex>``: identical content is
  stored once, and every read from offset 0 is checked against the address;
- named objects, written by :meth:`ArtifactStore.put_named` under ``<root>/<key>``
  (reports, release bundles): the name matters, the write is still atomic, and reads are
  checked when the caller passes the sha256 that ``put_named`` returned.

Every write is atomic: the object appears only once the whole stream arrived and its
sum and size matched what the caller expected; otherwise nothing is left behind.

Errors (all :class:`~aimass.core.errors.AimassError`)::

    InvalidArgument   a bad URI or key ("uri", "relative_key"), a sum or size that
                      does not match ("sha256", "size"), a bad offset ("offset")
    NotFound          no object at the URI (the message names the URI)
    IntegrityError    stored bytes that do not match their address: DATA_LOSS
    FailedPrecondition / Unavailable   the storage itself is misconfigured or unreachable
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import grpc

from aimass.core.artifacts.uris import RootUri, check_sha256, key_of, sha256_of_key
from aimass.core.errors import AimassError, InvalidArgument

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = MiB
# Blocks handed to a worker thread at a time: big enough that thread hops cost little.
IO_BLOCK_SIZE = MiB

Chunk: TypeAlias = bytes | bytearray | memoryview


class IntegrityError(AimassError):
    """Stored bytes do not hash to the sha256 their URI (or the caller) names.

    Maps to DATA_LOSS: the object is corrupt at rest, retrying will not help, and an
    operator has to restore it. The message names the URI and both sums.
    """

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, uri: str, expected_sha256: str, actual_sha256: str) -> None:
        super().__init__(
            f"{uri}: stored content hashes to sha256 {actual_sha256}, "
            f"not {expected_sha256}: the object is corrupt"
        )
        self.uri = uri
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


@dataclass(frozen=True)
class StoredObject:
    """An object in the store: where it is, the sha256 of its bytes and their count."""

    uri: str
    sha256: str
    size: int


class Digest:
    """Running sha256 and size of a stream, checked against what the caller expected.

    ``update`` runs in worker threads (hashlib releases the GIL on large blocks), one
    call at a time, in stream order.
    """

    def __init__(
        self, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> None:
        if expected_sha256 is not None:
            check_sha256(expected_sha256, "sha256")
        if expected_size is not None and (not isinstance(expected_size, int) or expected_size < 0):
            raise InvalidArgument("size", f"must be a non-negative integer (got {expected_size!r})")
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, data: Chunk) -> None:
        """Adds a block; fails as soon as the stream outgrows the expected size."""
        self._hash.update(data)
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise InvalidArgument(
                "size", f"the stream is longer than the expected {self.expected_size} bytes"
            )

    def hexdigest(self) -> str:
        """The sha256 of what arrived so far."""
        return self._hash.hexdigest()

    def finish(self) -> str:
        """The sha256 of the whole stream, once size and sum matched the expectations."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise InvalidArgument(
                "size", f"the stream held {self.size} bytes, expected {self.expected_size}"
            )
        actual = self.hexdigest()
        if self.expected_sha256 is not None and actual != self.expected_sha256:
            raise InvalidArgument(
                "sha256", f"the stream hashes to {actual}, expected {self.expected_sha256}"
            )
        return actual


async def rechunk(chunks: AsyncIterator[Chunk], size: int) -> AsyncIterator[bytearray]:
    """Regroups a stream into blocks of exactly ``size`` bytes (the last may be shorter).

    Each incoming byte is copied once, into the block being filled, and a full block is
    handed over as is (not copied again): memory stays near one block plus one incoming
    chunk, whatever the stream holds. The consumer owns each block it receives.
    """
    # The first block grows as bytes come (the stream may be small); once one block was
    # full the stream is large, and each next block is allocated whole when its first
    # byte comes, so that no growing buffer is copied (a realloc holds two copies).
    block: bytearray | None = bytearray()
    filled = 0
    async for chunk in chunks:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidArgument("chunks", f"must yield bytes, not {type(chunk).__name__}")
        with memoryview(chunk) as view, view.cast("B") as data:
            start = 0
            while start < len(data):
                count = min(size - filled, len(data) - start)
                if block is None:
                    block = bytearray(size)
                    block[:count] = data[start : start + count]
                elif filled + count <= len(block):
                    block[filled : filled + count] = data[start : start + count]
                else:
                    block += data[start : start + count]
                filled += count
                start += count
                if filled == size:
                    yield block
                    block, filled = None, 0
    if block is not None and filled:
        del block[filled:]
        yield block


async def iterate_bytes(data: Chunk, block_size: int = IO_BLOCK_SIZE) -> AsyncIterator[bytes]:
    """A bytes-like value as a stream of blocks (no copy of the whole value)."""
    with memoryview(data) as view:
        for start in range(0, len(view), block_size):
            yield bytes(view[start : start + block_size])


async def iterate_file(path: Path, block_size: int = IO_BLOCK_SIZE) -> AsyncIterator[bytes]:
    """A local file as a stream of blocks, read in worker threads."""
    try:
        handle = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError as err:
        raise InvalidArgument("path", f"{path} does not exist") from err
    except IsADirectoryError as err:
        raise InvalidArgument("path", f"{path} is a folder, not a file") from err
    try:
        while block := await asyncio.to_thread(handle.read, block_size):
            yield block
    finally:
        handle.close()


def check_read_args(offset: int, chunk_size: int) -> None:
    """Refuses offsets and chunk sizes no backend can serve."""
    if not isinstance(offset, int) or offset < 0:
        raise InvalidArgument("offset", f"must be a non-negative integer (got {offset!r})")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidArgument("chunk_size", f"must be a positive integer (got {chunk_size!r})")


class ArtifactStore(abc.ABC):
    """Bytes by URI under one root (``file://`` or ``s3://``), written atomically.

    All methods are coroutines (or async iterators) and do their blocking file and
    network work in worker threads, never on the event loop.
    """

    root: RootUri

    @property
    def root_uri(self) -> str:
        """The canonical root URI every object URI of this store starts with."""
        return self.root.uri

    # -- writing ---------------------------------------------------------------------

    @abc.abstractmethod
    async def put_stream(
        self,
        chunks: AsyncIterator[Chunk],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> StoredObject:
        """Stores a stream under its sha256 and returns where it went.

        The object appears only once the whole stream arrived and matched
        ``expected_sha256``/``expected_size`` when given; a mismatch raises
        InvalidArgument ("sha256" or "size") and an error or cancellation of the stream
        leaves nothing behind. Content already stored is not stored twice.
        """

    @abc.abstractmethod
    async def put_named(
        self,
        relative_key: str,
        chunks: AsyncIterator[Chunk],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> StoredObject:
        """Stores a stream under ``<root>/<relative_key>``, atomically replacing any
        object of that name, and returns its URI, sha256 and size.

        ``relative_key`` must be a safe relative key outside the reserved ``sha256/``
        and dot-prefixed namespaces (InvalidArgument "relative_key" otherwise).
        """

    async def put_file(
        self, path: str | os.PathLike[str], *, expected_sha256: str | None = None
    ) -> StoredObject:
        """Stores a local file by content, streamed (never read whole into memory)."""
        return await self.put_stream(iterate_file(Path(path)), expected_sha256=expected_sha256)

    async def put_bytes(self, data: Chunk, *, expected_sha256: str | None = None) -> StoredObject:
        """Stores a bytes-like value by content."""
        return await self.put_stream(
            iterate_bytes(data), expected_sha256=expected_sha256, expected_size=len(data)
        )

    # -- reading ---------------------------------------------------------------------

    def open_stream(
        self,
        uri: str,
        *,
        offset: int = 0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        expected_sha256: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Streams an object's bytes from ``offset`` in chunks of at most ``chunk_size``.

        A bad URI or offset raises here, at once; a missing object raises NotFound when
        iteration starts. Read from offset 0, the content is hashed as it streams and
        checked against its address (or ``expected_sha256`` for named objects): the
        last step of the iteration raises IntegrityError when it does not match, so a
        consumer must treat bytes it got as suspect until the iteration ended cleanly
        (``get_file`` does). Close the iterator early with ``aclose()``
        (``contextlib.aclosing``) to release the file or connection at once.
        """
        check_read_args(offset, chunk_size)
        key = key_of(self.root, uri)
        expected = sha256_of_key(key)
        if expected_sha256 is not None:
            check_sha256(expected_sha256, "expected_sha256")
            if expected is not None and expected != expected_sha256:
                raise InvalidArgument(
                    "expected_sha256", f"{expected_sha256} contradicts the address of {uri}"
                )
            expected = expected_sha256
        return self._read(key, uri, offset, chunk_size, expected if offset == 0 else None)

    @abc.abstractmethod
    def _read(
        self, key: str, uri: str, offset: int, chunk_size: int, expected_sha256: str | None
    ) -> AsyncIterator[bytes]:
        """Streams a checked key; verifies the sum at the end when one is given."""

    async def get_file(
        self,
        uri: str,
        dest_path: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
    ) -> StoredObject:
        """Downloads an object to ``dest_path``, streamed and verified.

        The bytes go to a temporary file beside ``dest_path`` that is renamed into place
        only once the stream ended and its sum matched; on any error nothing is left at
        ``dest_path`` (an existing file there is replaced only on success).
        """
        dest = Path(dest_path)
        key = key_of(self.root, uri)
        known_sha256 = expected_sha256 or sha256_of_key(key)
        stream = self.open_stream(uri, expected_sha256=expected_sha256)
        # open_stream verifies a known sum already; hash here only when none is known.
        digest = Digest() if known_sha256 is None else None
        size = 0
        handle, temp = await asyncio.to_thread(_open_temp_beside, dest)
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    await asyncio.to_thread(write_and_hash, handle, chunk, digest)
                    size += len(chunk)
            await asyncio.to_thread(_commit_download, handle, temp, dest)
        except BaseException:
            # Synchronous on purpose: the cleanup must run even while the task is
            # being cancelled, and closing + unlinking one file is quick.
            discard_temp(handle, temp)
            raise
        sha256 = known_sha256 if digest is None else digest.hexdigest()
        return StoredObject(uri=uri, sha256=sha256, size=size)

    # -- metadata --------------------------------------------------------------------

    @abc.abstractmethod
    async def exists(self, uri: str) -> bool:
        """Whether an object is stored at ``uri`` (a bad URI still raises)."""

    @abc.abstractmethod
    async def stat(self, uri: str) -> StoredObject:
        """URI, sha256 and size of an object; NotFound when it is missing.

        Cheap for content-addressed objects (the sum is their address; the bytes are
        not re-read, so corruption shows only on read). For a named object whose sum
        the backend did not record, the object is read and hashed: O(size).
        """

    @abc.abstractmethod
    async def delete(self, uri: str) -> None:
        """Removes an object; NotFound when it is missing.

        Content-addressed objects are shared by everything that stored the same bytes:
        deciding that none of them needs it any more is the caller's job.
        """

    @abc.abstractmethod
    async def clean_stale_uploads(self) -> int:
        """Removes leftovers of uploads that died (crashed writers); returns how many."""

    async def hash_object(self, uri: str) -> StoredObject:
        """Reads an object whole and returns its actual sum and size (no verification)."""
        key = key_of(self.root, uri)
        digest = Digest()
        stream = self._read(key, uri, 0, IO_BLOCK_SIZE, None)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                await asyncio.to_thread(digest.update, chunk)
        return StoredObject(uri=uri, sha256=digest.hexdigest(), size=digest.size)


def verify_sum(uri: str, expected_sha256: str | None, digest: Digest) -> None:
    """Raises IntegrityError when a stream read whole does not hash to what it should."""
    if expected_sha256 is not None:
        actual = digest.hexdigest()
        if actual != expected_sha256:
            raise IntegrityError(uri, expected_sha256, actual)


def _open_temp_beside(dest: Path) -> tuple[BinaryIO, Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    return os.fdopen(fd, "wb"), Path(name)


def write_and_hash(handle: BinaryIO, chunk: bytes, digest: Digest | None) -> None:
    """Appends a block to a file and to a digest (blocking: runs in a thread)."""
    handle.write(chunk)
    if digest is not None:
        digest.update(chunk)


def _commit_download(handle: BinaryIO, temp: Path, dest: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(temp, dest)


def discard_temp(handle: BinaryIO, temp: Path) -> None:
    """Closes and removes a temporary file that will not be committed."""
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


def read_and_hash(source: Any, size: int, digest: Digest | None) -> bytes:
    """Reads up to ``size`` bytes from a file or response body and adds them to a digest
    (blocking: runs in a thread)."""
    chunk = source.read(size)
    if digest is not None and chunk:
        digest.update(chunk)
    return chunk
