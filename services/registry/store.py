"""Persistence of the registry: an abstract :class:`RegistryStore` and its SQL backend.

The store is synchronous (the servicer calls it through ``asyncio.to_thread``),
runs each call in one transaction, writes the outbox events of a change in the
same transaction as the change, and never lets an ORM row out: it returns
protos of ``aimass.registry.v1`` or small dataclasses.

Version numbers are allocated under a lock on the model's row (``SELECT ...
FOR UPDATE`` on PostgreSQL; SQLite takes the database write lock at BEGIN
IMMEDIATE), inside the transaction that inserts the version: concurrent
creators get distinct numbers, and a failed create rolls its number back, so
the numbers of a model have no gaps.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import ColumnElement, Select, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from aimass.common.v1 import common_pb2
from aimass.core.auth import scope
from aimass.core.db.base import utcnow
from aimass.core.db.columns import new_etag, require_etag
from aimass.core.db.engine import Database
from aimass.core.db.models import (
    Alias,
    AliasMove,
    Deployment,
    ModelArtifact,
    ModelVersion,
    RegisteredModel,
    Release,
    VersionMetric,
    VersionTag,
)
from aimass.core.db.pagination import paginate
from aimass.core.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from aimass.core.events import add_event
from aimass.events.v1 import events_pb2
from aimass.registry.filters import Condition, OrderKey
from aimass.registry.names import parse_version_name
from aimass.registry.v1 import registry_pb2 as pb

SOURCE = "registry"
TOPIC_VERSION_CREATED = "aimass.registry.version.created"
TOPIC_VERSION_DELETED = "aimass.registry.version.deleted"
TOPIC_ALIAS_MOVED = "aimass.registry.alias.moved"

MODEL_MUTABLE = ("description", "tags", "owner", "project")
VERSION_MUTABLE = ("description", "tags", "metrics", "model_card")

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def model_name(model_id: str) -> str:
    return f"models/{model_id}"


def version_name(model_id: str, number: int) -> str:
    return f"models/{model_id}/versions/{number}"


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact of a version lives and what its bytes hash to."""

    kind: str
    uri: str
    sha256: str
    size_bytes: int
    file_name: str


@dataclass(frozen=True)
class ReleaseBundle:
    """The stored .tar.gz of a release."""

    uri: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Page:
    """One page of a list and the token of the next ("" on the last)."""

    items: list[Any]
    next_page_token: str


class RegistryStore(abc.ABC):
    """What the registry servicer needs from persistence."""

    @abc.abstractmethod
    def create_model(self, model_id: str, model: pb.RegisteredModel) -> pb.RegisteredModel: ...

    @abc.abstractmethod
    def get_model(self, model_id: str) -> pb.RegisteredModel: ...

    @abc.abstractmethod
    def list_models(
        self, conditions: Sequence[Condition], order: OrderKey | None, size: int, token: str
    ) -> Page: ...

    @abc.abstractmethod
    def update_model(
        self, model_id: str, model: pb.RegisteredModel, paths: Sequence[str]
    ) -> pb.RegisteredModel: ...

    @abc.abstractmethod
    def delete_model(self, model_id: str, etag: str) -> None: ...

    @abc.abstractmethod
    def create_version(
        self,
        model_id: str,
        version: pb.ModelVersion,
        *,
        creator: str,
        request_id: str = "",
        create_model: bool = False,
    ) -> pb.ModelVersion: ...

    @abc.abstractmethod
    def get_version(self, model_id: str, number: int) -> pb.ModelVersion: ...

    @abc.abstractmethod
    def list_versions(
        self,
        model_id: str | None,
        conditions: Sequence[Condition],
        order: OrderKey | None,
        size: int,
        token: str,
    ) -> Page: ...

    @abc.abstractmethod
    def update_version(
        self, model_id: str, number: int, version: pb.ModelVersion, paths: Sequence[str]
    ) -> pb.ModelVersion: ...

    @abc.abstractmethod
    def log_metrics(
        self, model_id: str, number: int, metrics: Sequence[common_pb2.Metric]
    ) -> pb.ModelVersion: ...

    @abc.abstractmethod
    def delete_version(self, model_id: str, number: int, etag: str) -> None: ...

    @abc.abstractmethod
    def get_artifact(self, model_id: str, number: int, kind: str) -> ArtifactRef: ...

    @abc.abstractmethod
    def set_alias(
        self, model_id: str, alias: str, number: int, expected: int, moved_by: str
    ) -> pb.Alias: ...

    @abc.abstractmethod
    def get_alias(self, model_id: str, alias: str) -> pb.Alias: ...

    @abc.abstractmethod
    def list_aliases(self, model_id: str, size: int, token: str) -> Page: ...

    @abc.abstractmethod
    def delete_alias(self, model_id: str, alias: str, moved_by: str) -> None: ...

    @abc.abstractmethod
    def list_alias_history(self, model_id: str, size: int, token: str) -> Page: ...

    @abc.abstractmethod
    def get_lineage(self, model_id: str, number: int, depth: int) -> pb.Lineage: ...

    @abc.abstractmethod
    def require_new_release(self, model_id: str, number: int, release_id: str) -> None: ...

    @abc.abstractmethod
    def create_release(
        self,
        model_id: str,
        number: int,
        release_id: str,
        description: str,
        bundle: ReleaseBundle,
        creator: str,
    ) -> pb.Release: ...

    @abc.abstractmethod
    def get_release(self, model_id: str, number: int, release_id: str) -> pb.Release: ...

    @abc.abstractmethod
    def list_releases(self, model_id: str, number: int, size: int, token: str) -> Page: ...


