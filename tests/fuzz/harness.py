"""Calling any RPC of a running aimass service from its descriptor, and watching the state.

- ``FUZZED_SERVICES``: the services whose every RPC the fuzz tests call. Adding a
  finished service is adding its name here (and seeds in conftest.py): its RPCs are
  found from the service descriptors of ``aimass.<name>.v1.<name>_pb2`` (routing's
  file declares two, RoutingService and PredictionService, served on one port).
- ``rpcs_of(names)``: every method of those services as an :class:`Rpc`.
- ``invoke(channel, rpc, request)``: one call of any shape; a stream's first response is
  enough. Returns the status code and message.
- ``State``: a snapshot of the database (row count and a content digest per table) and
  of the files under the artifact root, to show that a rejected call changed nothing.
- ``fuzz_examples(default)``: the number of examples per test, raised for long runs by
  the AIMASS_FUZZ_EXAMPLES environment variable.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from sqlalchemy import Engine, MetaData, select, text

FUZZED_SERVICES = (
    "data", "registry", "evaluation", "training", "compression", "routing", "pipeline",
)  # fmt: skip
EXAMPLES_VARIABLE = "AIMASS_FUZZ_EXAMPLES"

# Columns that move with no request at all (heartbeats, the outbox relay's bookkeeping,
# the routing service's health checks: a server's state flips with its reachability,
# which renews the row's etag and update time too).
VOLATILE_COLUMNS = {
    "workers": {"heartbeat_time", "update_time"},
    "outbox_events": {"publish_time", "attempts"},
    "inference_servers": {"state", "reason", "check_time", "update_time", "etag"},
}
# Tables with job rows: "quiet" means none of them is queued, running or cancelling.
JOB_TABLES = (
    "ingest_jobs", "evaluations", "benchmarks", "training_jobs", "compression_jobs",
    "pipeline_runs",
)  # fmt: skip
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
# Tables whose rows a reconciler moves after an accepted call: "quiet" also means every
# row of them is in one of its resting states (a deployment placed, or failed to be).
SETTLING_TABLES = {"deployments": ("READY", "FAILED")}


def fuzz_examples(default: int) -> int:
    """Examples per property: ``default``, or AIMASS_FUZZ_EXAMPLES when it is set."""
    return int(os.environ.get(EXAMPLES_VARIABLE, default))


@dataclass(frozen=True)
class Rpc:
    """One method of a service, callable from its descriptor alone."""

    service: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def request_class(self) -> Any:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> Any:
        return message_factory.GetMessageClass(self.method.output_type)

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)


def service_descriptors(name: str) -> list[ServiceDescriptor]:
    """The gRPC services declared in ``aimass.<name>.v1.<name>_pb2``."""
    module = importlib.import_module(f"aimass.{name}.v1.{name}_pb2")
    return list(module.DESCRIPTOR.services_by_name.values())


def proto_files(names: Sequence[str]) -> list[FileDescriptor]:
    """The proto files of the services ``names`` (their resource patterns name the seeds)."""
    return [service.file for name in names for service in service_descriptors(name)]


def rpcs_of(names: Sequence[str]) -> list[Rpc]:
    """Every method of every service of ``names``, in declaration order."""
    return [
        Rpc(name, method)
        for name in names
        for service in service_descriptors(name)
        for method in service.methods
    ]


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code and message (the first response, if any)."""

    code: grpc.StatusCode
    details: str
    response: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


async def invoke(channel: grpc.aio.Channel, rpc: Rpc, request: Any, timeout_s: float) -> Outcome:
    """Calls ``rpc`` with ``request`` (a list of messages for a client stream).

    A server stream is read up to its first response and then cancelled: that response
    (or the status the stream ended with first) is the outcome.
    """
    serialize = rpc.request_class.SerializeToString
    deserialize = rpc.response_class.FromString
    try:
        if rpc.client_streaming:
            request = _stream_of(request)
        if rpc.server_streaming:
            factory = channel.stream_stream if rpc.client_streaming else channel.unary_stream
            call = factory(
                rpc.path, request_serializer=serialize, response_deserializer=deserialize
            )(request, timeout=timeout_s)
            try:
                async for response in call:
                    return Outcome(grpc.StatusCode.OK, "", response)
            finally:
                call.cancel()
            return Outcome(grpc.StatusCode.OK, "")
        factory = channel.stream_unary if rpc.client_streaming else channel.unary_unary
        response = await factory(
            rpc.path, request_serializer=serialize, response_deserializer=deserialize
        )(request, timeout=timeout_s)
        return Outcome(grpc.StatusCode.OK, "", response)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "")


