"""Release bundles: a version as one .tar.gz another aimass can import.

Layout of a bundle (every path relative, no links)::

    model/<file_name>     the model files (ONNX, state dict, TorchScript ...)
    config.json           signature, preprocessing, framework, opset, the version's
                          config, its lineage, the artifacts list, and the Triton
                          config.pbtxt generated from the signature
    metrics.json          the version's metrics
    MODEL_CARD.md         the model card
    MANIFEST.sha256       "<sha256>  <path>" for every other file, sorted by path

Export reads each artifact through the store (so its sum is verified) and
writes a deterministic archive (sorted members, zero mtimes, no owners).
Import refuses member names that are absolute, climb out with '..', or are
links or devices; then checks that the manifest lists exactly the files of the
archive and that each one hashes to its sum, and only then hands anything
back: a tampered bundle is refused with the name of the file whose sum fails,
before a byte is stored or a row written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import json_format

from aimass.common.v1 import common_pb2
from aimass.core.artifacts import ArtifactStore
from aimass.core.errors import InvalidArgument
from aimass.registry.v1 import registry_pb2 as pb

BUNDLE_FORMAT = "aimass-release/1"
MANIFEST = "MANIFEST.sha256"
CONFIG = "config.json"
METRICS = "metrics.json"
MODEL_CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
# Bundles are checked and unpacked in a temporary folder: refuse absurd ones.
MAX_MEMBERS = 1000
_BLOCK = 1024 * 1024

# KServe v2 datatypes (what aimass signatures use) -> Triton config data types.
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}
DEFAULT_MAX_BATCH_SIZE = 64


# ---------------------------------------------------------------- Triton config


def triton_config(model: str, signature: common_pb2.Signature, artifact_kinds: list[str]) -> str:
    """The config.pbtxt Triton needs to serve the model, generated from its signature.

    When every tensor's first dimension is variable (-1) it is the batch axis:
    Triton batches dynamically up to DEFAULT_MAX_BATCH_SIZE and the dims leave it out.
    """
    tensors = [*signature.inputs, *signature.outputs]
    batched = bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)
    backend = "onnxruntime" if "onnx" in artifact_kinds or not artifact_kinds else "pytorch"
    lines = [
        f'name: "{model}"',
        f'backend: "{backend}"',
        f"max_batch_size: {DEFAULT_MAX_BATCH_SIZE if batched else 0}",
    ]
    lines += _tensor_section("input", signature.inputs, batched)
    lines += _tensor_section("output", signature.outputs, batched)
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _tensor_section(section: str, tensors: Any, batched: bool) -> list[str]:
    if not tensors:
        return []
    entries = []
    for tensor in tensors:
        dims = list(tensor.shape[1:] if batched else tensor.shape) or [1]
        data_type = TRITON_TYPES.get(tensor.datatype.upper())
        if data_type is None:
            raise InvalidArgument(
                "model_version.signature",
                f"tensor {tensor.name!r} has datatype {tensor.datatype!r}, "
                f"not one of {', '.join(TRITON_TYPES)}",
            )
        entries.append(
            "  {\n"
            f'    name: "{tensor.name}"\n'
            f"    data_type: {data_type}\n"
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
            "  }"
        )
    return [f"{section} [", ",\n".join(entries), "]"]


# ---------------------------------------------------------------------- export


async def build_bundle(
    store: ArtifactStore, version: pb.ModelVersion, release_id: str, workdir: Path
) -> Path:
    """Writes the bundle of ``version`` under ``workdir`` and returns the .tar.gz path."""
    staging = workdir / "bundle"
    (staging / MODEL_DIR).mkdir(parents=True)
    artifacts = []
    for artifact in version.artifacts:
        relative = f"{MODEL_DIR}/{_safe_file_name(artifact)}"
        # get_file verifies the sum while it downloads.
        await store.get_file(artifact.uri, staging / relative, expected_sha256=artifact.sha256)
        artifacts.append(
            {
                "kind": artifact.kind,
                "file_name": artifact.file_name,
                "path": relative,
                "sha256": artifact.sha256,
                "size_bytes": artifact.size_bytes,
            }
        )
    _write_json(staging / CONFIG, _config_document(version, release_id, artifacts))
    _write_json(
        staging / METRICS,
        [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in version.metrics],
    )
    (staging / MODEL_CARD).write_text(version.model_card or "", encoding="utf-8")
    _write_manifest(staging)
    archive = workdir / "bundle.tar.gz"
    _write_archive(staging, archive)
    return archive


def _safe_file_name(artifact: common_pb2.Artifact) -> str:
    name = PurePosixPath(artifact.file_name or artifact.kind).name
    return name if name not in ("", ".", "..") else artifact.kind


def _config_document(
    version: pb.ModelVersion, release_id: str, artifacts: list[dict[str, Any]]
) -> dict[str, Any]:
    model_id = version.name.split("/")[1]
    config = json_format.MessageToDict(version.config.values)
    return {
        "format": BUNDLE_FORMAT,
        "model_version": version.name,
        "release": release_id,
        "description": version.description,
        "framework": version.framework,
        "opset": version.opset,
        "parameter_count": version.parameter_count,
        "signature": json_format.MessageToDict(version.signature),
        "preprocessing": config.get("preprocessing", {}),
        "config": config,
        "tags": dict(version.tags),
        "artifacts": artifacts,
        "lineage": lineage_of(version),
        "triton": {
            "config_pbtxt": triton_config(
                model_id, version.signature, [a["kind"] for a in artifacts]
            )
        },
    }


def lineage_of(version: pb.ModelVersion) -> dict[str, str]:
    """The version's lineage as flat metadata, carried along by the bundle."""
    source = version.source
    lineage = dict(source.imported_lineage)
    lineage.update(
        {
            "model_version": version.name,
            "dataset_version": source.dataset_version,
            "job": source.job,
            "parent_version": source.parent_version,
            "derivation": source.derivation,
            "creator": version.creator,
        }
    )
    return {key: value for key, value in lineage.items() if value}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _write_manifest(staging: Path) -> None:
    lines = [f"{_sha256_of(staging / path)}  {path}" for path in _files_under(staging)]
    (staging / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_archive(staging: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for path in _files_under(staging):
            info = tar.gettarinfo(str(staging / path), arcname=path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o644
            with (staging / path).open("rb") as handle:
                tar.addfile(info, handle)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- import


@dataclass(frozen=True)
class BundleFile:
    """A model file of an imported bundle, checked, waiting in the temporary folder."""

    kind: str
    file_name: str
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ImportedBundle:
    """What a checked bundle holds: the version to register and its files."""

    version: pb.ModelVersion
    files: list[BundleFile]


def read_bundle(archive: Path, workdir: Path, field: str = "bundle_uri") -> ImportedBundle:
    """Unpacks and checks a bundle; raises InvalidArgument(field) naming the bad file.

    Synchronous (tar and hashing); callers run it in a worker thread.
    """
    root = workdir / "unpacked"
    root.mkdir(parents=True)
    _safe_extract(archive, root, field)
    _verify_manifest(root, field)
    try:
        config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
        metrics = json.loads((root / METRICS).read_text(encoding="utf-8"))
        card = (root / MODEL_CARD).read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise InvalidArgument(field, f"the bundle's metadata cannot be read: {err}") from err
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise InvalidArgument(field, f"{CONFIG} is not an {BUNDLE_FORMAT} bundle config")
    files = [_bundle_file(root, entry, field) for entry in config.get("artifacts", [])]
    return ImportedBundle(_version_from(config, metrics, card, field), files)


def _safe_extract(archive: Path, root: Path, field: str) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise InvalidArgument(field, f"the bundle holds more than {MAX_MEMBERS} entries")
            for member in members:
                _extract_member(tar, member, root, field)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise InvalidArgument(field, f"is not a readable .tar.gz bundle: {err}") from err


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, field: str) -> None:
    relative = _checked_member_name(member.name, field)
    if member.isdir():
        (root / relative).mkdir(parents=True, exist_ok=True)
        return
    if not member.isfile():
        raise InvalidArgument(
            field, f"bundle member {member.name!r} is a link or special file: refused"
        )
    target = root / relative
    if target.exists():
        raise InvalidArgument(field, f"bundle member {member.name!r} appears twice")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise InvalidArgument(field, f"bundle member {member.name!r} cannot be read")
    with contextlib.closing(source), target.open("wb") as handle:
        shutil.copyfileobj(source, handle, _BLOCK)


def _checked_member_name(name: str, field: str) -> str:
    path = PurePosixPath(name)
    parts = [part for part in path.parts if part not in ("", ".")]
    if path.is_absolute() or "\\" in name or ".." in parts or not parts:
        raise InvalidArgument(
            field, f"bundle member {name!r} points outside the bundle (path traversal): refused"
        )
    return "/".join(parts)


def _verify_manifest(root: Path, field: str) -> None:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise InvalidArgument(field, f"the bundle has no {MANIFEST}")
    expected: dict[str, str] = {}
    for number, line in enumerate(manifest_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        sha256, _, path = line.partition("  ")
        if len(sha256) != 64 or not path:
            raise InvalidArgument(field, f"{MANIFEST} line {number} is malformed: {line!r}")
        expected[_checked_member_name(path, field)] = sha256.lower()
    present = [p for p in _files_under(root) if p != MANIFEST]
    for path in present:
        if path not in expected:
            raise InvalidArgument(field, f"{path} is in the bundle but not in {MANIFEST}")
    for path, sha256 in sorted(expected.items()):
        if not (root / path).is_file():
            raise InvalidArgument(field, f"{path} is listed in {MANIFEST} but missing")
        actual = _sha256_of(root / path)
        if actual != sha256:
            raise InvalidArgument(
                field,
                f"{path} fails its sha256 check (manifest {sha256}, content {actual}): "
                "the bundle was altered; nothing was imported",
            )
    for required in (CONFIG, METRICS, MODEL_CARD):
        if required not in expected:
            raise InvalidArgument(field, f"the bundle has no {required}")


def _bundle_file(root: Path, entry: Any, field: str) -> BundleFile:
    try:
        relative = _checked_member_name(str(entry["path"]), field)
        path = root / relative
        if not path.is_file():
            raise InvalidArgument(field, f"{CONFIG} lists {relative}, which is not in the bundle")
        return BundleFile(
            kind=str(entry["kind"]),
            file_name=str(entry.get("file_name") or PurePosixPath(relative).name),
            path=path,
            sha256=_sha256_of(path),
            size_bytes=path.stat().st_size,
        )
    except (KeyError, TypeError) as err:
        raise InvalidArgument(
            field, f"{CONFIG} has a malformed artifacts entry: {entry!r}"
        ) from err


def _version_from(config: dict[str, Any], metrics: Any, card: str, field: str) -> pb.ModelVersion:
    try:
        version = pb.ModelVersion(
            description=str(config.get("description", "")),
            framework=str(config.get("framework", "")),
            opset=int(config.get("opset") or 0),
            parameter_count=int(config.get("parameter_count") or 0),
            model_card=card,
            tags={str(k): str(v) for k, v in (config.get("tags") or {}).items()},
        )
        json_format.ParseDict(config.get("signature") or {}, version.signature)
        json_format.ParseDict(config.get("config") or {}, version.config.values)
        for metric in metrics or []:
            json_format.ParseDict(metric, version.metrics.add())
    except (ValueError, TypeError, AttributeError, json_format.ParseError) as err:
        raise InvalidArgument(field, f"the bundle's metadata is malformed: {err}") from err
    lineage = {str(k): str(v) for k, v in (config.get("lineage") or {}).items()}
    lineage["release"] = f"{config.get('model_version', '')}/releases/{config.get('release', '')}"
    version.source.imported_lineage.update(lineage)
    return version


def read_text_member(archive: bytes, name: str) -> str:
    """One text file of a bundle held in memory (tests and the CLI peek with it)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile(name)
        if member is None:
            raise KeyError(name)
        return member.read().decode("utf-8")