class SqlRegistryStore(RegistryStore):
    """The registry over SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ models

    def create_model(self, model_id: str, model: pb.RegisteredModel) -> pb.RegisteredModel:
        with self.db.session(resource=model_name(model_id)) as session:
            row = RegisteredModel(
                name=model_id,
                description=model.description,
                tags=dict(model.tags),
                owner=model.owner,
                project=model.project,
                latest_version=0,
            )
            session.add(row)
            session.flush()
            return _model_pb(row)

    def get_model(self, model_id: str) -> pb.RegisteredModel:
        with self.db.session(read_only=True) as session:
            return _model_pb(_model_row(session, model_id))

    def list_models(
        self, conditions: Sequence[Condition], order: OrderKey | None, size: int, token: str
    ) -> Page:
        stmt = select(RegisteredModel).where(*(_model_condition(c) for c in conditions))
        column: Any = {
            None: RegisteredModel.name,
            "name": RegisteredModel.name,
            "create_time": RegisteredModel.create_time,
            "update_time": RegisteredModel.update_time,
        }[order.field if order else None]
        keys = [column.desc() if order and order.descending else column]
        if column is not RegisteredModel.name:
            keys.append(
                RegisteredModel.id.desc() if order and order.descending else RegisteredModel.id
            )
        with self.db.session(read_only=True) as session:
            rows, next_token = paginate(session, stmt, keys, size, token)
            return Page([_model_pb(row) for row in rows], next_token)

    def update_model(
        self, model_id: str, model: pb.RegisteredModel, paths: Sequence[str]
    ) -> pb.RegisteredModel:
        with self.db.session(resource=model_name(model_id)) as session:
            row = _model_row(session, model_id, lock=True)
            require_etag(model_name(model_id), row.etag, model.etag)
            for path in paths:
                value = dict(model.tags) if path == "tags" else getattr(model, path)
                setattr(row, path, value)
            row.etag = new_etag()
            session.flush()
            return _model_pb(row)

    def delete_model(self, model_id: str, etag: str) -> None:
        name = model_name(model_id)
        with self.db.session(resource=name) as session:
            row = _model_row(session, model_id, lock=True)
            require_etag(name, row.etag, etag)
            aliases = session.scalars(select(Alias.name).where(Alias.model_id == row.id)).all()
            if aliases:
                raise FailedPrecondition(
                    f"{name} has aliases ({', '.join(sorted(aliases))}): delete them first"
                )
            numbers = session.scalars(
                select(ModelVersion.version).where(ModelVersion.model_id == row.id)
            ).all()
            names = {version_name(model_id, n) for n in numbers}
            _refuse_deployed(session, names)
            _refuse_children_elsewhere(session, row.id)
            for version in sorted(numbers):
                _version_deleted_event(session, version_name(model_id, version))
            session.execute(delete(AliasMove).where(AliasMove.model_id == row.id))
            # Children first: a version's parent link points into the same model.
            session.execute(
                update(ModelVersion)
                .where(ModelVersion.model_id == row.id)
                .values(parent_version_id=None)
            )
            session.delete(row)

    # ---------------------------------------------------------------- versions

    def create_version(
        self,
        model_id: str,
        version: pb.ModelVersion,
        *,
        creator: str,
        request_id: str = "",
        create_model: bool = False,
    ) -> pb.ModelVersion:
        with self.db.session(resource=model_name(model_id)) as session:
            model = _locked_model_or_new(session, model_id, creator if create_model else None)
            if request_id:
                earlier = session.scalar(
                    select(ModelVersion).where(
                        ModelVersion.model_id == model.id, ModelVersion.request_id == request_id
                    )
                )
                if earlier is not None:
                    return _version_pb(session, earlier)
            parent = _parent_row(session, version.source.parent_version)
            number = session.execute(
                update(RegisteredModel)
                .where(RegisteredModel.id == model.id)
                .values(
                    latest_version=RegisteredModel.latest_version + 1,
                    # Not an edit of the model: its etag and update_time stay.
                    etag=RegisteredModel.etag,
                    update_time=RegisteredModel.update_time,
                )
                .returning(RegisteredModel.latest_version)
                .execution_options(synchronize_session=False)
            ).scalar_one()
            row = _new_version_row(model.id, number, version, parent, creator, request_id)
            session.add(row)
            session.flush()
            name = version_name(model_id, number)
            add_event(
                session,
                TOPIC_VERSION_CREATED,
                events_pb2.ModelVersionCreated(
                    model_version=name, parent_version=version.source.parent_version
                ),
                subject=name,
                source=SOURCE,
            )
            return _version_pb(session, row)

    def get_version(self, model_id: str, number: int) -> pb.ModelVersion:
        with self.db.session(read_only=True) as session:
            return _version_pb(session, _version_row(session, model_id, number))

    def list_versions(
        self,
        model_id: str | None,
        conditions: Sequence[Condition],
        order: OrderKey | None,
        size: int,
        token: str,
    ) -> Page:
        with self.db.session(read_only=True) as session:
            stmt = select(ModelVersion)
            if model_id is not None:
                stmt = stmt.where(ModelVersion.model_id == _model_row(session, model_id).id)
            elif scope.caller_project():
                # A search across models sees the caller's project's models only.
                in_project = select(RegisteredModel.id).where(
                    *scope.project_filter(RegisteredModel.project)
                )
                stmt = stmt.where(ModelVersion.model_id.in_(in_project))
            stmt = stmt.where(*(_version_condition(c) for c in conditions))
            stmt, keys = _version_order(stmt, order, default_desc=model_id is None)
            rows, next_token = paginate(session, stmt, keys, size, token)
            return Page([_version_pb(session, row) for row in rows], next_token)

    def update_version(
        self, model_id: str, number: int, version: pb.ModelVersion, paths: Sequence[str]
    ) -> pb.ModelVersion:
        name = version_name(model_id, number)
        with self.db.session(resource=name) as session:
            row = _version_row(session, model_id, number, lock=True)
            require_etag(name, row.etag, version.etag)
            for path in paths:
                if path == "tags":
                    _replace_tags(session, row, dict(version.tags))
                elif path == "metrics":
                    _replace_metrics(session, row, version.metrics)
                else:
                    setattr(row, path, getattr(version, path))
            row.etag = new_etag()
            session.flush()
            session.refresh(row)
            return _version_pb(session, row)

    def log_metrics(
        self, model_id: str, number: int, metrics: Sequence[common_pb2.Metric]
    ) -> pb.ModelVersion:
        name = version_name(model_id, number)
        with self.db.session(resource=name) as session:
            row = _version_row(session, model_id, number, lock=True)
            existing = {(m.source, m.name): m for m in row.metrics}
            for metric in metrics:
                current = existing.get((metric.source, metric.name))
                if current is None:
                    row.metrics.append(_metric_row(metric))
                else:
                    current.value = metric.value
                    current.lower = metric.lower if metric.lower or metric.upper else None
                    current.upper = metric.upper if metric.lower or metric.upper else None
            row.etag = new_etag()
            session.flush()
            return _version_pb(session, row)

    def delete_version(self, model_id: str, number: int, etag: str) -> None:
        name = version_name(model_id, number)
        with self.db.session(resource=name) as session:
            row = _version_row(session, model_id, number, lock=True)
            require_etag(name, row.etag, etag)
            aliases = session.scalars(
                select(Alias.name).where(Alias.model_id == row.model_id, Alias.version == number)
            ).all()
            if aliases:
                raise FailedPrecondition(
                    f"{name} is used by alias {', '.join(sorted(aliases))}: "
                    "move or delete the alias first"
                )
            _refuse_deployed(session, {name})
            children = session.scalars(
                select(ModelVersion).where(ModelVersion.parent_version_id == row.id)
            ).all()
            if children:
                child_names = ", ".join(_name_of(c) for c in children)
                raise FailedPrecondition(
                    f"{name} is the parent of {child_names}: delete the children first"
                )
            session.delete(row)
            _version_deleted_event(session, name)

    def get_artifact(self, model_id: str, number: int, kind: str) -> ArtifactRef:
        with self.db.session(read_only=True) as session:
            row = _version_row(session, model_id, number)
            for artifact in row.artifacts:
                if artifact.kind == kind:
                    return ArtifactRef(
                        artifact.kind,
                        artifact.uri,
                        artifact.sha256,
                        artifact.size_bytes,
                        artifact.file_name,
                    )
            kinds = ", ".join(a.kind for a in row.artifacts) or "none"
            raise NotFound(
                f"{version_name(model_id, number)} has no {kind!r} artifact (it has: {kinds})"
            )

    # ----------------------------------------------------------------- aliases

    def set_alias(
        self, model_id: str, alias: str, number: int, expected: int, moved_by: str
    ) -> pb.Alias:
        with self.db.session(resource=f"models/{model_id}/aliases/{alias}") as session:
            model = _model_row(session, model_id, lock=True)
            _version_row(session, model_id, number, field="version")
            row = session.scalar(
                select(Alias)
                .where(Alias.model_id == model.id, Alias.name == alias)
                .with_for_update()
            )
            old = row.version if row is not None else 0
            if expected and expected != old:
                current = f"version {old}" if old else "no version"
                raise Aborted(
                    f"models/{model_id}/aliases/{alias} points at {current}, "
                    f"not the expected version {expected}: read it again and retry"
                )
            if row is not None and old == number:
                return _alias_pb(model_id, row)
            if row is None:
                row = Alias(model_id=model.id, name=alias, version=number, updated_by=moved_by)
                session.add(row)
            else:
                row.version = number
                row.updated_by = moved_by
                row.update_time = utcnow()
            _record_move(session, model.id, model_id, alias, old, number, moved_by)
            session.flush()
            return _alias_pb(model_id, row)

    def get_alias(self, model_id: str, alias: str) -> pb.Alias:
        with self.db.session(read_only=True) as session:
            return _alias_pb(model_id, _alias_row(session, model_id, alias))

    def list_aliases(self, model_id: str, size: int, token: str) -> Page:
        with self.db.session(read_only=True) as session:
            model = _model_row(session, model_id)
            stmt = select(Alias).where(Alias.model_id == model.id)
            rows, next_token = paginate(session, stmt, [Alias.name, Alias.id], size, token)
            return Page([_alias_pb(model_id, row) for row in rows], next_token)

    def delete_alias(self, model_id: str, alias: str, moved_by: str) -> None:
        with self.db.session() as session:
            row = _alias_row(session, model_id, alias, lock=True)
            _record_move(session, row.model_id, model_id, alias, row.version, 0, moved_by)
            session.delete(row)

    def list_alias_history(self, model_id: str, size: int, token: str) -> Page:
        with self.db.session(read_only=True) as session:
            model = _model_row(session, model_id)
            stmt = select(AliasMove).where(AliasMove.model_id == model.id)
            rows, next_token = paginate(session, stmt, [AliasMove.id], size, token)
            moves = [
                pb.AliasMove(
                    alias=f"models/{model_id}/aliases/{row.alias}",
                    old_version=row.old_version,
                    new_version=row.new_version,
                    moved_by=row.moved_by,
                    move_time=_timestamp(row.move_time),
                )
                for row in rows
            ]
            return Page(moves, next_token)

    # ----------------------------------------------------------------- lineage

    def get_lineage(self, model_id: str, number: int, depth: int) -> pb.Lineage:
        with self.db.session(read_only=True) as session:
            row = _version_row(session, model_id, number)
            lineage = pb.Lineage(name=version_name(model_id, number))
            lineage.ancestors.extend(_ancestor_nodes(row))
            lineage.descendants.extend(_descendant_nodes(session, row, depth))
            return lineage

    # ---------------------------------------------------------------- releases

    def require_new_release(self, model_id: str, number: int, release_id: str) -> None:
        with self.db.session(read_only=True) as session:
            row = _version_row(session, model_id, number)
            taken = session.scalar(
                select(Release.id).where(Release.version_id == row.id, Release.name == release_id)
            )
            if taken is not None:
                raise _release_exists(model_id, number, release_id)

    def create_release(
        self,
        model_id: str,
        number: int,
        release_id: str,
        description: str,
        bundle: ReleaseBundle,
        creator: str,
    ) -> pb.Release:
        resource = f"{version_name(model_id, number)}/releases/{release_id}"
        with self.db.session(resource=resource) as session:
            version = _version_row(session, model_id, number)
            row = Release(
                version_id=version.id,
                name=release_id,
                description=description,
                bundle_uri=bundle.uri,
                bundle_size_bytes=bundle.size_bytes,
                bundle_sha256=bundle.sha256,
                creator=creator,
            )
            session.add(row)
            session.flush()
            return _release_pb(model_id, number, row)

    def get_release(self, model_id: str, number: int, release_id: str) -> pb.Release:
        with self.db.session(read_only=True) as session:
            version = _version_row(session, model_id, number)
            row = session.scalar(
                select(Release).where(Release.version_id == version.id, Release.name == release_id)
            )
            if row is None:
                raise NotFound(f"{version_name(model_id, number)}/releases/{release_id} not found")
            return _release_pb(model_id, number, row)

    def list_releases(self, model_id: str, number: int, size: int, token: str) -> Page:
        with self.db.session(read_only=True) as session:
            version = _version_row(session, model_id, number)
            stmt = select(Release).where(Release.version_id == version.id)
            rows, next_token = paginate(session, stmt, [Release.id], size, token)
            return Page([_release_pb(model_id, number, row) for row in rows], next_token)


# ====================================================================== helpers


def _release_exists(model_id: str, number: int, release_id: str) -> AlreadyExists:
    return AlreadyExists(f"{version_name(model_id, number)}/releases/{release_id} already exists")


def _model_row(session: Session, model_id: str, *, lock: bool = False) -> RegisteredModel:
    stmt = select(RegisteredModel).where(RegisteredModel.name == model_id)
    row = session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFound(f"{model_name(model_id)} not found")
    return row


def _locked_model_or_new(session: Session, model_id: str, owner: str | None) -> RegisteredModel:
    """The model's row, locked; created first when ``owner`` is given and it is missing."""
    stmt = select(RegisteredModel).where(RegisteredModel.name == model_id).with_for_update()
    row = session.scalar(stmt)
    if row is None and owner is not None:
        # An import by a scoped caller creates the model in the caller's project.
        project = scope.caller_project()
        session.add(
            RegisteredModel(name=model_id, owner=owner, tags={}, latest_version=0, project=project)
        )
        session.flush()
        row = session.scalar(stmt)
    if row is None:
        raise NotFound(f"{model_name(model_id)} not found")
    return row


