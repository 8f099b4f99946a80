"""What an evaluation reads, over gRPC only: model versions and their ONNX file from the
registry, dataset versions and split rows from the data service.

:func:`score` runs a version on a split and returns its :class:`Predictions`;
evaluations, comparisons and the benchmark's model file all come through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
from google.protobuf import json_format

from aimass.core.clients import ServiceChannels
from aimass.core.errors import (
    AimassError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from aimass.core.splits import SPLITS, column_to_numpy, decode
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.evaluation import inference
from aimass.evaluation import metrics as mt
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc

# Column names taken as the query of ranking rows when the version's config names none.
QUERY_COLUMNS = ("query_id", "qid", "query", "user_id")


def _mapped(service: str, err: grpc.aio.AioRpcError) -> AimassError:
    """A failed call to another service as our error, keeping its message."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{service} service: {details}")
    return FailedPrecondition(f"{service} service refused: {details}")


@contextlib.asynccontextmanager
async def calling(service: str) -> Any:
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise _mapped(service, err) from err


def version_config(version: registry_pb2.ModelVersion) -> dict[str, Any]:
    """The version's free-form config (model spec, training config) as a dict."""
    return json_format.MessageToDict(version.config.values) if version.config.values else {}


class Sources:
    """Registry and data service clients, and a local cache of ONNX files by sha256."""

    def __init__(self, channels: ServiceChannels, cache_dir: Path) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(channels.get("registry"))
        self.data = data_pb2_grpc.DataServiceStub(channels.get("data"))
        self.cache_dir = cache_dir

    async def version(self, name: str) -> registry_pb2.ModelVersion:
        async with calling("registry"):
            return await self.registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=name)
            )

    async def dataset_version(self, name: str) -> data_pb2.DatasetVersion:
        async with calling("data"):
            return await self.data.GetDatasetVersion(data_pb2.GetDatasetVersionRequest(name=name))

    async def onnx_file(self, version: registry_pb2.ModelVersion) -> Path:
        """The version's "onnx" artifact on local disk (downloaded once, sha256 checked)."""
        artifact = next((a for a in version.artifacts if a.kind == "onnx"), None)
        if artifact is None:
            kinds = sorted(a.kind for a in version.artifacts) or ["none"]
            raise FailedPrecondition(
                f"{version.name} has no onnx artifact (it has {', '.join(kinds)}): "
                "evaluation runs the ONNX file that will be served"
            )
        target = self.cache_dir / f"{artifact.sha256}.onnx"
        if target.exists():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{id(self)}.part")
        digest = hashlib.sha256()
        async with calling("registry"):
            with partial.open("wb") as handle:
                request = registry_pb2.DownloadArtifactRequest(name=version.name, kind="onnx")
                async for chunk in self.registry.DownloadArtifact(request):
                    handle.write(chunk.data)
                    digest.update(chunk.data)
        if artifact.sha256 and digest.hexdigest() != artifact.sha256:
            partial.unlink(missing_ok=True)
            raise FailedPrecondition(f"{version.name}: the onnx download did not match its sha256")
        partial.replace(target)
        return target

    async def split_table(self, dataset_version: str, split: str) -> pa.Table:
        """All rows of one split, read through the data service's ReadSplit."""
        request = data_pb2.ReadSplitRequest(name=dataset_version, split=SPLITS[split])
        async with calling("data"):
            responses = [response async for response in self.data.ReadSplit(request)]
        if not responses:
            raise FailedPrecondition(f"{dataset_version} split {split} has no rows")
        return decode(responses)


def resolve_task(
    requested: str | None,
    version: registry_pb2.ModelVersion,
    dataset: data_pb2.DatasetVersion,
) -> str:
    """The task asked for, else the one in the version's config, else the label's kind."""
    if requested:
        return requested
    task = str(version_config(version).get("task", "")).lower()
    if task in (mt.CLASSIFICATION, mt.REGRESSION, mt.RANKING):
        return task
    return mt.CLASSIFICATION if dataset.label_distribution else mt.REGRESSION


def label_column(dataset: data_pb2.DatasetVersion) -> str:
    """The label column; FailedPrecondition for a version ingested without one."""
    if not dataset.config.label_column:
        raise FailedPrecondition(
            f"{dataset.name} has no label column: a split without labels cannot be evaluated"
        )
    return dataset.config.label_column


def query_column(version: registry_pb2.ModelVersion, table: pa.Table) -> str:
    named = str(version_config(version).get("query_column", ""))
    if named:
        if named not in table.column_names:
            raise FailedPrecondition(f"query column {named!r} is not in the split")
        return named
    found = next((c for c in QUERY_COLUMNS if c in table.column_names), "")
    if not found:
        raise FailedPrecondition(
            f"ranking needs a query column: set query_column in the version's config or "
            f"name one of {list(QUERY_COLUMNS)}"
        )
    return found


@dataclass(frozen=True)
class Scored:
    """A version's predictions on a split."""

    predictions: mt.Predictions
    model_version: str
    dataset_version: str
    split: str


async def score(
    sources: Sources,
    version: registry_pb2.ModelVersion,
    dataset: data_pb2.DatasetVersion,
    split: str,
    task: str,
    *,
    k: int = 10,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    table: pa.Table | None = None,
) -> Scored:
    """Runs the version's ONNX file over the split in batches and pairs outputs with labels."""
    label = label_column(dataset)
    path = await sources.onnx_file(version)
    if table is None:
        table = await sources.split_table(dataset.name, split)
    if label not in table.column_names:
        raise FailedPrecondition(f"{dataset.name} split {split} has no column {label!r}")
    if table.column(label).null_count:
        raise FailedPrecondition(
            f"{dataset.name} split {split}: {table.column(label).null_count} rows have no label"
        )
    query = query_column(version, table) if task == mt.RANKING else ""
    features = list(dataset.config.feature_columns) or [
        c for c in table.column_names if c not in (label, query)
    ]
    classes = version_config(version).get("classes")
    rows = table.num_rows

    def run() -> mt.Predictions:
        session = inference.open_session(path, threads=1)
        matrix = inference.feature_matrix(table, features)
        report = (lambda done: progress(done, rows)) if progress else None
        output = inference.run_batched(session, matrix, batch_size, report, cancelled)
        labels = column_to_numpy(table.column(label))
        groups = None
        if query:
            _, groups = np.unique(column_to_numpy(table.column(query)), return_inverse=True)
        return inference.predictions(task, output, labels, groups, k, classes)

    predictions = await asyncio.to_thread(run)
    return Scored(predictions, version.name, dataset.name, split)


def check_split(value: str, field: str) -> str:
    if value not in SPLITS:
        raise InvalidArgument(field, f"unknown split {value!r}")
    return value
