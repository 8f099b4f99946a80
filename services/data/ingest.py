"""The ingest job: source -> fingerprint -> (cache hit | convert -> split -> describe) -> version.

Jobs arrive through the JetStream work queue (:mod:`aimass.data.worker`); the heavy work
(hashing, converting, splitting, statistics) runs in worker threads, which check a stop
flag at every block so a cancel takes effect within a block. Progress (bytes read, then
rows converted) is appended to the job's events for WatchIngestJob. The version row and
its outbox event (``aimass.data.version.ready``) commit in one transaction; on failure or
cancel the version row and any split file no other version uses are removed, the job
records the reason and ``aimass.data.version.failed`` is sent, so nothing half-made
remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import select

from aimass.core.artifacts import ArtifactStore
from aimass.core.db import models as m
from aimass.core.db.base import utcnow
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, InvalidArgument
from aimass.core.events.outbox import add_event
from aimass.core.metrics import count_job_end
from aimass.core.settings import Settings
from aimass.data import config as cfg
from aimass.data import converters, sources, splitter
from aimass.data import store as st
from aimass.data.v1 import data_pb2 as pb
from aimass.events.v1 import events_pb2

SOURCE = "aimass.data"
READY_TOPIC = "aimass.data.version.ready"
FAILED_TOPIC = "aimass.data.version.failed"
PROGRESS_EVERY_S = 0.25
CANCEL_POLL_S = 0.5
MAX_DISTINCT_LABELS = 1000
log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What the thread part of an ingest produced, ready to be stored."""

    rows: int
    schema: list[dict[str, Any]]
    split_files: dict[str, Path]
    split_rows: dict[str, int]
    labels: dict[str, dict[str, int]]
    statistics: list[dict[str, Any]]
    uris: dict[str, dict[str, Any]] = field(default_factory=dict)


class Stopped(Exception):
    """The job was asked to stop (cancelled, or its worker is shutting down)."""