def _version_row(
    session: Session, model_id: str, number: int, *, lock: bool = False, field: str = ""
) -> ModelVersion:
    stmt = (
        select(ModelVersion)
        .join(RegisteredModel, ModelVersion.model_id == RegisteredModel.id)
        .where(RegisteredModel.name == model_id, ModelVersion.version == number)
    )
    row = session.scalar(stmt.with_for_update(of=ModelVersion) if lock else stmt)
    if row is None:
        prefix = f"{field}: " if field else ""
        raise NotFound(f"{prefix}{version_name(model_id, number)} not found")
    return row


def _alias_row(session: Session, model_id: str, alias: str, *, lock: bool = False) -> Alias:
    stmt = (
        select(Alias)
        .join(RegisteredModel, Alias.model_id == RegisteredModel.id)
        .where(RegisteredModel.name == model_id, Alias.name == alias)
    )
    row = session.scalar(stmt.with_for_update(of=Alias) if lock else stmt)
    if row is None:
        raise NotFound(f"models/{model_id}/aliases/{alias} not found")
    return row


def _parent_row(session: Session, parent_name: str) -> ModelVersion | None:
    if not parent_name:
        return None
    model_id, number = parse_version_name(parent_name, "model_version.source.parent_version")
    try:
        return _version_row(session, model_id, number)
    except NotFound as err:
        raise NotFound(f"model_version.source.parent_version: {parent_name} not found") from err


