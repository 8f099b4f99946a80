"""``aimass models``: the model registry from a terminal.

    aimass models list [--filter 'tags.team = "vision"']
    aimass models show digits
    aimass models versions digits [--filter 'metrics.accuracy >= 0.95'] [--order-by 'version desc']
    aimass models alias digits production 3 [--expected 2]
    aimass models export digits 3 --release v1-0-0 --out digits-3.tar.gz
    aimass models import digits-3.tar.gz --model digits

Every command takes ``--json`` for scripts and ``--address`` (default: the registry of
the configured stack). Exit codes: 0 done, 1 the registry refused (the message names
the field and the problem), 2 bad usage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from aimass.common.v1 import common_pb2
from aimass.core.settings import SettingsError, load_settings
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc

CHUNK_SIZE = 1024 * 1024
EXIT_FAILED = 1
EXIT_USAGE = 2

models_app = typer.Typer(
    help="Registered models, versions, aliases and release bundles.", no_args_is_help=True
)
console = Console()

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="host:port of the registry (default: the configured stack's)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stub(address: str | None) -> registry_pb2_grpc.RegistryServiceStub:
    if address is None:
        try:
            address = load_settings().service_address("registry")
        except SettingsError as err:
            _fail(str(err), EXIT_USAGE)
    channel = grpc.insecure_channel(address)
    return registry_pb2_grpc.RegistryServiceStub(channel)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _call(function: Any, request: Message) -> Any:
    try:
        return function(request)
    except grpc.RpcError as err:
        _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


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


@models_app.command("import")
def import_bundle(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    model: Annotated[str, typer.Option("--model", help="Model to import into (created if new).")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import a release bundle as a new version; every sum is checked first."""
    stub = _stub(address)
    sha256 = hashlib.sha256()
    for block in _read_chunks(path):
        sha256.update(block)

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        header = pb.UploadArtifactHeader(
            kind="bundle",
            file_name=path.name,
            sha256=sha256.hexdigest(),
            size_bytes=path.stat().st_size,
        )
        yield pb.UploadArtifactRequest(header=header)
        offset = 0
        for block in _read_chunks(path):
            yield pb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=offset, data=block))
            offset += len(block)

    uploaded = _call(stub.UploadArtifact, requests())
    imported = _call(
        stub.ImportRelease,
        pb.ImportReleaseRequest(parent=_model_name(model), bundle_uri=uploaded.uri),
    )
    if as_json:
        _print_json(_as_dict(imported))
        return
    origin = imported.source.imported_lineage.get("model_version", "?")
    console.print(f"imported {origin} as {imported.name}", highlight=False)
