"""``aimass data``: ingest a YAML config (with a progress bar), list, show, versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from aimass.cli.common import EXIT_USAGE, channel, console
from aimass.cli.common import call as _call
from aimass.cli.common import fail as _fail
from aimass.cli.common import print_json as _print_json
from aimass.common.v1 import common_pb2
from aimass.core.errors import InvalidArgument
from aimass.data import config as cfg
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}

data_app = typer.Typer(help="Datasets: ingest, versions, splits.", no_args_is_help=True)

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", help="host:port of the data service (default: the configured stack's)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stub(address: str | None) -> data_pb2_grpc.DataServiceStub:
    return data_pb2_grpc.DataServiceStub(channel("data", address))


@data_app.command()
def ingest(
    config_file: Annotated[Path, typer.Argument(help="YAML dataset config.")],
    name: Annotated[
        str, typer.Option("--name", help="Dataset id (default: the file's stem).")
    ] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Write a new version even if cached.")
    ] = False,
    address: AddressOption = None,
) -> None:
    """Creates the dataset if needed, ingests it and follows the job with a progress bar."""
    try:
        config = cfg.load_yaml(config_file)
    except InvalidArgument as err:
        _fail(err.message, EXIT_USAGE)
    dataset_id = name or config_file.stem.replace("_", "-").lower()
    stub = _stub(address)
    try:
        stub.CreateDataset(
            pb.CreateDatasetRequest(dataset=pb.Dataset(config=config), dataset_id=dataset_id)
        )
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
            _fail(f"{err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    request = pb.IngestDatasetRequest(name=f"datasets/{dataset_id}", config=config, force=force)
    job = _call(stub.IngestDataset, request)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"),
                  console=console) as bar:  # fmt: skip
        task = bar.add_task(f"ingest {dataset_id}", total=None, done="")
        for event in stub.WatchIngestJob(pb.WatchIngestJobRequest(name=job.name)):
            progress = event.status.progress
            bar.update(task, completed=progress.completed, total=progress.total or None,
                       done=f"{progress.completed:,} {progress.unit}")  # fmt: skip
            if event.status.state in TERMINAL:
                break
    job = _call(stub.GetIngestJob, pb.GetIngestJobRequest(name=job.name))
    if job.status.state != common_pb2.JOB_STATE_SUCCEEDED:
        _fail(f"ingest {common_pb2.JobState.Name(job.status.state)}: {job.status.reason}")
    cached = " (unchanged: existing version)" if job.cache_hit else ""
    console.print(f"{job.dataset_version}{cached}")


@data_app.command("list")
def list_datasets(address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Lists datasets."""
    response = _call(_stub(address).ListDatasets, pb.ListDatasetsRequest(page_size=1000))
    if as_json:
        _print_json(response)
        return
    table = Table("name", "latest version", "source")
    for dataset in response.datasets:
        source = dataset.config.WhichOneof("source") or ""
        table.add_row(
            dataset.name, str(dataset.latest_version), getattr(dataset.config, source, "")
        )
    console.print(table)


@data_app.command()
def show(version: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Shows a version ("datasets/d/versions/1") or a dataset ("datasets/d")."""
    stub = _stub(address)
    if "/versions/" not in version:
        _print_json(_call(stub.GetDataset, pb.GetDatasetRequest(name=version)))
        return
    found = _call(stub.GetDatasetVersion, pb.GetDatasetVersionRequest(name=version))
    if as_json:
        _print_json(found)
        return
    console.print(
        f"{found.name}  {pb.DatasetVersionState.Name(found.state)}  {found.fingerprint[:12]}"
    )
    table = Table("split", "rows", "labels")
    for split in found.splits:
        labels = ", ".join(f"{lc.label}:{lc.count}" for lc in split.label_distribution)
        table.add_row(common_pb2.DatasetSplit.Name(split.split), str(split.row_count), labels)
    console.print(table)
    columns = Table("column", "type", "min", "max", "mean")
    stats = {s.column: s for s in found.column_statistics}
    for column in found.schema:
        s = stats.get(column.name)
        numbers = [
            f"{getattr(s, k):.4g}" if s and s.HasField(k) else "" for k in ("min", "max", "mean")
        ]
        columns.add_row(column.name, column.type, *numbers)
    console.print(columns)


@data_app.command()
def versions(dataset: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Lists the versions of a dataset ("datasets/d" or "d")."""
    parent = dataset if dataset.startswith("datasets/") else f"datasets/{dataset}"
    response = _call(
        _stub(address).ListDatasetVersions, pb.ListDatasetVersionsRequest(parent=parent)
    )
    if as_json:
        _print_json(response)
        return
    table = Table("version", "state", "rows", "fingerprint")
    for v in response.dataset_versions:
        table.add_row(
            str(v.version),
            pb.DatasetVersionState.Name(v.state),
            str(v.total_rows),
            v.fingerprint[:12],
        )
    console.print(table)