def _name_of(row: ModelVersion) -> str:
    return version_name(row.model.name, row.version)


def _refuse_deployed(session: Session, names: set[str]) -> None:
    """FailedPrecondition when a deployment routes (or mirrors) traffic to one of ``names``."""
    for deployment, routes, shadow in session.execute(
        select(Deployment.name, Deployment.routes, Deployment.shadow)
    ):
        used = {str(r.get("model_version", "")) for r in routes or []}
        used.add(str((shadow or {}).get("model_version", "")))
        hit = sorted(used & names)
        if hit:
            raise FailedPrecondition(
                f"{hit[0]} is used by deployments/{deployment}: "
                "route its traffic elsewhere or delete the deployment first"
            )


def _refuse_children_elsewhere(session: Session, model_pk: int) -> None:
    parent = ModelVersion.__table__.alias("parent")
    child = session.scalar(
        select(ModelVersion)
        .join(parent, ModelVersion.parent_version_id == parent.c.id)
        .where(parent.c.model_id == model_pk, ModelVersion.model_id != model_pk)
        .limit(1)
    )
    if child is not None:
        raise FailedPrecondition(
            f"{_name_of(child)} was derived from a version of this model: delete it first"
        )


def _record_move(
    session: Session, model_pk: int, model_id: str, alias: str, old: int, new: int, who: str
) -> None:
    session.add(
        AliasMove(
            model_id=model_pk,
            alias=alias,
            old_version=old,
            new_version=new,
            moved_by=who,
            move_time=utcnow(),
        )
    )
    name = f"models/{model_id}/aliases/{alias}"
    add_event(
        session,
        TOPIC_ALIAS_MOVED,
        events_pb2.AliasMoved(alias=name, old_version=old, new_version=new, moved_by=who),
        subject=name,
        source=SOURCE,
    )


