"""``aimass models``: the model registry from a terminal.

    aimass models list [--filter 'tags.team = "vision"']
    aimass models show digits
    aimass models versions digits [--filter 'metrics.accuracy >= 0.95'] [--order-by 'version desc']
    aimass models alias digits production 3 [--expected 2]
    aimass models export digits 3 --release v1-0-0 --out digits-3.tar.gz
    aimass models import digits-3.tar.gz --model digits
    aimass models import encoder.onnx --model encoder            (signature read from the graph)
    aimass models import net.pt --model net --signature 'x:FP32:-1x8->logits'
    aimass models import weights.pth --model net --factory pkg.nets:build \
        --factory-kwargs '{"hidden": 64}' --signature 'x:FP32:-1x8'

Every command takes ``--json`` for scripts and ``--address`` (default: the registry of
the configured stack). Exit codes: 0 done, 1 the registry refused (the message names
the field and the problem), 2 bad usage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.table import Table

from aimass.cli.common import EXIT_USAGE, channel, console
from aimass.cli.common import as_dict as _as_dict
from aimass.cli.common import call as _call
from aimass.cli.common import fail as _fail
from aimass.cli.common import print_json as _print_json
from aimass.common.v1 import common_pb2
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc

CHUNK_SIZE = 1024 * 1024

models_app = typer.Typer(
    help="Registered models, versions, aliases and release bundles.", no_args_is_help=True
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the registry (default: the configured stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stub(address: str | None) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(channel("registry", address))


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def _metrics(version: pb.ModelVersion) -> str:
    return ", ".join(f"{m.name}={m.value:.4g}" for m in version.metrics)


def _time(stamp: Any) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if stamp.seconds else ""


@models_app.command("list")
def list_models(
    filter: Annotated[str, typer.Option("--filter", help='e.g. tags.team = "vision"')] = "",
    order_by: Annotated[str, typer.Option("--order-by", help="name, create_time desc, ...")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List registered models."""
    stub = _stub(address)
    models: list[pb.RegisteredModel] = []
    token = ""
    while True:
        page = _call(
            stub.ListRegisteredModels,
            pb.ListRegisteredModelsRequest(filter=filter, order_by=order_by, page_token=token),
        )
        models += page.registered_models
        token = page.next_page_token
        if not token:
            break
    if as_json:
        _print_json([_as_dict(m) for m in models])
        return
    table = Table(title="Registered models")
    for column in ("name", "latest", "owner", "tags", "description"):
        table.add_column(column)
    for model in models:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(model.tags.items()))
        table.add_row(model.name, str(model.latest_version), model.owner, tags, model.description)
    console.print(table)


