"""Where captured prediction batches go: the artifact store, the prediction_logs table, an event.

The Parquet file is stored first (under a readable key); the row and the
``aimass.routing.predictions.logged`` event then commit in one transaction
(outbox), so every announced file exists and every recorded file is announced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from aimass.core.artifacts import ArtifactStore
from aimass.core.db.engine import Database
from aimass.core.db.models import PredictionLog
from aimass.core.events import add_event
from aimass.events.v1 import events_pb2
from aimass.routing.prediction_log import TOPIC_LOGGED, LoggedBatch, iterate_path, object_key


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


class ArtifactSink:
    """Stores a batch, records it and announces it."""

    def __init__(
        self, artifacts: ArtifactStore, database: Database, notify_outbox: Callable[[], None]
    ) -> None:
        self.artifacts = artifacts
        self.database = database
        self.notify_outbox = notify_outbox

    async def __call__(self, batch: LoggedBatch) -> None:
        stored = await self.artifacts.put_named(
            object_key(batch.deployment, batch.end_time), iterate_path(batch.path)
        )
        await asyncio.to_thread(self._record, batch, stored.uri)
        self.notify_outbox()

    def _record(self, batch: LoggedBatch, uri: str) -> None:
        payload = events_pb2.PredictionsLogged(
            deployment=batch.deployment,
            artifact_uri=uri,
            rows=batch.rows,
            start_time=_timestamp(batch.start_time),
            end_time=_timestamp(batch.end_time),
            model_versions=batch.model_versions,
            dropped=batch.dropped,
        )
        with self.database.session() as session:
            session.add(
                PredictionLog(
                    deployment=batch.deployment,
                    artifact_uri=uri,
                    rows=batch.rows,
                    start_time=batch.start_time,
                    end_time=batch.end_time,
                    model_versions=batch.model_versions,
                    dropped=batch.dropped,
                    create_time=datetime.now(UTC),
                )
            )
            add_event(session, TOPIC_LOGGED, payload, subject=batch.deployment, source="routing")
