"""Persistence of the routing service: inference servers and deployments.

Synchronous (the servicer calls it through ``asyncio.to_thread``), one
transaction per call, ORM rows never leave it: it returns protos of
``aimass.routing.v1``. A deployment's state changes write the
``aimass.routing.deployment.updated`` event in the same transaction (outbox).

Route JSON keeps the keys the registry reads to refuse deleting a deployed
version: ``routes = [{"model", "model_version", "weight"}]`` and
``shadow = {"model", "model_version", "sample_percent"}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.orm import Session

from aimass.core.auth import scope
from aimass.core.db.base import utcnow
from aimass.core.db.columns import require_etag
from aimass.core.db.engine import Database
from aimass.core.db.models import Deployment, InferenceServer
from aimass.core.db.pagination import paginate
from aimass.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from aimass.core.events import add_event
from aimass.events.v1 import events_pb2
from aimass.routing.v1 import routing_pb2 as pb

SOURCE = "routing"
TOPIC_DEPLOYMENT_UPDATED = "aimass.routing.deployment.updated"
ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
T = TypeVar("T")

SERVER_KINDS = {
    pb.SERVER_KIND_TRITON: "triton",
    pb.SERVER_KIND_ONNXRUNTIME_IN_PROCESS: "onnxruntime",
}


def check_id(value: str, field: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value!r} must be 1-63 lower-case letters, digits or '-', starting with a letter",
        )
    return value


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """``deployments/x`` -> ``x``; InvalidArgument naming the field otherwise."""
    prefix = f"{collection}/"
    if not name.startswith(prefix):
        raise InvalidArgument(field, f"{name!r} is not {collection}/{{id}}")
    return check_id(name[len(prefix) :], field)


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def server_to_proto(row: InferenceServer) -> pb.InferenceServer:
    kind = next((k for k, v in SERVER_KINDS.items() if v == row.kind), pb.SERVER_KIND_TRITON)
    state = pb.ServerState.Value(f"SERVER_STATE_{row.state}") if row.state != "UNKNOWN" else 0
    return pb.InferenceServer(
        name=f"inferenceServers/{row.name}",
        description=row.description,
        kind=kind,
        grpc_address=row.grpc_address,
        http_address=row.http_address,
        model_repository_uri=row.model_repository,
        memory_budget_bytes=row.memory_budget_bytes,
        labels=row.labels or {},
        state=state,
        live=row.state in ("READY", "NOT_READY"),
        ready=row.state == "READY",
        state_reason=row.reason,
        last_check_time=_ts(row.check_time),
        create_time=_ts(row.create_time),
        update_time=_ts(row.update_time),
        etag=row.etag,
    )


def deployment_to_proto(row: Deployment) -> pb.Deployment:
    routes = [
        pb.Route(
            model=r.get("model", ""),
            weight_percent=int(r.get("weight", 0)),
            resolved_version=r.get("model_version", ""),
        )
        for r in row.routes or []
    ]
    shadow = None
    if row.shadow:
        shadow = pb.ShadowTarget(
            model=row.shadow.get("model", ""),
            sample_percent=float(row.shadow.get("sample_percent", 0.0)),
            resolved_version=row.shadow.get("model_version", ""),
        )
    config = json_format.ParseDict(row.serving_config or {}, pb.ServingConfig())
    return pb.Deployment(
        name=f"deployments/{row.name}",
        description=row.description,
        labels=row.labels or {},
        project=row.project,
        routes=routes,
        shadow=shadow,
        serving_config=config,
        servers=row.servers or [],
        state=pb.DeploymentState.Value(f"DEPLOYMENT_STATE_{row.state}"),
        state_reason=row.reason,
        revision=row.revision,
        create_time=_ts(row.create_time),
        update_time=_ts(row.update_time),
        etag=row.etag,
    )


def routes_json(routes: Sequence[pb.Route]) -> list[dict[str, Any]]:
    return [
        {"model": r.model, "model_version": r.resolved_version, "weight": r.weight_percent}
        for r in routes
    ]


def shadow_json(deployment: pb.Deployment) -> dict[str, Any]:
    if not deployment.HasField("shadow") or not deployment.shadow.model:
        return {}
    shadow = deployment.shadow
    return {
        "model": shadow.model,
        "model_version": shadow.resolved_version,
        "sample_percent": shadow.sample_percent,
    }


def _equals_filter(text: str, allowed: dict[str, Any]) -> list[Any]:
    """``key = value AND key = value`` over the columns in ``allowed``."""
    conditions = []
    for part in filter(None, (p.strip() for p in re.split(r"\s+AND\s+", text or ""))):
        match = re.fullmatch(r'(\w+)\s*=\s*"?([\w./-]+)"?', part)
        if match is None or match.group(1) not in allowed:
            raise InvalidArgument(
                "filter", f"{part!r}: use key = value with key one of {', '.join(allowed)}"
            )
        value = match.group(2).upper() if match.group(1) in ("state", "kind") else match.group(2)
        if match.group(1) == "kind":
            value = {"TRITON": "triton", "ONNXRUNTIME_IN_PROCESS": "onnxruntime"}.get(value, value)
        conditions.append(allowed[match.group(1)] == value)
    return conditions


class RoutingStore:
    """SQL store of the routing service's resources."""

    def __init__(self, database: Database, notify_outbox: Callable[[], None] | None = None) -> None:
        self.database = database
        self.notify_outbox = notify_outbox or (lambda: None)

    def _write(self, work: Callable[[Session], T], resource: str) -> T:
        with self.database.session(resource=resource) as session:
            result = work(session)
        self.notify_outbox()
        return result

    # ---- inference servers -------------------------------------------------------------

    def create_server(self, server_id: str, server: pb.InferenceServer) -> pb.InferenceServer:
        def work(session: Session) -> pb.InferenceServer:
            if session.scalar(select(InferenceServer).where(InferenceServer.name == server_id)):
                raise AlreadyExists(f"inferenceServers/{server_id} already exists")
            row = InferenceServer(
                name=server_id,
                description=server.description,
                kind=SERVER_KINDS.get(server.kind, "triton"),
                grpc_address=server.grpc_address,
                http_address=server.http_address,
                model_repository=server.model_repository_uri,
                memory_budget_bytes=server.memory_budget_bytes,
                labels=dict(server.labels),
                state="UNKNOWN",
                reason="",
            )
            session.add(row)
            session.flush()
            return server_to_proto(row)

        return self._write(work, f"inferenceServers/{server_id}")

    def _server_row(self, session: Session, server_id: str) -> InferenceServer:
        row = session.scalar(select(InferenceServer).where(InferenceServer.name == server_id))
        if row is None:
            raise NotFound(f"inferenceServers/{server_id} not found")
        return row

    def get_server(self, server_id: str) -> pb.InferenceServer:
        with self.database.session(read_only=True) as session:
            return server_to_proto(self._server_row(session, server_id))

    def all_servers(self) -> list[pb.InferenceServer]:
        with self.database.session(read_only=True) as session:
            rows = session.scalars(select(InferenceServer).order_by(InferenceServer.name))
            return [server_to_proto(r) for r in rows]

    def list_servers(
        self, page_size: int, page_token: str, filter_text: str
    ) -> tuple[list[pb.InferenceServer], str]:
        allowed = {"state": InferenceServer.state, "kind": InferenceServer.kind}
        with self.database.session(read_only=True) as session:
            stmt = select(InferenceServer).where(*_equals_filter(filter_text, allowed))
            rows, token = paginate(
                session, stmt, [InferenceServer.name, InferenceServer.id], page_size, page_token
            )
            return [server_to_proto(r) for r in rows], token

    def update_server(
        self, server_id: str, server: pb.InferenceServer, paths: Sequence[str]
    ) -> pb.InferenceServer:
        def work(session: Session) -> pb.InferenceServer:
            row = self._server_row(session, server_id)
            require_etag(f"inferenceServers/{server_id}", row.etag, server.etag)
            for path in paths:
                if path == "labels":
                    row.labels = dict(server.labels)
                elif path == "model_repository_uri":
                    row.model_repository = server.model_repository_uri
                else:
                    setattr(row, path, getattr(server, path))
            session.flush()
            return server_to_proto(row)

        return self._write(work, f"inferenceServers/{server_id}")

    def delete_server(self, server_id: str, etag: str, force: bool) -> None:
        def work(session: Session) -> None:
            row = self._server_row(session, server_id)
            require_etag(f"inferenceServers/{server_id}", row.etag, etag)
            name = f"inferenceServers/{server_id}"
            users = [
                d.name for d in session.scalars(select(Deployment)) if name in (d.servers or [])
            ]
            if users and not force:
                raise FailedPrecondition(
                    f"{name} is used by deployments/{users[0]}: move it or delete with force"
                )
            for deployment in session.scalars(select(Deployment)):
                if name in (deployment.servers or []):
                    deployment.servers = [s for s in deployment.servers if s != name]
            session.delete(row)

        self._write(work, f"inferenceServers/{server_id}")

    def set_server_health(self, server_id: str, state: str, reason: str) -> None:
        def work(session: Session) -> None:
            row = session.scalar(select(InferenceServer).where(InferenceServer.name == server_id))
            if row is not None and (row.state, row.reason) != (state, reason):
                row.state, row.reason, row.check_time = state, reason, utcnow()

        self._write(work, f"inferenceServers/{server_id}")

    # ---- deployments -------------------------------------------------------------------

    def _deployment_row(self, session: Session, deployment_id: str) -> Deployment:
        row = session.scalar(select(Deployment).where(Deployment.name == deployment_id))
        if row is None:
            raise NotFound(f"deployments/{deployment_id} not found")
        scope.check_visible(row.project, f"deployments/{deployment_id}")
        return row

    def create_deployment(self, deployment_id: str, deployment: pb.Deployment) -> pb.Deployment:
        def work(session: Session) -> pb.Deployment:
            if session.scalar(select(Deployment).where(Deployment.name == deployment_id)):
                raise AlreadyExists(f"deployments/{deployment_id} already exists")
            row = Deployment(
                name=deployment_id,
                description=deployment.description,
                project=deployment.project,
                labels=dict(deployment.labels),
                servers=list(deployment.servers),
                routes=routes_json(deployment.routes),
                shadow=shadow_json(deployment),
                serving_config=json_format.MessageToDict(deployment.serving_config),
                state="CREATING",
                reason="",
                revision=1,
            )
            session.add(row)
            session.flush()
            self._event(session, row)
            return deployment_to_proto(row)

        return self._write(work, f"deployments/{deployment_id}")

    def get_deployment(self, deployment_id: str) -> pb.Deployment:
        with self.database.session(read_only=True) as session:
            return deployment_to_proto(self._deployment_row(session, deployment_id))

    def all_deployments(self) -> list[pb.Deployment]:
        with self.database.session(read_only=True) as session:
            return [deployment_to_proto(r) for r in session.scalars(select(Deployment))]

    def list_deployments(
        self, page_size: int, page_token: str, filter_text: str
    ) -> tuple[list[pb.Deployment], str]:
        allowed = {"state": Deployment.state, "project": Deployment.project}
        with self.database.session(read_only=True) as session:
            stmt = select(Deployment).where(
                *_equals_filter(filter_text, allowed), *scope.project_filter(Deployment.project)
            )
            rows, token = paginate(
                session, stmt, [Deployment.name, Deployment.id], page_size, page_token
            )
            return [deployment_to_proto(r) for r in rows], token

    def update_deployment(
        self, deployment_id: str, deployment: pb.Deployment, etag: str, state: str
    ) -> pb.Deployment:
        """Replaces the deployment's spec (already merged by the caller); bumps the revision."""

        def work(session: Session) -> pb.Deployment:
            row = self._deployment_row(session, deployment_id)
            require_etag(f"deployments/{deployment_id}", row.etag, etag)
            row.description = deployment.description
            row.labels = dict(deployment.labels)
            row.project = deployment.project
            row.servers = list(deployment.servers)
            row.routes = routes_json(deployment.routes)
            row.shadow = shadow_json(deployment)
            row.serving_config = json_format.MessageToDict(deployment.serving_config)
            row.state, row.reason = state, ""
            row.revision = row.revision + 1
            session.flush()
            self._event(session, row)
            return deployment_to_proto(row)

        return self._write(work, f"deployments/{deployment_id}")

    def set_deployment_state(
        self, deployment_id: str, state: str, reason: str, *, bump_revision: bool = False
    ) -> pb.Deployment | None:
        """Records a state change (and its event); None when the deployment is gone."""

        def work(session: Session) -> pb.Deployment | None:
            row = session.scalar(select(Deployment).where(Deployment.name == deployment_id))
            if row is None:
                return None
            if (row.state, row.reason) != (state, reason) or bump_revision:
                row.state, row.reason = state, reason
                if bump_revision:
                    row.revision = row.revision + 1
                session.flush()
                self._event(session, row)
            return deployment_to_proto(row)

        return self._write(work, f"deployments/{deployment_id}")

    def delete_deployment(self, deployment_id: str, etag: str) -> pb.Deployment:
        def work(session: Session) -> pb.Deployment:
            row = self._deployment_row(session, deployment_id)
            require_etag(f"deployments/{deployment_id}", row.etag, etag)
            row.state = "DELETING"
            self._event(session, row)
            gone = deployment_to_proto(row)
            session.delete(row)
            return gone

        return self._write(work, f"deployments/{deployment_id}")

    def _event(self, session: Session, row: Deployment) -> None:
        add_event(
            session,
            TOPIC_DEPLOYMENT_UPDATED,
            events_pb2.DeploymentUpdated(
                deployment=f"deployments/{row.name}", state=row.state, reason=row.reason
            ),
            subject=f"deployments/{row.name}",
            source=SOURCE,
        )