@models_app.command("show")
def show(model: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show a model and its aliases."""
    stub = _stub(address)
    name = _model_name(model)
    found = _call(stub.GetRegisteredModel, pb.GetRegisteredModelRequest(name=name))
    aliases = _call(stub.ListAliases, pb.ListAliasesRequest(parent=name, page_size=1000)).aliases
    if as_json:
        _print_json({"model": _as_dict(found), "aliases": [_as_dict(a) for a in aliases]})
        return
    table = Table(title=found.name, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for field, value in (
        ("description", found.description),
        ("owner", found.owner),
        ("latest version", str(found.latest_version)),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(found.tags.items()))),
        ("aliases", ", ".join(f"{a.name.rsplit('/', 1)[1]} -> {a.version}" for a in aliases)),
        ("created", _time(found.create_time)),
    ):
        table.add_row(field, value)
    console.print(table)


@models_app.command("versions")
def versions(
    model: str,
    filter: Annotated[str, typer.Option("--filter", help="e.g. metrics.accuracy >= 0.95")] = "",
    order_by: Annotated[str, typer.Option("--order-by", help="version desc, ...")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the versions of a model."""
    stub = _stub(address)
    found: list[pb.ModelVersion] = []
    token = ""
    while True:
        page = _call(
            stub.ListModelVersions,
            pb.ListModelVersionsRequest(
                parent=_model_name(model), filter=filter, order_by=order_by, page_token=token
            ),
        )
        found += page.model_versions
        token = page.next_page_token
        if not token:
            break
    if as_json:
        _print_json([_as_dict(v) for v in found])
        return
    table = Table(title=f"Versions of {_model_name(model)}")
    for column in ("version", "aliases", "metrics", "tags", "source", "created"):
        table.add_column(column)
    for version in found:
        source = (
            version.source.parent_version or version.source.job or version.source.dataset_version
        )
        table.add_row(
            str(version.version),
            ", ".join(version.aliases),
            _metrics(version),
            ", ".join(f"{k}={v}" for k, v in sorted(version.tags.items())),
            source,
            _time(version.create_time),
        )
    console.print(table)


@models_app.command("alias")
def alias(
    model: str,
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS")],
    version: Annotated[int, typer.Argument(min=1)],
    expected: Annotated[
        int, typer.Option("--expected", help="Move only if the alias points at this version now.")
    ] = 0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point ALIAS (production, staging, ...) at VERSION of MODEL."""
    stub = _stub(address)
    name = f"{_model_name(model)}/aliases/{alias_name}"
    moved = _call(
        stub.SetAlias, pb.SetAliasRequest(name=name, version=version, expected_version=expected)
    )
    if as_json:
        _print_json(_as_dict(moved))
        return
    console.print(f"{moved.name} -> version {moved.version}", highlight=False)


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            yield block


@models_app.command("export")
def export(
    model: str,
    version: Annotated[int, typer.Argument(min=1)],
    release: Annotated[str, typer.Option("--release", help="Release id, e.g. v1-0-0.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .tar.gz.")],
    description: Annotated[str, typer.Option("--description")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a version as a release bundle (.tar.gz) and download it."""
    stub = _stub(address)
    parent = f"{_model_name(model)}/versions/{version}"
    name = f"{parent}/releases/{release}"
    try:
        made = stub.GetRelease(pb.GetReleaseRequest(name=name))
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
        made = _call(
            stub.CreateRelease,
            pb.CreateReleaseRequest(
                parent=parent, release_id=release, release=pb.Release(description=description)
            ),
        )
    digest = hashlib.sha256()
    partial = out.with_name(out.name + ".part")
    try:
        with partial.open("wb") as handle:
            for chunk in stub.DownloadRelease(pb.DownloadReleaseRequest(name=name)):
                handle.write(chunk.data)
                digest.update(chunk.data)
    except grpc.RpcError as err:
        partial.unlink(missing_ok=True)
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    if digest.hexdigest() != made.bundle.sha256:
        partial.unlink(missing_ok=True)
        _fail(f"the downloaded bundle hashes to {digest.hexdigest()}, not {made.bundle.sha256}")
    partial.replace(out)
    if as_json:
        _print_json({"release": _as_dict(made), "path": str(out)})
        return
    console.print(f"{made.name} -> {out} (sha256 {made.bundle.sha256})", highlight=False)


BUNDLE_SUFFIXES = (".tar.gz", ".tgz")
FORMATS = {
    "": pb.MODEL_FORMAT_UNSPECIFIED,
    "onnx": pb.MODEL_FORMAT_ONNX,
    "torchscript": pb.MODEL_FORMAT_TORCHSCRIPT,
    "state_dict": pb.MODEL_FORMAT_STATE_DICT,
}


def _upload(
    stub: registry_pb2_grpc.RegistryServiceStub, path: Path, kind: str
) -> common_pb2.Artifact:
    """Streams ``path`` to UploadArtifact with its sha256 and size declared."""
    sha256 = hashlib.sha256()
    for block in _read_chunks(path):
        sha256.update(block)

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        header = pb.UploadArtifactHeader(
            kind=kind,
            file_name=path.name,
            sha256=sha256.hexdigest(),
            size_bytes=path.stat().st_size,
        )
        yield pb.UploadArtifactRequest(header=header)
        offset = 0
        for block in _read_chunks(path):
            yield pb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=offset, data=block))
            offset += len(block)

    return _call(stub.UploadArtifact, requests())


def parse_signature(text: str) -> common_pb2.Signature:
    """``--signature``: a JSON file (common.v1.Signature) or ``INPUTS[->OUTPUTS]`` inline.

    Each tensor is ``name:DATATYPE:DIMS`` with DIMS like ``-1x8`` (-1: variable), comma
    separated; an output may be only a name (its type and shape come from the graph).
    ``input_ids:INT64:-1x-1,attention_mask:INT64:-1x-1->embedding``
    """
    if text.endswith(".json") or Path(text).is_file():
        try:
            return json_format.Parse(Path(text).read_text(), common_pb2.Signature())
        except (OSError, json_format.ParseError) as err:
            raise typer.BadParameter(f"{text}: {err}", param_hint="--signature") from err
    inputs, _, outputs = text.partition("->")
    signature = common_pb2.Signature()
    for side, part in ((signature.inputs, inputs), (signature.outputs, outputs)):
        for item in filter(None, (piece.strip() for piece in part.split(","))):
            side.append(_tensor(item, is_input=side is signature.inputs))
    return signature


