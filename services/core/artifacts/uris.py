"""Artifact URIs: parsing store roots and checking object keys before they touch storage.

An artifact URI is the store's root URI, a slash, and a key::

    file:///var/lib/aimass/artifacts/sha256/ab/cd/abcd…      (content-addressed)
    s3://bucket/prefix/reports/eval-7/report.html           (named)

Keys are checked, never decoded: a key is a sequence of non-empty segments of letters,
digits and ``. _ - = + @ , ~``, so ``..`` segments, absolute paths, percent-encoding,
backslashes, NUL and other control characters are refused with an
:class:`~aimass.core.errors.InvalidArgument` that names the field and the problem,
before any file or bucket is touched. The local backend also checks that the resolved
path stays under its root, so a symbolic link cannot lead outside it either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from aimass.core.errors import InvalidArgument

SUPPORTED_SCHEMES = ("file", "s3")
# Every content-addressed key starts with this segment; named keys may not.
CONTENT_PREFIX = "sha256"
MAX_KEY_LENGTH = 1024

_SEGMENT = re.compile(r"[A-Za-z0-9._\-=+@,~]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_KEY = re.compile(r"sha256/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})")
# S3 bucket naming rules (the subset that matters for addressing).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class RootUri:
    """A parsed artifact store root.

    ``uri`` is the canonical spelling every object URI of the store starts with
    (no trailing slash). For ``file`` roots ``path`` is the absolute folder; for ``s3``
    roots ``bucket`` and ``prefix`` (``""`` or ``a/b``, no slashes at either end).
    """

    scheme: Literal["file", "s3"]
    uri: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""


def scheme_of(uri: str, field: str = "uri") -> str:
    """The scheme of a URI, refused unless it is one the artifact store serves."""
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument(field, "must be a non-empty file:// or s3:// URI")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise InvalidArgument(field, f"{uri!r} is not a URI: expected file://… or s3://…")
    if scheme not in SUPPORTED_SCHEMES:
        raise InvalidArgument(
            field, f"scheme {scheme!r} is not supported: use file:// or s3:// (got {uri!r})"
        )
    return scheme


def parse_root_uri(root_uri: str, field: str = "artifact_root") -> RootUri:
    """Parses a store root (``file:///abs/folder`` or ``s3://bucket[/prefix]``)."""
    scheme = scheme_of(root_uri, field)
    if "\x00" in root_uri or "\\" in root_uri:
        raise InvalidArgument(field, "must not contain NUL or backslashes")
    parts = urlsplit(root_uri)
    if parts.query or parts.fragment:
        raise InvalidArgument(field, f"must not have a query or fragment (got {root_uri!r})")
    if scheme == "file":
        return _parse_file_root(root_uri, parts.netloc, parts.path, field)
    return _parse_s3_root(root_uri, parts.netloc, parts.path, field)


def _parse_file_root(root_uri: str, host: str, raw_path: str, field: str) -> RootUri:
    if host not in ("", "localhost"):
        raise InvalidArgument(
            field,
            f"file URI must be file:///absolute/path, not on host {host!r} (got {root_uri!r})",
        )
    # The root is configuration, not a request: percent-decoding it is safe and lets
    # Path.as_uri() spellings (spaces become %20) work.
    path = Path(unquote(raw_path))
    if not path.is_absolute() or str(path) == "/":
        raise InvalidArgument(
            field, f"must name an absolute folder other than / (got {root_uri!r})"
        )
    if ".." in path.parts:
        raise InvalidArgument(field, f"must not contain '..' segments (got {root_uri!r})")
    return RootUri(scheme="file", uri=path.as_uri(), path=path)


def _parse_s3_root(root_uri: str, bucket: str, raw_path: str, field: str) -> RootUri:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidArgument(
            field,
            f"bucket {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
            f"digits, dots and hyphens; got {root_uri!r})",
        )
    prefix = raw_path.strip("/")
    if prefix:
        validate_key(prefix, field)
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return RootUri(scheme="s3", uri=uri, bucket=bucket, prefix=prefix)


def validate_key(key: str, field: str = "uri") -> str:
    """Returns the key when it is a safe relative key; else raises InvalidArgument."""
    problem = _key_problem(key)
    if problem:
        raise InvalidArgument(field, f"{problem} (got {key!r})")
    return key


def _key_problem(key: str) -> str | None:
    if not key:
        return "names no object: the key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"key is longer than {MAX_KEY_LENGTH} characters"
    if "\x00" in key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return "must not contain NUL or other control characters"
    if "\\" in key:
        return "must not contain backslashes"
    if "%" in key:
        return "must not contain percent-encoded characters"
    if key.startswith("/"):
        return "must be relative to the store root, not an absolute path"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return "must not contain empty, '.' or '..' path segments"
        if not _SEGMENT.fullmatch(segment):
            return "segments may only hold letters, digits and . _ - = + @ , ~"
    return None


def validate_named_key(relative_key: str, field: str = "relative_key") -> str:
    """A key for a named object: a safe key outside the reserved namespaces.

    ``sha256/`` belongs to content-addressed objects, and first segments starting with
    a dot are kept for the stores' own bookkeeping (S3 staging uploads).
    """
    validate_key(relative_key, field)
    first = relative_key.split("/", 1)[0]
    if first == CONTENT_PREFIX or first.startswith("."):
        raise InvalidArgument(
            field,
            f"must not start with {CONTENT_PREFIX!r}/ or a dot segment: those are reserved "
            f"(got {relative_key!r})",
        )
    return relative_key


def check_sha256(value: str, field: str = "sha256") -> str:
    """Returns a sha256 hex digest spelled as the store spells it (64 lowercase hex)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidArgument(field, f"must be 64 lowercase hex digits (got {value!r})")
    return value


def content_key(sha256: str) -> str:
    """The key of content-addressed bytes: ``sha256/ab/cd/<hex>`` (fan-out keeps folders small)."""
    check_sha256(sha256)
    return f"{CONTENT_PREFIX}/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def sha256_of_key(key: str, field: str = "uri") -> str | None:
    """The digest a content-addressed key names, None for a named key.

    A key in the ``sha256/`` namespace that is not a well-formed address is refused.
    """
    if key.split("/", 1)[0] != CONTENT_PREFIX:
        return None
    match = _CONTENT_KEY.fullmatch(key)
    if not match or not match.group(3).startswith(match.group(1) + match.group(2)):
        raise InvalidArgument(
            field, f"is not a content address of the form sha256/ab/cd/<64 hex> (got {key!r})"
        )
    return match.group(3)


def key_of(root: RootUri, uri: str, field: str = "uri") -> str:
    """The key of an object URI under ``root``; refuses URIs of other roots or bad keys."""
    scheme = scheme_of(uri, field)
    if scheme != root.scheme or not uri.startswith(root.uri + "/"):
        raise InvalidArgument(field, f"{uri!r} is outside the artifact store root {root.uri!r}")
    key = validate_key(uri[len(root.uri) + 1 :], field)
    sha256_of_key(key, field)
    return key


def uri_of(root: RootUri, key: str) -> str:
    """The object URI of a key under a root."""
    return f"{root.uri}/{key}"