async def _stream_of(messages: Sequence[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


# ------------------------------------------------------------------------ state


@dataclass(frozen=True)
class State:
    """Rows per table with a digest of their content, and the files of the artifact store."""

    tables: dict[str, tuple[int, str]]
    files: tuple[tuple[str, int], ...]

    def difference(self, other: State) -> list[str]:
        """What changed from ``self`` to ``other``, one line per table or file."""
        changes = [
            f"table {name}: {self.tables.get(name)} -> {other.tables.get(name)}"
            for name in sorted(set(self.tables) | set(other.tables))
            if self.tables.get(name) != other.tables.get(name)
        ]
        before, after = set(self.files), set(other.files)
        changes += [f"file added: {path} ({size} bytes)" for path, size in sorted(after - before)]
        changes += [f"file removed: {path}" for path, _ in sorted(before - after)]
        return changes


class StateProbe:
    """Reads :class:`State` from a database and an artifact folder."""

    def __init__(self, engine: Engine, artifact_dir: Path) -> None:
        self.engine = engine
        self.artifact_dir = artifact_dir
        self.metadata = MetaData()
        self.metadata.reflect(engine)

    def read(self) -> State:
        tables: dict[str, tuple[int, str]] = {}
        with self.engine.connect() as connection:
            for table in self.metadata.sorted_tables:
                skip = VOLATILE_COLUMNS.get(table.name, set())
                columns = [c for c in table.columns if c.name not in skip]
                rows = connection.execute(select(*columns)).all()
                digest = hashlib.sha256(repr(sorted(map(repr, rows))).encode()).hexdigest()[:16]
                tables[table.name] = (len(rows), digest)
        files = (
            tuple(
                sorted(
                    (str(path.relative_to(self.artifact_dir)), path.stat().st_size)
                    for path in self.artifact_dir.rglob("*")
                    if path.is_file()
                )
            )
            if self.artifact_dir.exists()
            else ()
        )
        return State(tables, files)

    def unfinished_jobs(self) -> list[tuple[str, str]]:
        """(table, name) of every job not in a terminal state."""
        found: list[tuple[str, str]] = []
        with self.engine.connect() as connection:
            for table in JOB_TABLES:
                if table not in self.metadata.tables:
                    continue
                rows = connection.execute(text(f"SELECT name, state FROM {table}")).all()
                found += [(table, name) for name, state in rows if state not in TERMINAL_STATES]
        return found

    def unsettled_rows(self) -> list[tuple[str, str, str]]:
        """(table, name, state) of every row of SETTLING_TABLES not at rest."""
        found: list[tuple[str, str, str]] = []
        with self.engine.connect() as connection:
            for table, resting in SETTLING_TABLES.items():
                if table not in self.metadata.tables:
                    continue
                rows = connection.execute(text(f"SELECT name, state FROM {table}")).all()
                found += [(table, name, state) for name, state in rows if state not in resting]
        return found

    def unpublished_events(self) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    text("SELECT count(*) FROM outbox_events WHERE publish_time IS NULL")
                ).scalar_one()
            )

    async def stable(self, settle_s: float = 0.05, limit_s: float = 10.0) -> State:
        """A snapshot taken once two in a row, ``settle_s`` apart, agree."""
        deadline = asyncio.get_running_loop().time() + limit_s
        previous = await asyncio.to_thread(self.read)
        while True:
            await asyncio.sleep(settle_s)
            current = await asyncio.to_thread(self.read)
            if current == previous or asyncio.get_running_loop().time() > deadline:
                return current
            previous = current