def _version_deleted_event(session: Session, name: str) -> None:
    add_event(
        session,
        TOPIC_VERSION_DELETED,
        events_pb2.ModelVersionDeleted(model_version=name),
        subject=name,
        source=SOURCE,
    )


def _new_version_row(
    model_pk: int,
    number: int,
    version: pb.ModelVersion,
    parent: ModelVersion | None,
    creator: str,
    request_id: str,
) -> ModelVersion:
    source = version.source
    return ModelVersion(
        model_id=model_pk,
        version=number,
        description=version.description,
        signature=json_format.MessageToDict(version.signature),
        framework=version.framework,
        opset=version.opset or None,
        config=json_format.MessageToDict(version.config.values),
        model_card=version.model_card,
        parameter_count=version.parameter_count or None,
        source_dataset_version=source.dataset_version,
        source_job=source.job,
        parent_version_id=parent.id if parent is not None else None,
        derivation=source.derivation,
        imported_lineage=dict(source.imported_lineage),
        creator=creator,
        request_id=request_id or None,
        artifacts=[
            ModelArtifact(
                kind=a.kind,
                uri=a.uri,
                size_bytes=a.size_bytes,
                sha256=a.sha256,
                file_name=a.file_name,
            )
            for a in version.artifacts
        ],
        metrics=[_metric_row(m) for m in version.metrics],
        tags=[VersionTag(key=k, value=v) for k, v in sorted(version.tags.items())],
    )


