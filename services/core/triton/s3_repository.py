"""A Triton model repository on S3 (or MinIO, moto): aimass uploads entries, Triton reads them.

Triton reads ``s3://`` repositories itself (the tritonserver of the nvidia-pytriton
wheel too: it localizes an entry into a temporary folder when the entry is
loaded), so aimass only has to put the entry there. Two spellings of the
repository are accepted, as Triton accepts them:

- ``s3://bucket/prefix``: AWS; aimass writes with the stack's ``S3Settings``
  (its endpoint, region and credentials, else boto3's chain);
- ``s3://host:port/bucket/prefix`` (optionally ``s3://http://host:port/...`` or
  ``s3://https://host:port/...``): an S3-compatible server at that address, the
  spelling Triton needs for a custom endpoint (plain HTTP unless ``https://``).

Triton finds its credentials in ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
``AWS_DEFAULT_REGION`` of its own environment.

An entry has the layout of a local one (:class:`~aimass.core.triton.repository.
ModelRepository` builds it in a temporary folder, then it is uploaded).
``aimass.json`` goes up last, so an entry carrying the marker is complete, and a
failed upload removes what it sent: no half entry stays behind. In explicit
model-control mode Triton reads an entry only when aimass asks it to load it,
i.e. after the upload finished.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass.core.artifacts.s3 import make_s3_client, map_s3_errors
from aimass.core.artifacts.uris import parse_root_uri
from aimass.core.errors import InvalidArgument, NotFound
from aimass.core.settings import S3Settings
from aimass.core.triton.repository import (
    MARKER,
    Backend,
    ModelRepository,
    ServingOptions,
    Signature,
)

# Triton's own pattern for an S3 path with an endpoint (core/src/filesystem/s3.h).
_TRITON_ENDPOINT = re.compile(
    r"s3://(http://|https://|)([0-9a-zA-Z\-.]+):([0-9]+)/([0-9a-z.\-]+)((/[0-9a-zA-Z.\-_]+)*)/?"
)
_SEGMENT = re.compile(r"[0-9a-zA-Z.\-_]+")
# Triton refuses to start on an S3 prefix with no object under it ("repository path is
# not a valid directory"): this object keeps the prefix alive when no entry is left.
PLACEHOLDER = ".aimass-repository"


@dataclass(frozen=True)
class S3Location:
    """Where an S3 model repository is: endpoint (None: the settings' or AWS), bucket, prefix."""

    uri: str
    bucket: str
    prefix: str
    endpoint_url: str | None = None

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def parse_s3_repository(uri: str, field: str = "model_repository_uri") -> S3Location:
    """Parses ``s3://bucket/prefix`` or Triton's ``s3://[http(s)://]host:port/bucket/prefix``."""
    match = _TRITON_ENDPOINT.fullmatch(uri)
    if match is not None:
        scheme = "https" if match.group(1) == "https://" else "http"
        prefix = match.group(5).strip("/")
        return S3Location(
            uri=uri.rstrip("/"),
            bucket=match.group(4),
            prefix=prefix,
            endpoint_url=f"{scheme}://{match.group(2)}:{match.group(3)}",
        )
    if re.match(r"s3://(https?://)?[^/]*:", uri):
        raise InvalidArgument(
            field,
            f"{uri!r} is not s3://[http(s)://]host:port/bucket/path as Triton reads it (bucket"
            " of lowercase letters, digits, dots and hyphens; path segments of letters, digits"
            " and . - _)",
        )
    root = parse_root_uri(uri, field)
    if root.scheme != "s3":
        raise InvalidArgument(field, f"{uri!r} is not an s3:// URI")
    bad = [s for s in root.prefix.split("/") if root.prefix and not _SEGMENT.fullmatch(s)]
    if bad:
        raise InvalidArgument(
            field, f"path segment {bad[0]!r} of {uri!r} has characters Triton does not read"
        )
    return S3Location(uri=root.uri, bucket=root.bucket, prefix=root.prefix)


class S3ModelRepository:
    """The S3 counterpart of :class:`ModelRepository`: write, marker, managed, remove."""

    def __init__(
        self,
        uri: str,
        backend: Backend,
        settings: S3Settings | None = None,
        *,
        client: Any = None,
    ) -> None:
        self.location = parse_s3_repository(uri)
        self.backend = backend
        settings = settings or S3Settings()
        if self.location.endpoint_url is not None:
            settings = settings.model_copy(update={"endpoint_url": self.location.endpoint_url})
        self.client = client if client is not None else make_s3_client(settings)
        self._placed = False

    @property
    def uri(self) -> str:
        return self.location.uri

    def write(
        self,
        name: str,
        model_file: Path,
        signature: Signature,
        options: ServingOptions,
        marker: dict[str, Any],
    ) -> int:
        """Uploads (or replaces) the entry ``name``; returns the bytes of its model files."""
        with tempfile.TemporaryDirectory(prefix="aimass-entry-") as scratch:
            local = ModelRepository(scratch, self.backend)
            size = local.write(name, model_file, signature, options, marker)
            files = sorted(
                (p.relative_to(local.path_of(name)).as_posix(), p)
                for p in local.path_of(name).rglob("*")
                if p.is_file()
            )
            # The marker last: an entry that carries it is whole.
            files.sort(key=lambda item: item[0] == MARKER)
            with map_s3_errors(self.uri):
                self._keep_prefix()
                before = set(self._keys(name))
            sent: list[str] = []
            with map_s3_errors(self.uri):
                try:
                    for relative, path in files:
                        key = self.location.key(name, relative)
                        self.client.upload_file(str(path), self.location.bucket, key)
                        sent.append(key)
                except BaseException:
                    # Half an entry must not stay: what was there is gone either way.
                    with contextlib.suppress(Exception):
                        self._delete(sorted(before | set(sent)))
                    raise
                # Files of an older entry that the new one does not have (another backend).
                self._delete(sorted(before - set(sent)))
        return size

    def marker(self, name: str) -> dict[str, Any] | None:
        """The aimass marker of an entry; None when the entry is absent or not ours."""
        try:
            with map_s3_errors(self.uri):
                body = self.client.get_object(
                    Bucket=self.location.bucket, Key=self.location.key(name, MARKER)
                )["Body"].read()
        except NotFound:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def managed(self) -> dict[str, dict[str, Any]]:
        """Every entry written by aimass, by name."""
        prefix = self.location.key("") + "/" if self.location.prefix else ""
        entries = {}
        with map_s3_errors(self.uri):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"
            )
            names = [
                common["Prefix"][len(prefix) :].rstrip("/")
                for page in pages
                for common in page.get("CommonPrefixes", [])
            ]
        for name in names:
            if name and not name.startswith("."):
                marker = self.marker(name)
                if marker is not None:
                    entries[name] = marker
        return entries

    def remove(self, name: str) -> None:
        """Deletes an entry aimass wrote; entries of others are left alone."""
        if self.marker(name) is not None:
            with map_s3_errors(self.uri):
                self._delete(self._keys(name))

    def _keep_prefix(self) -> None:
        """Puts the placeholder once, so that a Triton (re)starting finds the prefix."""
        if not self._placed:
            self.client.put_object(
                Bucket=self.location.bucket,
                Key=self.location.key(PLACEHOLDER),
                Body=b"model repository written by aimass\n",
            )
            self._placed = True

    def _keys(self, name: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=self.location.key(name) + "/"
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(
                Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True}
            )


def open_model_repository(
    uri: str, backend: Backend, s3: S3Settings | None = None
) -> ModelRepository | S3ModelRepository | None:
    """The repository a server's ``model_repository_uri`` names: a folder, s3://, or none."""
    if not uri:
        return None
    if uri.startswith("s3://"):
        return S3ModelRepository(uri, backend, s3)
    return ModelRepository(uri.removeprefix("file://"), backend)