class Ingestor:
    """Runs ingest jobs handed over by the work queue (see :mod:`aimass.data.worker`).

    A job may run more than once: when its worker dies, the queue hands it to another
    worker, which resumes it. Every step is safe to repeat: a finished job is skipped, a
    version allocated by an earlier attempt is reused (no second version number), and split
    files are content-addressed (the same bytes land at the same URI).
    """

    def __init__(
        self,
        database: Database,
        artifacts: ArtifactStore,
        settings: Settings,
        notify_outbox: Callable[[], None],
    ) -> None:
        self.database = database
        self.artifacts = artifacts
        self.settings = settings
        self.notify_outbox = notify_outbox
        # Stop flags of the jobs running in this process, checked by their worker threads.
        self.stops: dict[str, threading.Event] = {}

    def request_stop(self, job_id: str) -> None:
        """Stops the job at its next check if it runs in this process (cancel fast path)."""
        stop = self.stops.get(job_id)
        if stop is not None:
            stop.set()

    # --------------------------------------------------------------------- the job

    async def run(self, job_id: str, force: bool) -> None:
        """Runs (or resumes) one job to a terminal state; a shutdown leaves it to a redelivery."""
        state = await asyncio.to_thread(self._claim, job_id)
        if state in st.TERMINAL:
            return
        stop = self.stops[job_id] = threading.Event()
        watcher = asyncio.create_task(self._watch_for_cancel(job_id, stop))
        work = Path(tempfile.mkdtemp(prefix="ingest-", dir=self._scratch()))
        stored: list[str] = []
        try:
            if state == "CANCELLING":
                raise Stopped
            await self._ingest(job_id, force, work, stored, stop)
        except asyncio.CancelledError:
            # The worker is shutting down: the job stays RUNNING for its redelivery.
            stop.set()
            raise
        except Stopped:
            await self._fail(job_id, "cancelled on request", stored, "CANCELLED")
        except AimassError as err:
            await self._fail(job_id, err.message, stored)
        except Exception as err:  # an unexpected failure still must leave nothing half-made
            log.exception("ingest job %s failed", job_id)
            await self._fail(job_id, f"internal error: {type(err).__name__}: {err}", stored)
        finally:
            watcher.cancel()
            self.stops.pop(job_id, None)
            shutil.rmtree(work, ignore_errors=True)

    async def _watch_for_cancel(self, job_id: str, stop: threading.Event) -> None:
        """Sets ``stop`` once a Cancel, served by any replica, marked the job CANCELLING."""
        while not stop.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                state = await asyncio.to_thread(self._state, job_id)
            except AimassError:
                continue
            if state == "CANCELLING":
                stop.set()

    def _scratch(self) -> Path:
        path = self.settings.home / "cache" / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def _ingest(
        self, job_id: str, force: bool, work: Path, stored: list[str], stop: threading.Event
    ) -> None:
        def check() -> None:
            if stop.is_set():
                raise Stopped

        config, dataset_pk = await asyncio.to_thread(self._job_config, job_id)
        source = await self._local_source(config, work)
        check()
        fmt = sources.infer_format(source, config)
        progress = _Progress(self, job_id, check)
        fingerprint = await asyncio.to_thread(_fingerprint, source, config)
        check()
        if not force and await asyncio.to_thread(self._reuse, job_id, dataset_pk, fingerprint):
            self.notify_outbox()
            return
        await asyncio.to_thread(self._allocate_version, job_id, fingerprint, fmt)
        prepared = await asyncio.to_thread(_prepare, source, fmt, config, work, progress.report)
        for split_name, path in prepared.split_files.items():
            check()
            obj = await self.artifacts.put_file(path)
            stored.append(obj.uri)
            prepared.uris[split_name] = {
                "uri": obj.uri,
                "sha256": obj.sha256,
                "size_bytes": obj.size,
                "file_name": f"{split_name}.parquet",
            }
        check()
        await asyncio.to_thread(self._mark_ready, job_id, prepared)
        self.notify_outbox()

    async def _local_source(self, config: pb.DatasetConfig, work: Path) -> Path:
        kind = config.WhichOneof("source")
        if kind == "data_path":
            return sources.resolve_local(config.data_path, self.settings.data_roots)
        if kind == "s3_uri":
            # download: true keeps the object in the data cache (keyed by its ETag, so an
            # unchanged object is never fetched again); false reads a copy in the job's
            # scratch folder, removed when the job ends.
            cache = self.settings.home / "cache" / "s3" if config.download else work / "s3"
            return await asyncio.to_thread(sources.fetch_s3, config.s3_uri, self.settings, cache)
        upload_id = st.parse_simple_name(config.upload, "uploads", "config.upload")
        with self.database.session(read_only=True) as session:
            row = session.scalar(select(m.Upload).where(m.Upload.name == upload_id))
            if row is None or row.state != "COMPLETE":
                raise InvalidArgument("config.upload", f"{config.upload} is not a complete upload")
            uri, sha, file_name = row.temp_uri, row.sha256, row.file_name
        cache = self.settings.home / "cache" / "uploads" / sha
        target = cache / (Path(file_name).name or "upload")
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            await self.artifacts.get_file(uri, target, expected_sha256=sha)
        return target

    # ----------------------------------------------------------- database steps

    def _claim(self, job_id: str) -> str:
        """Marks the job RUNNING (unless it ended or is being cancelled); returns its state."""
        with self.database.session() as session:
            row = st.get_job(session, job_id, for_update=True)
            if row.state in st.TERMINAL or row.state == "CANCELLING":
                return row.state
            row.start_time = row.start_time or utcnow()
            if row.state != "RUNNING":
                row.state = "RUNNING"
                st.add_job_event(session, row)
            return row.state

    def _state(self, job_id: str) -> str:
        with self.database.session(read_only=True) as session:
            return st.get_job(session, job_id).state

    def _job_config(self, job_id: str) -> tuple[pb.DatasetConfig, int]:
        with self.database.session(read_only=True) as session:
            row = st.get_job(session, job_id)
            return cfg.from_json(row.config.get("config", {})), row.dataset_id

    def _reuse(self, job_id: str, dataset_pk: int, fingerprint: str) -> bool:
        """Points the job at a READY version with the same fingerprint, if there is one."""
        with self.database.session() as session:
            existing = session.scalar(
                select(m.DatasetVersion).where(
                    m.DatasetVersion.dataset_id == dataset_pk,
                    m.DatasetVersion.fingerprint == fingerprint,
                    m.DatasetVersion.state == "READY",
                )
            )
            if existing is None:
                return False
            job = st.get_job(session, job_id, for_update=True)
            self._drop_unfinished_version(session, job)
            job.dataset_version_id = existing.id
            job.cache_hit = True
            job.config = {
                **job.config,
                "dataset_version": f"datasets/{existing.dataset.name}/versions/{existing.version}",
            }
            # No ready event: no new version became ready.
            self._finish(session, job, "SUCCEEDED", "")
            return True

    def _drop_unfinished_version(self, session: Any, job: m.IngestJob) -> None:
        """Removes the INGESTING version an earlier attempt of this job left behind."""
        if job.dataset_version_id is None:
            return
        version = session.get(m.DatasetVersion, job.dataset_version_id)
        if version is not None and version.state != "READY":
            session.delete(version)
        job.dataset_version_id = None

    def _allocate_version(self, job_id: str, fingerprint: str, fmt: str) -> None:
        """A new version number, or the one an earlier attempt of this job allocated."""
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            if job.dataset_version_id is not None:
                earlier = session.get(m.DatasetVersion, job.dataset_version_id)
                if earlier is not None and earlier.state == "INGESTING":
                    earlier.fingerprint = fingerprint
                    earlier.source_format = fmt
                    return
            dataset = session.get(m.Dataset, job.dataset_id)
            assert dataset is not None
            dataset.latest_version += 1
            version = m.DatasetVersion(
                dataset_id=dataset.id,
                version=dataset.latest_version,
                state="INGESTING",
                fingerprint=fingerprint,
                source_uri=job.source_uri,
                source_format=fmt,
                config={
                    "config": job.config.get("config", {}),
                    "ingest_job": f"ingestJobs/{job_id}",
                },
                creator=job.creator,
            )
            session.add(version)
            session.flush()
            job.dataset_version_id = version.id
            job.config = {
                **job.config,
                "dataset_version": f"datasets/{dataset.name}/versions/{version.version}",
            }

    def _mark_ready(self, job_id: str, prepared: Prepared) -> None:
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            if job.state == "CANCELLING":
                raise Stopped
            version = session.get(m.DatasetVersion, job.dataset_version_id)
            assert version is not None
            version.state = "READY"
            version.row_count = prepared.rows
            version.schema = {"columns": prepared.schema}
            version.split_row_counts = prepared.split_rows
            version.label_distribution = prepared.labels
            version.statistics = {"columns": prepared.statistics}
            version.split_uris = {k: v["uri"] for k, v in prepared.uris.items()}
            version.size_bytes = sum(v["size_bytes"] for v in prepared.uris.values())
            version.label_column = cfg.effective_label(cfg.from_json(version.config["config"]))
            version.config = {**version.config, "artifacts": prepared.uris}
            self._add_ready_event(session, job, version)
            job.config = {
                **job.config,
                "progress": {"completed": prepared.rows, "total": prepared.rows, "unit": "rows"},
            }
            self._finish(session, job, "SUCCEEDED", "")

    def _add_ready_event(self, session: Any, job: m.IngestJob, version: m.DatasetVersion) -> None:
        name = job.config["dataset_version"]
        add_event(
            session,
            READY_TOPIC,
            events_pb2.DatasetVersionReady(
                dataset_version=name,
                fingerprint=version.fingerprint or "",
                split_rows=version.split_row_counts,
            ),
            subject=name,
            source=SOURCE,
        )

    def _finish(self, session: Any, job: m.IngestJob, state: str, reason: str) -> None:
        job.state = state
        job.reason = reason
        job.end_time = utcnow()
        count_job_end(job, "ingest", state)
        job.progress = 1.0 if state == "SUCCEEDED" else job.progress
        st.add_job_event(session, job)

    async def give_up(self, job_id: str, reason: str) -> None:
        """Ends a job whose attempts all died mid-way as FAILED (nothing of it stays)."""
        await self._fail(job_id, reason, [])

    async def _fail(
        self, job_id: str, reason: str, stored: list[str], state: str = "FAILED"
    ) -> None:
        orphans = await asyncio.to_thread(self._record_failure, job_id, reason, stored, state)
        for uri in orphans:
            with contextlib.suppress(AimassError):
                await self.artifacts.delete(uri)
        self.notify_outbox()

    def _record_failure(self, job_id: str, reason: str, stored: list[str], state: str) -> list[str]:
        """Removes the half-made version, records the reason; returns split files to delete."""
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            if job.state in st.TERMINAL:
                return []
            record_failure(session, job, reason, state)
            session.flush()
            used = {
                uri
                for uris in session.scalars(select(m.DatasetVersion.split_uris))
                for uri in uris.values()
            }
        return [uri for uri in stored if uri not in used]

    def report_progress(
        self, job_id: str, progress: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        with self.database.session() as session:
            job = st.get_job(session, job_id, for_update=True)
            job.config = {**job.config, "progress": progress}
            st.add_job_event(session, job, metrics)


def record_failure(session: Any, job: m.IngestJob, reason: str, state: str) -> None:
    """Ends ``job`` as FAILED or CANCELLED: drops its unfinished version, sends the event."""
    name = job.config.get("dataset_version", "")
    if job.dataset_version_id is not None and not job.cache_hit:
        version = session.get(m.DatasetVersion, job.dataset_version_id)
        if version is not None and version.state != "READY":
            session.delete(version)
            job.dataset_version_id = None
    job.state = state
    job.reason = reason
    job.end_time = utcnow()
    count_job_end(job, "ingest", state)
    st.add_job_event(session, job)
    add_event(
        session,
        FAILED_TOPIC,
        events_pb2.DatasetVersionFailed(dataset_version=name, reason=reason),
        subject=name or f"ingestJobs/{job.name}",
        source=SOURCE,
    )


class _Progress:
    """Throttled progress reports from the worker thread: bytes read, then rows converted."""

    def __init__(self, ingestor: Ingestor, job_id: str, check: Callable[[], None]) -> None:
        self.ingestor = ingestor
        self.job_id = job_id
        self.check = check
        self.bytes_read = 0
        self.rows = 0
        self.last = 0.0

    def report(self, bytes_read: int, rows: int) -> None:
        self.check()  # a cancelled job stops at its next block
        self.bytes_read = bytes_read if bytes_read >= 0 else self.bytes_read
        self.rows = rows if rows >= 0 else self.rows
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        progress = (
            {"completed": self.rows, "unit": "rows"}
            if self.rows
            else {"completed": self.bytes_read, "unit": "bytes"}
        )
        metrics = {"bytes_read": float(self.bytes_read), "rows_converted": float(self.rows)}
        self.ingestor.report_progress(self.job_id, progress, metrics)


# --------------------------------------------------------------- thread-side work


def _fingerprint(source: Path, config: pb.DatasetConfig) -> str:
    shaping = json.dumps(cfg.shapes_result(config), sort_keys=True)
    content = sources.content_sha256(source)
    return hashlib.sha256(f"{content}\0{shaping}".encode()).hexdigest()


def _prepare(
    source: Path,
    fmt: str,
    config: pb.DatasetConfig,
    work: Path,
    progress: Callable[[int, int], None],
) -> Prepared:
    whole = work / "all.parquet"
    converted = converters.convert(source, fmt, config, whole, progress)
    names = converted.schema.names
    label = cfg.effective_label(config)
    if fmt == "npz" and not config.label_column:
        label = (config.npz.labels_key or "y") if (config.npz.labels_key or "y") in names else ""
    if label and label not in names:
        raise InvalidArgument(
            "config.label_column", f"{label!r} is not a column (columns: {', '.join(names)})"
        )
    for column in config.feature_columns:
        if column not in names:
            raise InvalidArgument(
                "config.feature_columns",
                f"{column!r} is not a column (columns: {', '.join(names)})",
            )
    file = pq.ParquetFile(whole)
    label_values = file.read(columns=[label]).column(0) if label else None
    classify = label_values is not None and _is_classification(label_values)
    shuffle = config.shuffle if config.HasField("shuffle") else True
    stratify_by = (
        np.asarray(label_values.to_numpy(zero_copy_only=False))
        if config.stratify and classify and label_values is not None
        else None
    )
    split_of = splitter.assign(
        converted.rows, cfg.split_percents(config), seed=config.seed, shuffle=shuffle,
        labels=stratify_by,
    )  # fmt: skip
    split_files = _write_splits(file, split_of, work)
    progress(-1, converted.rows)  # also where a cancelled job stops
    schema = _schema(converted.schema, label, list(config.feature_columns))
    labels: dict[str, dict[str, int]] = {}
    if classify and label_values is not None:
        labels = _label_counts(label_values, split_of, split_files)
    split_rows = {
        name: int((split_of == index).sum())
        for index, name in enumerate(splitter.NAMES)
        if name in split_files
    }
    return Prepared(
        rows=converted.rows,
        schema=schema,
        split_files=split_files,
        split_rows=split_rows,
        labels=labels,
        statistics=[_column_stats(file, name) for name in names],
    )


def _write_splits(file: pq.ParquetFile, split_of: np.ndarray, work: Path) -> dict[str, Path]:
    """One streaming pass: each batch's rows go to their split's writer, in source order."""
    paths = {
        name: work / f"{name}.parquet"
        for index, name in enumerate(splitter.NAMES)
        if (split_of == index).any()
    }
    writers = {
        name: pq.ParquetWriter(path, file.schema_arrow, **converters.WRITE_OPTIONS)
        for name, path in paths.items()
    }
    try:
        start = 0
        for batch in file.iter_batches(batch_size=65536):
            where = split_of[start : start + batch.num_rows]
            start += batch.num_rows
            for index, name in enumerate(splitter.NAMES):
                if name in writers:
                    part = batch.filter(pa.array(where == index))
                    if part.num_rows:
                        writers[name].write_batch(part)
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _is_classification(values: pa.ChunkedArray) -> bool:
    if pa.types.is_floating(values.type):
        return False
    return pc.count_distinct(values).as_py() <= MAX_DISTINCT_LABELS


def _label_counts(
    values: pa.ChunkedArray, split_of: np.ndarray, split_files: dict[str, Path]
) -> dict[str, dict[str, int]]:
    text = np.asarray(pc.cast(values, pa.string()).to_numpy(zero_copy_only=False))
    out: dict[str, dict[str, int]] = {}
    selections = {"all": np.ones(len(text), dtype=bool)}
    for index, name in enumerate(splitter.NAMES):
        if name in split_files:
            selections[name] = split_of == index
    for name, mask in selections.items():
        keys, counts = np.unique(text[mask], return_counts=True)
        out[name] = {str(k): int(c) for k, c in zip(keys, counts, strict=True)}
    return out


def _schema(schema: pa.Schema, label: str, features: list[str]) -> list[dict[str, Any]]:
    def role(name: str) -> int:
        if name == label:
            return pb.COLUMN_ROLE_LABEL
        if not features or name in features:
            return pb.COLUMN_ROLE_FEATURE
        return pb.COLUMN_ROLE_OTHER

    return [
        {"name": f.name, "type": str(f.type), "nullable": f.nullable, "role": role(f.name)}
        for f in schema
    ]


def _column_stats(file: pq.ParquetFile, name: str) -> dict[str, Any]:
    """Statistics of one column, read alone so memory stays one column wide."""
    column = file.read(columns=[name]).column(0)
    nulls = column.null_count
    stats: dict[str, Any] = {"column": name, "count": len(column) - nulls, "null_count": nulls}
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return stats
    stats["distinct_count"] = pc.count_distinct(column).as_py()
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    if numeric and stats["count"] and True:
        bounds = pc.min_max(column).as_py()
        stats.update(
            min=float(bounds["min"]),
            max=float(bounds["max"]),
            mean=float(pc.mean(column).as_py()),
            std=float(pc.stddev(column).as_py()),
        )
    return stats