def _metric_row(metric: common_pb2.Metric) -> VersionMetric:
    interval = bool(metric.lower or metric.upper)
    return VersionMetric(
        name=metric.name,
        value=metric.value,
        lower=metric.lower if interval else None,
        upper=metric.upper if interval else None,
        source=metric.source,
    )


def _replace_tags(session: Session, row: ModelVersion, tags: dict[str, str]) -> None:
    # Delete first in its own statement: the new rows reuse the (version, key) keys.
    session.execute(delete(VersionTag).where(VersionTag.version_id == row.id))
    session.expire(row, ["tags"])
    for key, value in sorted(tags.items()):
        session.add(VersionTag(version_id=row.id, key=key, value=value))


def _replace_metrics(
    session: Session, row: ModelVersion, metrics: Sequence[common_pb2.Metric]
) -> None:
    session.execute(delete(VersionMetric).where(VersionMetric.version_id == row.id))
    session.expire(row, ["metrics"])
    for metric in metrics:
        new = _metric_row(metric)
        new.version_id = row.id
        session.add(new)


# ------------------------------------------------------------------ filters


def _version_condition(condition: Condition) -> ColumnElement[bool]:
    compare = _COMPARE[condition.op]
    if condition.field == "metrics":
        return exists().where(
            VersionMetric.version_id == ModelVersion.id,
            VersionMetric.name == condition.key,
            compare(VersionMetric.value, condition.value),
        )
    if condition.field == "tags":
        match = exists().where(
            VersionTag.version_id == ModelVersion.id,
            VersionTag.key == condition.key,
            VersionTag.value == condition.value,
        )
    elif condition.field == "alias":
        match = exists().where(
            Alias.model_id == ModelVersion.model_id,
            Alias.version == ModelVersion.version,
            Alias.name == condition.value,
        )
    elif condition.field == "dataset_version":
        match = ModelVersion.source_dataset_version == condition.value
    else:  # model
        match = ModelVersion.model_id.in_(
            select(RegisteredModel.id).where(RegisteredModel.name == condition.value)
        )
    return match if condition.op == "=" else ~match


