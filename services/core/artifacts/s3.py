"""The artifact store on S3 or an S3-compatible server (MinIO, moto), for ``s3://`` roots.

Writes: a stream that fits in one part (``S3Settings.part_size_mb``) is hashed and sent
with one PutObject. A longer one goes up as a multipart upload, part by part, one part
in flight while the next is received, so memory stays near two parts whatever the size;
the object appears only on CompleteMultipartUpload, and any error or cancellation aborts
the upload, so no partial object or orphan upload remains. A content-addressed key is
known only once the whole stream is hashed: with ``expected_sha256`` the upload goes
straight to its address and is completed only if the sum matched; without it the upload
goes to a staging key (``<prefix>/.staging/<uuid>``) and is copied server-side to its
address (CopyObject, or UploadPartCopy above 5 GiB), then the staging object is removed.

Reads: one GetObject per stream (with a Range header from ``offset``), its body read
chunk by chunk in worker threads.

Leftovers of crashed writers (multipart uploads begun, staging objects) older than
``stale_after_s`` are removed by :meth:`S3ArtifactStore.clean_stale_uploads`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError

from aimass.core.artifacts.base import (
    ArtifactStore,
    Chunk,
    Digest,
    MiB,
    StoredObject,
    read_and_hash,
    rechunk,
    verify_sum,
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
from aimass.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aimass.core.settings import S3Settings

log = logging.getLogger(__name__)
_session_lock = threading.Lock()
_shared_session: boto3.session.Session | None = None

GiB = 1024 * MiB
MAX_PARTS = 10_000
MAX_PART_SIZE = 5 * GiB
STAGING_PREFIX = ".staging"
SHA256_METADATA = "sha256"
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_REFUSED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "503", "500"}


def make_s3_client(settings: S3Settings) -> Any:
    """A boto3 S3 client from S3Settings (endpoint, region, credentials; else boto3's chain).

    Path-style addressing when an endpoint is set: MinIO and moto serve buckets by path.
    """
    config = Config(
        region_name=settings.region,
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=16,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    global _shared_session
    # One boto3 session for all stores: it caches the parsed service model, which takes
    # a few hundred ms to load. Building clients from one session is not thread-safe,
    # hence the lock; the clients themselves are.
    with _session_lock:
        if _shared_session is None:
            _shared_session = boto3.session.Session()
        return _shared_session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=config,
        )


@contextlib.contextmanager
def map_s3_errors(uri: str) -> Iterator[None]:
    """Turns boto3 errors into aimass errors that name the URI."""
    try:
        yield
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES:
            raise NotFound(f"{uri}: no such artifact") from err
        if code == "NoSuchBucket":
            raise FailedPrecondition(f"{uri}: the artifact store's bucket does not exist") from err
        if code in _REFUSED_CODES:
            raise FailedPrecondition(
                f"{uri}: S3 refused the artifact store's credentials ({code})"
            ) from err
        if code in _BUSY_CODES:
            raise Unavailable(f"{uri}: S3 is unavailable ({code}); retry later") from err
        raise
    except (BotoConnectionError, ResponseStreamingError) as err:
        raise Unavailable(f"{uri}: cannot reach S3: {err}") from err


class S3ArtifactStore(ArtifactStore):
    """Artifacts under ``s3://bucket/prefix``."""

    # Largest object one CopyObject may copy; above it the copy is multipart.
    max_copy_object_size: int = 5 * GiB
    # Part size of a multipart server-side copy (S3 allows 5 MiB to 5 GiB).
    copy_part_size: int = 512 * MiB

    def __init__(
        self,
        root: RootUri | str,
        settings: S3Settings,
        *,
        client: Any = None,
        stale_after_s: float = 24 * 3600.0,
    ) -> None:
        self.root = parse_root_uri(root) if isinstance(root, str) else root
        if self.root.scheme != "s3":
            raise InvalidArgument("artifact_root", f"{self.root.uri} is not an s3:// root")
        self.bucket = self.root.bucket
        self.part_size = settings.part_size_mb * MiB
        self.client = client if client is not None else make_s3_client(settings)
        self.stale_after_s = stale_after_s

    # -- writing ---------------------------------------------------------------------

    async def put_stream(
        self,
        chunks: AsyncIterator[Chunk],
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> StoredObject:
        digest = Digest(expected_sha256, expected_size)
        part_size = self._part_size_for(expected_size)
        parts = rechunk(chunks, part_size)
        async with contextlib.aclosing(parts):
            first = await anext(parts, b"")
            if len(first) < part_size:
                # rechunk yields full parts until the last: the stream ended already.
                await asyncio.to_thread(digest.update, first)
                key = content_key(digest.finish())
                await self._put_small(key, first, digest, replace=False)
            else:
                # The upload owns the first part from here: no frame may keep it alive.
                blocks = _chain_first([first], parts)
                del first
                if expected_sha256 is None:
                    key = await self._upload_via_staging(blocks, part_size, digest)
                else:
                    key = content_key(expected_sha256)
                    await self._upload_to_address(key, blocks, part_size, digest, expected_size)
        return StoredObject(uri=uri_of(self.root, key), sha256=digest.hexdigest(), size=digest.size)

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
        part_size = self._part_size_for(expected_size)
        parts = rechunk(chunks, part_size)
        async with contextlib.aclosing(parts):
            first = await anext(parts, b"")
            if len(first) < part_size:
                await asyncio.to_thread(digest.update, first)
                digest.finish()
                await self._put_small(relative_key, first, digest, replace=True)
            else:
                blocks = _chain_first([first], parts)
                del first
                await self._upload_in_parts(
                    relative_key, blocks, part_size, digest, expected_sha256
                )
        return StoredObject(
            uri=uri_of(self.root, relative_key), sha256=digest.hexdigest(), size=digest.size
        )

    def _part_size_for(self, expected_size: int | None) -> int:
        """The configured part size, grown when a known size would need over 10,000 parts."""
        if not expected_size:
            return self.part_size
        needed = math.ceil(math.ceil(expected_size / MAX_PARTS) / MiB) * MiB
        return min(max(self.part_size, needed), MAX_PART_SIZE)

    async def _put_small(self, key: str, data: Chunk, digest: Digest, *, replace: bool) -> None:
        """One PutObject of a complete, checked stream (skipped when stored already)."""
        uri = uri_of(self.root, key)
        if not replace and await self._size_of(key, uri) == len(data):
            return
        await self._call(
            uri,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._object_key(key),
            Body=data,
            Metadata={SHA256_METADATA: digest.hexdigest()},
        )

    async def _upload_to_address(
        self,
        key: str,
        blocks: AsyncIterator[Chunk],
        part_size: int,
        digest: Digest,
        expected_size: int | None,
    ) -> None:
        """Uploads straight to a known content address (completed only if the sum matches)."""
        uri = uri_of(self.root, key)
        if expected_size is not None and await self._size_of(key, uri) == expected_size:
            # Stored already: only check that the stream is what it claims to be.
            await _drain_into(digest, blocks)
            digest.finish()
            return
        await self._upload_in_parts(key, blocks, part_size, digest, digest.expected_sha256)

    async def _upload_via_staging(
        self, blocks: AsyncIterator[Chunk], part_size: int, digest: Digest
    ) -> str:
        """Uploads to a staging key, then copies it to its address once the sum is known."""
        staging = f"{STAGING_PREFIX}/{uuid.uuid4().hex}"
        await self._upload_in_parts(staging, blocks, part_size, digest, None)
        try:
            sha256 = digest.hexdigest()
            key = content_key(sha256)
            if await self._size_of(key, uri_of(self.root, key)) != digest.size:
                await self._copy(staging, key, digest.size, sha256)
        finally:
            # Shielded: a cancelled put must still remove its staging object.
            await asyncio.shield(self._delete_quietly(staging))
        return key

    async def _upload_in_parts(
        self,
        key: str,
        blocks: AsyncIterator[Chunk],
        part_size: int,
        digest: Digest,
        known_sha256: str | None,
    ) -> None:
        """A multipart upload, one part in flight while the next one is received.

        The upload is completed only after the digest matched the expectations; any
        error or cancellation aborts it.
        """
        uri = uri_of(self.root, key)
        object_key = self._object_key(key)
        extra = {"Metadata": {SHA256_METADATA: known_sha256}} if known_sha256 else {}
        created = await self._call(
            uri, self.client.create_multipart_upload, Bucket=self.bucket, Key=object_key, **extra
        )
        upload_id = created["UploadId"]
        done: list[dict[str, Any]] = []
        in_flight: asyncio.Future[dict[str, Any]] | None = None
        try:
            number = 0
            async for part in blocks:
                number += 1
                if number > MAX_PARTS:
                    raise InvalidArgument(
                        "size",
                        f"the stream needs more than {MAX_PARTS} parts of {part_size} bytes; "
                        "pass expected_size so that the part size can grow",
                    )
                if in_flight is not None:
                    done.append(await in_flight)
                in_flight = asyncio.ensure_future(
                    asyncio.to_thread(
                        self._upload_part, uri, object_key, upload_id, number, part, digest
                    )
                )
            if in_flight is not None:
                done.append(await in_flight)
                in_flight = None
            digest.finish()
            await self._call(
                uri,
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            await asyncio.shield(self._abort(uri, object_key, upload_id, in_flight))
            raise

    def _upload_part(
        self, uri: str, object_key: str, upload_id: str, number: int, data: Chunk, digest: Digest
    ) -> dict[str, Any]:
        """Hashes and sends one part (blocking: runs in a thread, one at a time)."""
        digest.update(data)
        with map_s3_errors(uri):
            response = self.client.upload_part(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id, PartNumber=number, Body=data
            )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def _abort(
        self,
        uri: str,
        object_key: str,
        upload_id: str,
        in_flight: asyncio.Future[dict[str, Any]] | None,
    ) -> None:
        # A part still being sent could land after the abort and keep the upload alive.
        if in_flight is not None:
            with contextlib.suppress(BaseException):
                await in_flight
        try:
            await asyncio.to_thread(
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
            )
        except Exception:
            log.warning(
                "could not abort the multipart upload %s of %s", upload_id, uri, exc_info=True
            )

    async def _copy(self, source: str, key: str, size: int, sha256: str) -> None:
        """Server-side copy of a staging object to its address (multipart when huge)."""
        uri = uri_of(self.root, key)
        copy_source = {"Bucket": self.bucket, "Key": self._object_key(source)}
        if size <= self.max_copy_object_size:
            await self._call(
                uri,
                self.client.copy_object,
                Bucket=self.bucket,
                Key=self._object_key(key),
                CopySource=copy_source,
                MetadataDirective="REPLACE",
                Metadata={SHA256_METADATA: sha256},
            )
            return
        await self._copy_in_parts(uri, copy_source, key, size, sha256)

    async def _copy_in_parts(
        self, uri: str, copy_source: dict[str, str], key: str, size: int, sha256: str
    ) -> None:
        object_key = self._object_key(key)
        part_size = max(self.copy_part_size, math.ceil(size / MAX_PARTS))
        created = await self._call(
            uri,
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=object_key,
            Metadata={SHA256_METADATA: sha256},
        )
        upload_id = created["UploadId"]
        try:
            done = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                end = min(start + part_size, size) - 1
                response = await self._call(
                    uri,
                    self.client.upload_part_copy,
                    Bucket=self.bucket,
                    Key=object_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=copy_source,
                    CopySourceRange=f"bytes={start}-{end}",
                )
                done.append({"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]})
            await self._call(
                uri,
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            await asyncio.shield(self._abort(uri, object_key, upload_id, None))
            raise

    # -- reading ---------------------------------------------------------------------

    async def _read(
        self, key: str, uri: str, offset: int, chunk_size: int, expected_sha256: str | None
    ) -> AsyncIterator[bytes]:
        body = await self._get_body(key, uri, offset)
        if body is None:
            return
        try:
            digest = Digest() if expected_sha256 is not None else None
            while True:
                with map_s3_errors(uri):
                    chunk = await asyncio.to_thread(read_and_hash, body, chunk_size, digest)
                if not chunk:
                    break
                yield chunk
            if digest is not None:
                verify_sum(uri, expected_sha256, digest)
        finally:
            body.close()

    async def _get_body(self, key: str, uri: str, offset: int) -> Any:
        """The streaming body from ``offset``; None when offset is exactly the end."""
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self._object_key(key)}
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            response = await self._call(uri, self.client.get_object, **request)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            # S3 refuses a range starting at the end; that is an empty read, not an error.
            size = await self._size_of(key, uri)
            if size is None:
                raise NotFound(f"{uri}: no such artifact") from err
            if offset == size:
                return None
            raise InvalidArgument(
                "offset", f"{offset} is past the end of {uri} ({size} bytes)"
            ) from err
        return response["Body"]

    # -- metadata --------------------------------------------------------------------

    async def exists(self, uri: str) -> bool:
        key = key_of(self.root, uri)
        return await self._size_of(key, uri) is not None

    async def stat(self, uri: str) -> StoredObject:
        key = key_of(self.root, uri)
        head = await self._head(key, uri)
        if head is None:
            raise NotFound(f"{uri}: no such artifact")
        sha256 = sha256_of_key(key) or head.get("Metadata", {}).get(SHA256_METADATA)
        if sha256 is None:
            # A named object sent in parts: its sum was not known when it was created.
            return await self.hash_object(uri)
        return StoredObject(uri=uri, sha256=sha256, size=int(head["ContentLength"]))

    async def delete(self, uri: str) -> None:
        key = key_of(self.root, uri)
        if await self._head(key, uri) is None:
            raise NotFound(f"{uri}: no such artifact")
        await self._call(
            uri, self.client.delete_object, Bucket=self.bucket, Key=self._object_key(key)
        )

    async def clean_stale_uploads(self) -> int:
        """Aborts multipart uploads begun and removes staging objects written more than
        ``stale_after_s`` ago under this store's prefix; returns how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.stale_after_s)
        return await asyncio.to_thread(self._remove_stale, cutoff)

    def _remove_stale(self, cutoff: datetime) -> int:
        removed = 0
        prefix = self._object_key("") if self.root.prefix else ""
        with map_s3_errors(self.root.uri):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed += 1
            staging = self._object_key(STAGING_PREFIX + "/")
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=staging):
                for item in page.get("Contents", []):
                    if item["LastModified"] < cutoff:
                        self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                        removed += 1
        return removed

    # -- helpers ---------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        return f"{self.root.prefix}/{key}" if self.root.prefix else key

    async def _call(self, uri: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        """One blocking boto3 call in a worker thread, its errors mapped."""
        with map_s3_errors(uri):
            return await asyncio.to_thread(method, **kwargs)

    async def _head(self, key: str, uri: str) -> dict[str, Any] | None:
        try:
            return await self._call(
                uri, self.client.head_object, Bucket=self.bucket, Key=self._object_key(key)
            )
        except NotFound:
            return None

    async def _size_of(self, key: str, uri: str) -> int | None:
        head = await self._head(key, uri)
        return None if head is None else int(head["ContentLength"])

    async def _delete_quietly(self, key: str) -> None:
        uri = uri_of(self.root, key)
        try:
            await self._call(
                uri, self.client.delete_object, Bucket=self.bucket, Key=self._object_key(key)
            )
        except Exception:
            log.warning("could not delete the staging object %s", uri, exc_info=True)


async def _chain_first(holder: list[Chunk], rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """The one block in ``holder``, then ``rest``. The block is popped, not kept: a part
    is large, and must be freed as soon as its upload is done."""
    yield holder.pop()
    async for block in rest:
        yield block


async def _drain_into(digest: Digest, blocks: AsyncIterator[bytes]) -> None:
    async for block in blocks:
        await asyncio.to_thread(digest.update, block)