def _tensor(item: str, *, is_input: bool) -> common_pb2.TensorSpec:
    name, *rest = item.split(":")
    if not name or len(rest) not in ((2,) if is_input else (0, 2)):
        raise typer.BadParameter(
            f"{item!r}: expected name:DATATYPE:DIMS (e.g. input:FP32:-1x8)",
            param_hint="--signature",
        )
    if not rest:
        return common_pb2.TensorSpec(name=name)
    datatype, dims = rest
    try:
        shape = [int(d) for d in dims.lower().split("x")] if dims else []
    except ValueError as err:
        raise typer.BadParameter(
            f"{item!r}: dims must be integers joined by x, like -1x8", param_hint="--signature"
        ) from err
    return common_pb2.TensorSpec(name=name, datatype=datatype.upper(), shape=shape)


def _is_bundle(path: Path) -> bool:
    return path.name.endswith(BUNDLE_SUFFIXES)


@models_app.command("import")
def import_file(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    model: Annotated[str, typer.Option("--model", help="Model to import into (created if new).")],
    signature: Annotated[
        str,
        typer.Option(
            "--signature",
            help="Inputs[->outputs] as name:DATATYPE:DIMS,... (e.g. x:FP32:-1x8->logits), "
            "or a JSON file. Read from the graph for ONNX; inputs required for torch files.",
        ),
    ] = "",
    model_format: Annotated[
        str, typer.Option("--format", help="onnx, torchscript or state_dict (default: guessed).")
    ] = "",
    factory: Annotated[
        str, typer.Option("--factory", help="State dict: package.module:factory of the network.")
    ] = "",
    factory_kwargs: Annotated[
        str, typer.Option("--factory-kwargs", help="State dict: factory keyword arguments, JSON.")
    ] = "",
    config: Annotated[
        str,
        typer.Option(
            "--config",
            help='Version config, JSON: {"task": "classification", "classes": [...], '
            '"signature": {"label_column": ..., "inputs": [{"name": ..., "columns": [...]}]}}',
        ),
    ] = "",
    description: Annotated[str, typer.Option("--description")] = "",
    tags: Annotated[list[str] | None, typer.Option("--tag", help="key=value, repeatable.")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import a model file made outside aimass (ONNX, TorchScript, or state dict + factory),
    or a release bundle (.tar.gz) exported by another aimass, as a new version."""
    if model_format not in FORMATS:
        _fail(f"--format must be one of {', '.join(f for f in FORMATS if f)}", EXIT_USAGE)
    if _is_bundle(path):
        _import_bundle(path, model, address, as_json)
        return
    request = pb.ImportModelVersionRequest(
        parent=_model_name(model),
        file_name=path.name,
        format=FORMATS[model_format],
        factory=factory,
        model_version=pb.ModelVersion(description=description, tags=_tags(tags or [])),
    )
    if signature:
        request.signature.CopyFrom(parse_signature(signature))
    for option, text, target in (
        ("--factory-kwargs", factory_kwargs, request.factory_kwargs),
        ("--config", config, request.model_version.config.values),
    ):
        if text:
            try:
                target.update(json.loads(text))
            except (ValueError, AttributeError, TypeError) as err:
                _fail(f"{option} must be a JSON object: {err}", EXIT_USAGE)
    stub = _stub(address)
    request.source_uri = _upload(stub, path, "upload").uri
    imported = _call(stub.ImportModelVersion, request)
    if as_json:
        _print_json(_as_dict(imported))
        return
    tensors = ", ".join(
        f"{t.name}:{t.datatype}{list(t.shape)}"
        for t in (*imported.signature.inputs, *imported.signature.outputs)
    )
    kinds = ", ".join(a.kind for a in imported.artifacts)
    console.print(f"imported {path.name} as {imported.name} ({kinds}; {tensors})", highlight=False)


def _tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--tag {pair!r}: expected key=value", EXIT_USAGE)
        tags[key] = value
    return tags


def _import_bundle(path: Path, model: str, address: str | None, as_json: bool) -> None:
    """A release bundle: every sum is checked by the registry before anything is stored."""
    stub = _stub(address)
    uploaded = _upload(stub, path, "bundle")
    imported = _call(
        stub.ImportRelease,
        pb.ImportReleaseRequest(parent=_model_name(model), bundle_uri=uploaded.uri),
    )
    if as_json:
        _print_json(_as_dict(imported))
        return
    origin = imported.source.imported_lineage.get("model_version", "?")
    console.print(f"imported {origin} as {imported.name}", highlight=False)
