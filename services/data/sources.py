"""Where ingest reads from: a local path confined to the data roots, s3://, or an upload.

Every source is resolved to a local file or folder before conversion: local paths are
read in place, s3:// objects are fetched into the data cache (keyed by their ETag, so a
cached object is not fetched again), completed uploads are read from the artifact store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from aimass.core.errors import InvalidArgument
from aimass.core.settings import Settings
from aimass.data.config import EXTENSIONS
from aimass.data.v1 import data_pb2 as pb

HASH_BLOCK = 1 << 20


def resolve_local(data_path: str, roots: Sequence[Path], field: str = "config.data_path") -> Path:
    """The absolute path of ``data_path`` when it lies under one of ``roots``.

    Refuses '..' segments outright (even when they would resolve inside a root) and any
    path, symlinks resolved, outside the roots; relative paths are taken under ``home``.
    """
    if not data_path:
        raise InvalidArgument(field, "is empty")
    if ".." in PurePosixPath(data_path.replace("\\", "/")).parts:
        raise InvalidArgument(field, f"{data_path!r} must not contain '..'")
    path = Path(data_path)
    resolved_roots = [Path(root).resolve() for root in roots]
    if not resolved_roots:
        raise InvalidArgument(field, "no data roots are configured (settings.data_roots)")
    path = (path if path.is_absolute() else resolved_roots[0] / path).resolve()
    if not any(path == root or path.is_relative_to(root) for root in resolved_roots):
        allowed = ", ".join(str(r) for r in resolved_roots)
        raise InvalidArgument(field, f"{data_path!r} is outside the allowed data roots ({allowed})")
    if not path.exists():
        raise InvalidArgument(field, f"{data_path!r} does not exist")
    return path


def infer_format(path: Path, config: pb.DatasetConfig) -> str:
    """The format name: the config's, else from the extension, else image_folder for a folder."""
    from aimass.data.config import FORMAT_NAMES

    if config.format:
        return FORMAT_NAMES[config.format]
    if path.is_dir():
        return "image_folder"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(
            "config.format", f"cannot infer the format of {path.name!r}: set format"
        )
    return fmt


def content_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted relative paths and file contents."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def fetch_s3(uri: str, settings: Settings, cache: Path) -> Path:
    """Downloads ``s3://bucket/key`` into ``cache`` unless the same object (ETag) is there."""
    from aimass.core.artifacts import make_s3_client

    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise InvalidArgument("config.s3_uri", f"{uri!r} is not of the form s3://bucket/key")
    bucket, key = uri[5:].split("/", 1)
    client = make_s3_client(settings.s3)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as err:  # botocore raises ClientError subclasses per status
        raise InvalidArgument("config.s3_uri", f"cannot read {uri}: {err}") from err
    etag = str(head.get("ETag", "")).strip('"')
    name = hashlib.sha256(f"{uri}\0{etag}".encode()).hexdigest()[:32]
    target = cache / name / PurePosixPath(key).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".part")
        client.download_file(bucket, key, str(partial))
        partial.replace(target)
    return target
