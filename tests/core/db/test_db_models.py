"""CRUD on a representative set of tables, on SQLite and PostgreSQL, with their constraints."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, func, select, update

from aimass.core.db.columns import new_etag, require_etag
from aimass.core.db.models import (
    Alias,
    ApiKey,
    Dataset,
    DatasetVersion,
    Deployment,
    InferenceServer,
    ModelArtifact,
    ModelVersion,
    RegisteredModel,
    TrainingJob,
    VersionMetric,
    VersionTag,
)
from aimass.core.errors import Aborted, AlreadyExists, FailedPrecondition


def add_model(database, name="digits", versions=2) -> int:
    """A model with ``versions`` versions, each with an artifact, metrics and a tag."""
    with database.session() as session:
        model = RegisteredModel(name=name, tags={"team": "vision"}, latest_version=versions)
        for number in range(1, versions + 1):
            model.versions.append(
                ModelVersion(
                    version=number,
                    framework="onnx",
                    signature={"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]},
                    artifacts=[
                        ModelArtifact(
                            kind="onnx",
                            uri=f"file:///a/{number}",
                            size_bytes=100,
                            sha256=f"{number:064x}",
                            file_name="model.onnx",
                        )
                    ],
                    metrics=[
                        VersionMetric(name="accuracy", value=0.9 + number / 100, source="eval"),
                        VersionMetric(name="f1", value=0.8, lower=0.78, upper=0.82, source="eval"),
                    ],
                    tags=[VersionTag(key="stage", value="qa" if number == 1 else "prod")],
                )
            )
        session.add(model)
        session.flush()
        return model.id


def count(database, table) -> int:
    with database.session(read_only=True) as session:
        return session.scalar(select(func.count()).select_from(table))


def test_registered_model_create_read_update_delete(database):
    model_id = add_model(database, versions=0)

    with database.session(read_only=True) as session:
        model = session.get(RegisteredModel, model_id)
        assert (model.name, model.tags, model.latest_version) == ("digits", {"team": "vision"}, 0)
        first_etag, first_update = model.etag, model.update_time

    with database.session() as session:
        model = session.get(RegisteredModel, model_id)
        model.description = "handwritten digits"
        model.tags = {**model.tags, "task": "classification"}

    with database.session(read_only=True) as session:
        model = session.get(RegisteredModel, model_id)
        assert model.description == "handwritten digits"
        assert model.tags == {"team": "vision", "task": "classification"}
        assert model.etag != first_etag
        assert model.update_time >= first_update

    with database.session() as session:
        session.delete(session.get(RegisteredModel, model_id))
    assert count(database, RegisteredModel) == 0


def test_versions_keep_artifacts_metrics_and_tags_in_their_own_tables(database):
    add_model(database, versions=3)

    with database.session(read_only=True) as session:
        # "metrics.accuracy > 0.915": an indexed query on version_metrics.
        numbers = session.scalars(
            select(ModelVersion.version)
            .join(VersionMetric)
            .where(VersionMetric.name == "accuracy", VersionMetric.value > 0.915)
            .order_by(ModelVersion.version)
        ).all()
        prod = session.scalars(
            select(ModelVersion.version)
            .join(VersionTag)
            .where(VersionTag.key == "stage", VersionTag.value == "prod")
            .order_by(ModelVersion.version)
        ).all()
        version = session.scalars(select(ModelVersion).where(ModelVersion.version == 1)).one()
        artifact = version.artifacts[0]
        metrics = {(m.name, m.value, m.lower, m.upper) for m in version.metrics}

    assert numbers == [2, 3]
    assert prod == [2, 3]
    assert (artifact.kind, artifact.file_name, artifact.size_bytes) == ("onnx", "model.onnx", 100)
    assert metrics == {("accuracy", 0.91, None, None), ("f1", 0.8, 0.78, 0.82)}


def test_version_number_is_unique_per_model(database):
    model_id = add_model(database, versions=1)
    other_id = add_model(database, name="other", versions=0)

    with (
        pytest.raises(AlreadyExists, match="models/digits/versions/1 already exists"),
        database.session(resource="models/digits/versions/1") as session,
    ):
        session.add(ModelVersion(model_id=model_id, version=1))

    # The same number under another model is fine.
    with database.session() as session:
        session.add(ModelVersion(model_id=other_id, version=1))


def test_request_id_makes_create_idempotent_per_model(database):
    model_id = add_model(database, versions=0)
    with database.session() as session:
        session.add(ModelVersion(model_id=model_id, version=1, request_id="req-1"))
    with pytest.raises(AlreadyExists), database.session() as session:
        session.add(ModelVersion(model_id=model_id, version=2, request_id="req-1"))
    # Versions without a request id never collide.
    with database.session() as session:
        session.add(ModelVersion(model_id=model_id, version=3))
        session.add(ModelVersion(model_id=model_id, version=4))


def test_version_of_a_missing_model_is_failed_precondition(database):
    with (
        pytest.raises(FailedPrecondition, match="models/ghost/versions/1"),
        database.session(resource="models/ghost/versions/1") as session,
    ):
        session.add(ModelVersion(model_id=987654, version=1))
    assert count(database, ModelVersion) == 0


def test_alias_must_point_at_a_version_of_its_own_model(database):
    model_id = add_model(database, versions=2)
    other_id = add_model(database, name="other", versions=0)

    with database.session() as session:
        session.add(Alias(model_id=model_id, name="production", version=2, updated_by="ann"))

    with pytest.raises(FailedPrecondition), database.session() as session:
        session.add(Alias(model_id=model_id, name="staging", version=7))
    # Version 1 exists, but under "digits", not "other".
    with pytest.raises(FailedPrecondition), database.session() as session:
        session.add(Alias(model_id=other_id, name="production", version=1))
    with pytest.raises(AlreadyExists), database.session() as session:
        session.add(Alias(model_id=model_id, name="production", version=1))

    with database.session(read_only=True) as session:
        aliases = session.execute(select(Alias.name, Alias.version)).all()
    assert aliases == [("production", 2)]


def test_a_version_an_alias_points_at_cannot_be_deleted(database):
    model_id = add_model(database, versions=2)
    with database.session() as session:
        session.add(Alias(model_id=model_id, name="production", version=2))

    with pytest.raises(FailedPrecondition), database.session() as session:
        session.execute(
            delete(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == 2)
        )
    assert count(database, ModelVersion) == 2


def test_a_parent_version_with_children_cannot_be_deleted(database):
    model_id = add_model(database, versions=1)
    with database.session() as session:
        parent = session.scalars(select(ModelVersion)).one()
        session.add(
            ModelVersion(model_id=model_id, version=2, parent=parent, derivation="int8-dynamic")
        )

    with pytest.raises(FailedPrecondition), database.session() as session:
        session.execute(delete(ModelVersion).where(ModelVersion.version == 1))

    with database.session(read_only=True) as session:
        child = session.scalars(select(ModelVersion).where(ModelVersion.version == 2)).one()
        assert (child.parent.version, child.derivation) == (1, "int8-dynamic")


def test_deleting_a_model_cascades_to_everything_it_owns(database):
    model_id = add_model(database, versions=2)
    with database.session() as session:
        first = session.scalars(select(ModelVersion).where(ModelVersion.version == 1)).one()
        session.add(ModelVersion(model_id=model_id, version=3, parent=first))
        session.add(Alias(model_id=model_id, name="production", version=1))

    # A bulk delete: the database cascades, no rows are loaded.
    with database.session() as session:
        session.execute(delete(RegisteredModel).where(RegisteredModel.id == model_id))

    for table in (ModelVersion, ModelArtifact, VersionMetric, VersionTag, Alias):
        assert count(database, table) == 0, table.__tablename__


def test_a_failed_block_leaves_nothing_half_written(database):
    add_model(database, name="taken", versions=0)

    def create_fresh_then_taken() -> None:
        with database.session() as session:
            model = RegisteredModel(name="fresh")
            model.versions.append(ModelVersion(version=1))
            session.add(model)
            session.flush()
            session.add(RegisteredModel(name="taken"))

    with pytest.raises(AlreadyExists):
        create_fresh_then_taken()

    with database.session(read_only=True) as session:
        names = session.scalars(select(RegisteredModel.name)).all()
    assert names == ["taken"]
    assert count(database, ModelVersion) == 0


def test_etag_compare_and_swap_lets_one_writer_win(database):
    with database.session() as session:
        session.add(Deployment(name="digits", routes=[{"model_version": "models/d/versions/1"}]))
    with database.session(read_only=True) as session:
        etag = session.scalars(select(Deployment.etag)).one()

    def move_routes(expected: str, version: int) -> int:
        with database.session() as session:
            result = session.execute(
                update(Deployment)
                .where(Deployment.name == "digits", Deployment.etag == expected)
                .values(
                    routes=[{"model_version": f"models/d/versions/{version}", "weight": 100}],
                    revision=Deployment.revision + 1,
                    etag=new_etag(),
                )
            )
            return result.rowcount

    assert move_routes(etag, 2) == 1
    assert move_routes(etag, 3) == 0

    with database.session(read_only=True) as session:
        deployment = session.scalars(select(Deployment)).one()
    assert deployment.revision == 2
    assert deployment.routes == [{"model_version": "models/d/versions/2", "weight": 100}]
    with pytest.raises(Aborted, match="deployments/digits was changed"):
        require_etag("deployments/digits", deployment.etag, etag)
    require_etag("deployments/digits", deployment.etag, deployment.etag)
    require_etag("deployments/digits", deployment.etag, "")


def test_an_inference_server_in_use_cannot_be_deleted(database):
    with database.session() as session:
        server = InferenceServer(name="triton-1", grpc_address="127.0.0.1:8101")
        session.add(Deployment(name="digits", server_id=None))
        session.add(server)
        session.flush()
        session.add(Deployment(name="mnist", server_id=server.id))

    with pytest.raises(FailedPrecondition), database.session() as session:
        session.execute(delete(InferenceServer))
    assert count(database, InferenceServer) == 1


def test_dataset_versions_and_training_trials(database):
    with database.session() as session:
        dataset = Dataset(name="digits", latest_version=1)
        dataset.versions.append(
            DatasetVersion(
                version=1,
                state="READY",
                fingerprint="ab" * 32,
                schema={"fields": [{"name": "label", "type": "int64"}]},
                split_row_counts={"train": 1257, "valid": 270, "test": 270},
                label_distribution={"train": {"0": 125}},
                split_uris={"train": "file:///d/train.parquet"},
                row_count=1797,
            )
        )
        session.add(dataset)
        search = TrainingJob(name="search-1", spec={"kind": "mlp"}, state="RUNNING")
        session.add(search)
        session.flush()
        for trial in range(3):
            session.add(
                TrainingJob(name=f"search-1-trial-{trial}", parent_id=search.id, priority=trial)
            )

    with database.session(read_only=True) as session:
        version = session.scalars(
            select(DatasetVersion).where(DatasetVersion.fingerprint == "ab" * 32)
        ).one()
        assert version.split_row_counts == {"train": 1257, "valid": 270, "test": 270}
        assert version.dataset.name == "digits"
        queued = session.scalars(
            select(TrainingJob.name)
            .where(TrainingJob.state == "QUEUED")
            .order_by(TrainingJob.priority.desc(), TrainingJob.create_time)
        ).all()
    assert queued == ["search-1-trial-2", "search-1-trial-1", "search-1-trial-0"]

    # Deleting the search deletes its trials.
    with database.session() as session:
        session.execute(delete(TrainingJob).where(TrainingJob.name == "search-1"))
    assert count(database, TrainingJob) == 0


def test_api_key_hashes_are_unique(database):
    now = datetime.now(UTC)
    with database.session() as session:
        session.add(ApiKey(name="k1", key_hash="0" * 64, role="admin", create_time=now))
    with pytest.raises(AlreadyExists), database.session() as session:
        session.add(ApiKey(name="k2", key_hash="0" * 64, role="viewer", create_time=now))