def _model_condition(condition: Condition) -> ColumnElement[bool]:
    if condition.field == "tags":
        column: Any = RegisteredModel.tags[condition.key].as_string()
        if condition.op == "=":
            return column == condition.value
        return or_(column.is_(None), column != condition.value)
    column = {"owner": RegisteredModel.owner, "project": RegisteredModel.project}.get(
        condition.field, RegisteredModel.name
    )
    return _COMPARE[condition.op](column, condition.value)


def _version_order(
    stmt: Select[Any], order: OrderKey | None, *, default_desc: bool
) -> tuple[Select[Any], list[Any]]:
    """The statement joined as the order needs, and its total order (id last)."""
    if order is None:
        column: Any = ModelVersion.create_time if default_desc else ModelVersion.version
        descending = default_desc
    elif order.field == "metrics":
        best = (
            select(
                VersionMetric.version_id.label("version_id"),
                func.max(VersionMetric.value).label("value"),
            )
            .where(VersionMetric.name == order.key)
            .group_by(VersionMetric.version_id)
            .subquery("order_metric")
        )
        # Versions without the metric have no place in that order: they are left out.
        stmt = stmt.join(best, best.c.version_id == ModelVersion.id)
        column, descending = best.c.value, order.descending
    else:
        column = {
            "create_time": ModelVersion.create_time,
            "version": ModelVersion.version,
        }[order.field]
        descending = order.descending
    direction: Callable[[Any], Any] = (lambda c: c.desc()) if descending else (lambda c: c.asc())
    return stmt, [direction(column), direction(ModelVersion.id)]


# ------------------------------------------------------------------ to protos


def _timestamp(value: datetime | None) -> Timestamp:
    stamp = Timestamp()
    if value is not None:
        stamp.FromDatetime(value)
    return stamp


def _model_pb(row: RegisteredModel) -> pb.RegisteredModel:
    return pb.RegisteredModel(
        name=model_name(row.name),
        description=row.description or "",
        tags=dict(row.tags or {}),
        owner=row.owner or "",
        project=row.project or "",
        latest_version=row.latest_version,
        create_time=_timestamp(row.create_time),
        update_time=_timestamp(row.update_time),
        etag=row.etag,
    )


def _parse_into(message: Message, value: dict[str, Any]) -> Message:
    json_format.ParseDict(value or {}, message, ignore_unknown_fields=True)
    return message


def _version_pb(session: Session, row: ModelVersion) -> pb.ModelVersion:
    model_id = row.model.name
    aliases = session.scalars(
        select(Alias.name)
        .where(Alias.model_id == row.model_id, Alias.version == row.version)
        .order_by(Alias.name)
    ).all()
    config = common_pb2.Config()
    config.values.CopyFrom(_parse_into(struct_pb2.Struct(), row.config))
    return pb.ModelVersion(
        name=version_name(model_id, row.version),
        version=row.version,
        description=row.description or "",
        artifacts=[
            common_pb2.Artifact(
                kind=a.kind,
                uri=a.uri,
                size_bytes=a.size_bytes,
                sha256=a.sha256,
                file_name=a.file_name,
            )
            for a in row.artifacts
        ],
        signature=_parse_into(common_pb2.Signature(), row.signature),
        framework=row.framework or "",
        opset=row.opset or 0,
        config=config,
        metrics=[
            common_pb2.Metric(
                name=m.name,
                value=m.value,
                lower=m.lower or 0.0,
                upper=m.upper or 0.0,
                source=m.source or "",
            )
            for m in row.metrics
        ],
        tags={t.key: t.value for t in row.tags},
        model_card=row.model_card or "",
        source=pb.VersionSource(
            dataset_version=row.source_dataset_version or "",
            job=row.source_job or "",
            parent_version=_name_of(row.parent) if row.parent is not None else "",
            derivation=row.derivation or "",
            imported_lineage=dict(row.imported_lineage or {}),
        ),
        aliases=list(aliases),
        parameter_count=row.parameter_count or 0,
        create_time=_timestamp(row.create_time),
        update_time=_timestamp(row.update_time),
        etag=row.etag,
        creator=row.creator or "",
    )


def _alias_pb(model_id: str, row: Alias) -> pb.Alias:
    return pb.Alias(
        name=f"models/{model_id}/aliases/{row.name}",
        version=row.version,
        update_time=_timestamp(row.update_time),
        updated_by=row.updated_by or "",
    )


def _release_pb(model_id: str, number: int, row: Release) -> pb.Release:
    return pb.Release(
        name=f"{version_name(model_id, number)}/releases/{row.name}",
        description=row.description or "",
        bundle=common_pb2.Artifact(
            kind="bundle",
            uri=row.bundle_uri,
            size_bytes=row.bundle_size_bytes,
            sha256=row.bundle_sha256,
            file_name=f"{model_id}-{number}-{row.name}.tar.gz",
        ),
        create_time=_timestamp(row.create_time),
    )


# ------------------------------------------------------------------ lineage


def _job_kind(job: str) -> str:
    if job.startswith("trainingJobs/"):
        return "training_job"
    if job.startswith("compressionJobs/"):
        return "compression_job"
    return "job"


def _version_nodes(row: ModelVersion, parent: str) -> list[pb.LineageNode]:
    """The job node (when there is one) and the version node, linked to ``parent``."""
    nodes: list[pb.LineageNode] = []
    if row.source_job:
        nodes.append(
            pb.LineageNode(name=row.source_job, kind=_job_kind(row.source_job), parent=parent)
        )
        parent = row.source_job
    nodes.append(
        pb.LineageNode(
            name=_name_of(row), kind="model_version", parent=parent, derivation=row.derivation or ""
        )
    )
    return nodes


def _ancestor_nodes(row: ModelVersion) -> list[pb.LineageNode]:
    chain: list[ModelVersion] = []
    seen: set[int] = set()
    current: ModelVersion | None = row
    while current is not None and current.id not in seen:
        seen.add(current.id)
        chain.append(current)
        current = current.parent
    chain.reverse()
    nodes: list[pb.LineageNode] = []
    previous = ""
    for version in chain:
        parent = previous
        if version.source_dataset_version:
            nodes.append(
                pb.LineageNode(
                    name=version.source_dataset_version, kind="dataset_version", parent=previous
                )
            )
            parent = version.source_dataset_version
        nodes.extend(_version_nodes(version, parent))
        previous = _name_of(version)
    return nodes


def _descendant_nodes(session: Session, row: ModelVersion, depth: int) -> list[pb.LineageNode]:
    nodes: list[pb.LineageNode] = []
    frontier = [row]
    seen = {row.id}
    level = 0
    while frontier and (depth <= 0 or level < depth):
        children = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.parent_version_id.in_([v.id for v in frontier]))
            .order_by(ModelVersion.parent_version_id, ModelVersion.id)
        ).all()
        frontier = [child for child in children if child.id not in seen]
        for child in frontier:
            seen.add(child.id)
            nodes.extend(_version_nodes(child, _name_of(child.parent)))  # type: ignore[arg-type]
        level += 1
    return nodes
