"""A training worker: pulls jobs from the work queue and runs them (``aimass worker training``).

Any number of workers on any host share the queue ``aimassjobs.training``.
For each delivery the worker marks the job RUNNING (attempt + 1), downloads
its last checkpoint when there is one, reads the splits through the data
service, and trains in a thread (one process) or in N spawned processes
(``resources.processes``, :mod:`aimass.training.ddp`), while the event loop
sends ``in_progress`` heartbeats to NATS and watches the job for a cancel.
Checkpoints go to the artifact store before they become the job's resume
point. On success the ONNX graph and the state dict are uploaded to the
registry and a version is created with ``request_id`` = the job id, so a job
redelivered after its worker died registers exactly one version.

A worker killed mid-job (SIGKILL) never acks: after ``ack_wait`` the queue
hands the job to another worker, which resumes from the last checkpoint.
Failures of the job itself (NaN loss, user code that raises, a dataset that
is gone) end the job FAILED with the reason and the traceback in its logs;
the worker goes on with the next job.

A worker needs NATS, the data, registry and training services and the
artifact store, not the database: it claims, reports and completes jobs
through the training service's internal RPCs (ClaimTrainingJob,
ReportTrainingJobProgress, CompleteTrainingJob, RegisterWorker), and the
service writes the tables and publishes ``aimass.training.job.*`` through its
outbox. Metrics and log lines are buffered and sent in one report per
``HEARTBEAT_S`` (the report is also the heartbeat and brings back a cancel);
a checkpoint is reported at once, after its file is in the artifact store.

A job across several hosts (``resources.hosts``) arrives as one
``TrainingHostTask`` per host: host 0 claims the attempt with the address its
rank 0 will listen on; the other hosts wait for that address through
ClaimTrainingJob and join with their ranks (:func:`run_distributed`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.core.artifacts import ArtifactStore, open_artifact_store
from aimass.core.auth import outgoing_credentials
from aimass.core.auth.hook import acting_for_project, internal_headers
from aimass.core.clients import ServiceChannels
from aimass.core.errors import AimassError, FailedPrecondition, NotFound, Unavailable
from aimass.core.events import EventBus, Job
from aimass.core.logging import configure_logging
from aimass.core.protodict import message_to_dict
from aimass.core.settings import Settings, load_settings
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.training import scheduling, search, warmstart
from aimass.training.ddp import free_port, run_distributed
from aimass.training.sources import ServiceSplitSource
from aimass.training.store import job_id, struct_to_dict
from aimass.training.trainer import Trainer, TrainingFailed, TrainPlan, TrainResult
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.v1 import training_pb2_grpc
from aimass.training.validation import fetch_dataset_version

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# An idle worker re-registers this often: the scheduler only hands jobs to live workers.
IDLE_HEARTBEAT_S = 5.0
# How long a host > 0 waits for host 0 to start the attempt before giving the task back.
JOIN_WAIT_S = 60.0
CHUNK = 1 << 20


class _Reporter:
    """A running attempt's progress, buffered and sent to the training service in batches.

    ``add`` is safe from any thread (the training thread); ``flush`` runs on the loop and
    sends everything buffered in one ReportTrainingJobProgress, in order.
    """

    def __init__(self, worker: TrainingWorker, job: tpb.TrainingJob) -> None:
        self.worker, self.name, self.attempt = worker, job.name, job.status.attempt
        self._pending: list[tpb.ProgressRecord] = []
        self._lock = threading.Lock()
        self._sending = asyncio.Lock()
        self.superseded = False

    def add(self, record: tpb.ProgressRecord) -> None:
        with self._lock:
            self._pending.append(record)

    def log(self, message: str, stream: str = "system", rank: int = 0) -> None:
        for line in message.rstrip("\n").splitlines() or [""]:
            entry = tpb.LogEntry(
                attempt=self.attempt,
                rank=rank,
                worker=f"workers/{self.worker.name}",
                stream=_STREAMS.get(stream, tpb.LOG_STREAM_SYSTEM),
                message=line,
            )
            self.add(tpb.ProgressRecord(log_entry=entry))

    async def flush(self) -> bool:
        """Sends what is buffered (possibly nothing: a heartbeat); True when cancel was asked."""
        async with self._sending:
            with self._lock:
                batch, self._pending = self._pending, []
            request = tpb.ReportTrainingJobProgressRequest(
                name=self.name,
                worker=f"workers/{self.worker.name}",
                attempt=self.attempt,
                records=batch,
            )
            try:
                response = await self.worker.training.ReportTrainingJobProgress(request)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ABORTED:
                    self.superseded = True
                else:
                    with self._lock:
                        self._pending[:0] = batch
                raise _rpc_error("training ReportTrainingJobProgress", err) from err
            return response.cancel_requested


class _Hooks:
    """Reports of the training thread, sent to the service through the reporter."""

    def __init__(
        self, worker: TrainingWorker, reporter: _Reporter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.worker, self.reporter, self.loop = worker, reporter, loop
        self.stop = threading.Event()

    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None:
        metrics = tpb.StepMetrics(step=step, epoch=epoch, metrics=values)
        self.reporter.add(tpb.ProgressRecord(metrics=metrics))

    def log(self, message: str, stream: str = "system") -> None:
        self.reporter.log(message, stream)

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        asyncio.run_coroutine_threadsafe(
            self._checkpoint(step, epoch, path, metrics), self.loop
        ).result()

    async def _checkpoint(
        self, step: int, epoch: int, path: Path, metrics: dict[str, float]
    ) -> None:
        stored = await self.worker.artifacts.put_file(path)
        artifact = common_pb2.Artifact(
            kind="checkpoint",
            uri=stored.uri,
            sha256=stored.sha256,
            size_bytes=stored.size,
            file_name=path.name,
        )
        checkpoint = tpb.Checkpoint(step=step, epoch=epoch, artifact=artifact, metrics=metrics)
        self.reporter.add(tpb.ProgressRecord(checkpoint=checkpoint))
        if await self.reporter.flush():
            self.stop.set()

    def should_stop(self) -> bool:
        return self.stop.is_set()


_STREAMS = {
    "system": tpb.LOG_STREAM_SYSTEM,
    "stdout": tpb.LOG_STREAM_STDOUT,
    "stderr": tpb.LOG_STREAM_STDERR,
}


class TrainingWorker:
    """One worker process's loop over the queue."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "",
        threads: int = 0,
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
        addresses: Mapping[str, str] | None = None,
        advertise_address: str = "",
        resources: tpb.Resources | None = None,
        resource_class: str = "",
    ) -> None:
        self.settings = settings
        # What this worker offers, and the class (work-queue subject) it pulls jobs from.
        self.offer = resources if resources is not None else scheduling.detect_offer()
        self.resource_class = scheduling.resource_class(self.offer, resource_class)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.threads = threads
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.channels = ServiceChannels(settings, addresses, credentials=_credentials(settings))
        self.artifacts: ArtifactStore = open_artifact_store(settings.artifact_root, settings.s3)
        self.work_root = Path(settings.home) / "work" / "training"
        self.advertise_address = advertise_address or _default_address(settings)
        self.jobs_done = 0

    @property
    def training(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(self.channels.get("training"))

    # -- the worker's record --
    async def _register(self, state: str, current_job: str = "") -> None:
        """Records the worker's state with the service; best effort (the queue is the truth)."""
        capabilities = struct_pb2.Struct()
        capabilities.update(
            {
                "threads": self.threads,
                "cpus": os.cpu_count() or 0,
                "resources": message_to_dict(self.offer),
                "resource_class": self.resource_class,
            }
        )
        request = tpb.RegisterWorkerRequest(
            name=f"workers/{self.name}",
            host=socket.gethostname(),
            pid=os.getpid(),
            state=tpb.WorkerState.Value(f"WORKER_STATE_{state}"),
            current_job=current_job,
            capabilities=capabilities,
        )
        try:
            # Short when leaving: a service that is gone must not hold up the exit.
            await self.training.RegisterWorker(request, timeout=2 if state == "LOST" else 10)
        except grpc.aio.AioRpcError as err:
            log.warning("worker state %s not recorded: %s", state, err.details())

    # -- the loop --
    async def run(self, stop: asyncio.Event, max_jobs: int | None = None) -> None:
        bus = await EventBus.connect(self.settings, f"aimass-worker-{self.name}")
        await bus.ensure_streams()
        queue = await bus.job_queue(
            "training",
            ack_wait_s=self.ack_wait_s,
            max_deliver=self.max_deliver,
            subqueue=self.resource_class,
        )
        await self._register("IDLE")
        log.info("worker %s pulls training jobs of class %s", self.name, self.resource_class)
        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        try:
            while not stop.is_set() and (max_jobs is None or self.jobs_done < max_jobs):
                job = await queue.pull(timeout_s=1.0)
                if job is None:
                    if loop.time() - last_beat >= IDLE_HEARTBEAT_S:
                        await self._register("IDLE")
                        last_beat = loop.time()
                    continue
                await self.handle(job)
                self.jobs_done += 1
                last_beat = loop.time()
        finally:
            await self._register("LOST")
            await queue.close()
            await bus.close()
            await self.channels.close()

    async def _claim(
        self, name: str, *, host_rank: int = 0, address: str = "", attempt: int = 0
    ) -> tpb.TrainingJob:
        request = tpb.ClaimTrainingJobRequest(
            name=name,
            worker=f"workers/{self.name}",
            host_rank=host_rank,
            rendezvous_address=address,
            attempt=attempt,
        )
        try:
            return await self.training.ClaimTrainingJob(request)
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound(f"{name}: {err.details()}") from err
            raise _rpc_error("training ClaimTrainingJob", err) from err

    async def handle(self, delivery: Job) -> None:
        """Runs one delivery to its end and settles it (ack, or nak for a transient error)."""
        name = delivery.name
        task = _host_task(delivery)
        if task.host_rank > 0:
            await self._join(delivery, task)
            return
        address = self._rendezvous_address() if task.hosts > 1 else ""
        try:
            job = await self._claim(name, address=address)
        except NotFound:
            await delivery.term()
            return
        except Unavailable as err:
            log.warning("cannot claim %s, retrying later: %s", name, err)
            await delivery.nak(delay_s=2.0)
            return
        if job.status.state != common_pb2.JOB_STATE_RUNNING:
            await delivery.ack()  # ended or cancelled while queued
            return
        log.info("%s: attempt %s claimed", name, job.status.attempt)
        reporter = _Reporter(self, job)
        work_dir = self.work_root / job_id(name) / str(job.status.attempt)
        try:
            async with delivery.keep_alive(self.ack_wait_s / 3):
                await self._run_job(job, reporter, work_dir)
            await delivery.ack()
        except Unavailable as err:
            if reporter.superseded:
                log.warning("%s: attempt %s superseded: %s", name, reporter.attempt, err)
                await delivery.ack()
            elif delivery.num_delivered >= self.max_deliver:
                await self._complete_quietly(
                    job,
                    reporter,
                    "FAILED",
                    f"gave up after {delivery.num_delivered} attempts: {err}",
                )
                await delivery.ack()
            else:
                reporter.log(f"transient failure, retrying: {err}")
                with contextlib.suppress(AimassError):
                    await reporter.flush()
                await delivery.nak(delay_s=2.0)
        except Exception as err:  # a bug or an unexpected reply: end the job, keep the worker
            log.exception("%s: attempt %s broke", name, reporter.attempt)
            await self._complete_quietly(job, reporter, "FAILED", f"worker error: {err!r}")
            await delivery.ack()
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
            await self._register("IDLE")

    async def _complete_quietly(
        self, job: tpb.TrainingJob, reporter: _Reporter, state: str, reason: str
    ) -> None:
        try:
            await self._complete(job, reporter, state, reason=reason)
        except AimassError as err:
            log.warning("%s not marked %s: %s", job.name, state, err)

    async def _complete(
        self,
        job: tpb.TrainingJob,
        reporter: _Reporter | None,
        state: str,
        *,
        reason: str = "",
        metrics: Mapping[str, float] | None = None,
        model_version: str = "",
        outputs: Mapping[str, Any] | None = None,
        best_trial: str = "",
        trials_completed: int = 0,
    ) -> None:
        """Sends the last progress and ends the job; finishes its search when it was the last."""
        if reporter is not None:
            await reporter.flush()
        request = tpb.CompleteTrainingJobRequest(
            name=job.name,
            worker=f"workers/{self.name}",
            attempt=reporter.attempt if reporter is not None else 0,
            state=common_pb2.JobState.Value(f"JOB_STATE_{state}"),
            reason=reason,
            metrics=dict(metrics or {}),
            model_version=model_version,
            best_trial=best_trial,
            trials_completed=trials_completed,
        )
        if outputs is not None:
            request.outputs.update(dict(outputs))
        try:
            response = await self.training.CompleteTrainingJob(request)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.ABORTED and reporter is not None:
                reporter.superseded = True
            raise _rpc_error("training CompleteTrainingJob", err) from err
        if response.HasField("search_parent"):
            await self._finish_search(response)

    async def _fail(self, job: tpb.TrainingJob, reporter: _Reporter, reason: str) -> None:
        await self._complete(job, reporter, "FAILED", reason=reason)

    async def _run_job(self, job: tpb.TrainingJob, reporter: _Reporter, work_dir: Path) -> None:
        attempt = job.status.attempt
        reporter.log(f"attempt {attempt} on worker {self.name}")
        try:
            version = await fetch_dataset_version(self.channels.get("data"), job.dataset_version)
        except (NotFound, FailedPrecondition) as err:
            await self._fail(job, reporter, err.message)
            return
        data = ann.data_signature_from_version(version)
        try:
            plan = await self._plan(job, data, work_dir)
        except (NotFound, FailedPrecondition) as err:  # init_from / teacher cannot be read
            await self._fail(job, reporter, err.message)
            return
        source = ServiceSplitSource(self.channels.address("data"), job.dataset_version)
        hooks = _Hooks(self, reporter, asyncio.get_running_loop())
        monitor = asyncio.create_task(self._report_periodically(reporter, hooks))
        try:
            result = await asyncio.to_thread(self._train, plan, source, hooks, job, 0)
        except (TrainingFailed, AimassError) as err:
            if reporter.superseded:
                raise Unavailable(f"attempt {attempt} was superseded") from err
            if isinstance(err, Unavailable):
                raise  # a service or the store is briefly away: redelivered, resumed
            trace = getattr(err, "traceback_text", "") or traceback.format_exc()
            reporter.log(trace, "stderr")
            reason = str(err) if isinstance(err, TrainingFailed) else err.message
            await self._fail(job, reporter, reason)
            return
        except Exception as err:  # user code and anything else: the worker must survive
            reporter.log(traceback.format_exc(), "stderr")
            await self._fail(job, reporter, f"training raised {err!r}")
            return
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        if reporter.superseded:
            raise Unavailable(f"attempt {attempt} was superseded")
        if result.cancelled:
            await self._complete(job, reporter, "CANCELLED", reason="cancelled on request")
            return
        await self._succeed(job, reporter, result, data)

    async def _plan(
        self, job: tpb.TrainingJob, data: ann.DataSignature, work_dir: Path
    ) -> TrainPlan:
        await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
        resume = await self._download_checkpoint(job, work_dir)
        warm = await warmstart.fetch_files(
            job, work_dir, self.artifacts, self.channels.get("registry")
        )
        return TrainPlan(
            **warm,
            job=job.name,
            spec=job.model.SerializeToString(),
            config=job.training.SerializeToString(),
            data_signature=data.to_dict(),
            work_dir=str(work_dir),
            resume_from=str(resume) if resume else "",
            threads=self.threads,
            device="cuda" if job.resources.gpus > 0 else "cpu",
        )

    def _train(
        self,
        plan: TrainPlan,
        source: ServiceSplitSource,
        hooks: _Hooks,
        job: tpb.TrainingJob,
        host_rank: int,
    ) -> TrainResult:
        local = max(1, job.resources.processes)
        hosts = max(1, job.resources.hosts)
        if hosts > 1:
            world, first = local * hosts, host_rank * local
            hooks.log(
                f"host {host_rank} of {hosts}: ranks {first}..{first + local - 1} of {world}, "
                f"rendezvous {job.rendezvous_address}"
            )
            return run_distributed(
                plan,
                source,
                hooks,
                world,
                local=local,
                first_rank=first,
                address=job.rendezvous_address,
            )
        if local > 1:
            hooks.log(f"data parallel over {local} processes")
            return run_distributed(plan, source, hooks, local)
        return Trainer(plan, source, hooks).run()

    # -- jobs across several hosts --
    def _rendezvous_address(self) -> str:
        """Where this host's rank 0 will listen: a free port on the advertised address."""
        host = self.advertise_address
        return f"tcp://{host}:{free_port(host)}"

    async def _join(self, delivery: Job, task: tpb.TrainingHostTask) -> None:
        """Host ``task.host_rank`` of a job across several hosts: waits for host 0 to start
        the attempt, then runs this host's ranks. Host 0 alone reports and ends the job; a
        task of an older attempt is dropped."""
        name = delivery.name
        async with delivery.keep_alive(self.ack_wait_s / 3):
            job = await self._wait_for_attempt(name, task)
        if job is None:
            await delivery.ack()
            return
        if job.status.attempt != task.attempt:
            await delivery.nak(delay_s=2.0)  # host 0 has not started it yet
            return
        log.info("%s: host %s joins attempt %s", name, task.host_rank, task.attempt)
        await self._register("BUSY", name)  # no new job while this host's ranks run
        reporter = _Reporter(self, job)
        work_dir = self.work_root / job_id(name) / f"{job.status.attempt}-host{task.host_rank}"
        hooks = _Hooks(self, reporter, asyncio.get_running_loop())
        monitor = asyncio.create_task(self._report_periodically(reporter, hooks))
        try:
            async with delivery.keep_alive(self.ack_wait_s / 3):
                reporter.log(f"host {task.host_rank} of attempt {task.attempt} on {self.name}")
                version = await fetch_dataset_version(
                    self.channels.get("data"), job.dataset_version
                )
                data = ann.data_signature_from_version(version)
                plan = await self._plan(job, data, work_dir)
                source = ServiceSplitSource(self.channels.address("data"), job.dataset_version)
                await asyncio.to_thread(self._train, plan, source, hooks, job, task.host_rank)
        except Exception as err:  # host 0 sees the failure too and decides for the job
            reporter.log(f"host {task.host_rank} failed: {err}", "stderr")
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
            with contextlib.suppress(AimassError):
                await reporter.flush()
            shutil.rmtree(work_dir, ignore_errors=True)
            await self._register("IDLE")
        await delivery.ack()

    async def _wait_for_attempt(
        self, name: str, task: tpb.TrainingHostTask
    ) -> tpb.TrainingJob | None:
        """The job once host 0 published the task's attempt; None when the task is stale."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_WAIT_S
        while True:
            try:
                job = await self._claim(name, host_rank=task.host_rank, attempt=task.attempt)
            except NotFound:
                return None
            state = job.status.state
            if state != common_pb2.JOB_STATE_QUEUED and state != common_pb2.JOB_STATE_RUNNING:
                return None
            if job.status.attempt > task.attempt:
                return None
            ready = job.status.attempt == task.attempt and job.rendezvous_address
            if ready or loop.time() > deadline:
                return job
            await asyncio.sleep(0.5)

    async def _report_periodically(self, reporter: _Reporter, hooks: _Hooks) -> None:
        """Sends the buffered progress every HEARTBEAT_S (the heartbeat) and relays a cancel."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if await reporter.flush():
                    hooks.stop.set()
            except AimassError as err:
                if reporter.superseded:
                    hooks.stop.set()  # another worker owns the job now
                    return
                log.warning("progress of %s not recorded yet: %s", reporter.name, err)

    async def _download_checkpoint(self, job: tpb.TrainingJob, work_dir: Path) -> Path | None:
        if not job.checkpoints:
            return None
        path = work_dir / "resume.pt"
        await self.artifacts.get_file(job.checkpoints[-1].artifact.uri, path)
        return path

    # -- outputs --
    async def _store_outputs(self, result: TrainResult) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for kind, path in (("onnx", result.onnx_path), ("state_dict", result.state_dict_path)):
            stored = await self.artifacts.put_file(Path(path))
            outputs[kind] = {
                "uri": stored.uri,
                "sha256": stored.sha256,
                "size_bytes": stored.size,
                "file_name": Path(path).name,
            }
        return outputs

    async def _succeed(
        self,
        job: tpb.TrainingJob,
        reporter: _Reporter,
        result: TrainResult,
        data: ann.DataSignature,
    ) -> None:
        outputs = await self._store_outputs(result)
        outputs["signature"] = result.signature
        outputs["data_signature"] = data.to_dict()
        outputs["parameter_count"] = result.parameter_count
        metrics = {k: v for k, v in result.metrics.items() if v == v}  # drop NaN
        metrics["steps"] = float(result.steps)
        metrics["epochs"] = float(result.epochs)
        metrics["onnx_max_abs_diff"] = result.onnx_max_abs_diff
        version = ""
        if job.target_model:
            version = await self.register(job, job.name, outputs, metrics)
        reporter.log(
            f"succeeded after {result.steps} steps" + (f"; registered {version}" if version else "")
        )
        await self._complete(
            job, reporter, "SUCCEEDED", metrics=metrics, model_version=version, outputs=outputs
        )

    async def register(
        self,
        job: tpb.TrainingJob,
        source_job: str,
        outputs: dict[str, Any],
        metrics: dict[str, float],
    ) -> str:
        """Uploads the outputs to the registry and creates the version (idempotent per job),
        acting for the job's project: a model created here lands in it, and another
        project's model (made since the job was admitted) answers NOT_FOUND."""
        with acting_for_project(job.project):
            return await self._register_version(job, source_job, outputs, metrics)

    async def _register_version(
        self,
        job: tpb.TrainingJob,
        source_job: str,
        outputs: dict[str, Any],
        metrics: dict[str, float],
    ) -> str:
        stub = registry_pb2_grpc.RegistryServiceStub(self.channels.get("registry"))
        model_id = job.target_model.removeprefix("models/")
        try:
            await stub.CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(
                    registered_model=registry_pb2.RegisteredModel(
                        description=f"trained by {source_job}"
                    ),
                    registered_model_id=model_id,
                )
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _rpc_error("registry CreateRegisteredModel", err) from err
        artifacts = []
        for kind, file_name in (("onnx", "model.onnx"), ("state_dict", "model.pt")):
            artifacts.append(await self._upload(stub, kind, file_name, outputs[kind]))
        signature = ann.ModelSignature.from_dict(outputs["signature"])
        config = struct_pb2.Struct()
        config.update(
            {
                "model": message_to_dict(job.model),
                "training": message_to_dict(job.training),
                "data_signature": outputs["data_signature"],
                "signature": outputs["signature"],
                "job": source_job,
            }
        )
        version = registry_pb2.ModelVersion(
            description=f"trained by {source_job}",
            artifacts=artifacts,
            signature=signature.to_proto(),
            framework="onnx",
            opset=ann.onnx_export.OPSET,
            config=common_pb2.Config(values=config),
            metrics=[
                common_pb2.Metric(name=k, value=v, source="training")
                for k, v in sorted(metrics.items())
            ],
            source=registry_pb2.VersionSource(dataset_version=job.dataset_version, job=source_job),
            parameter_count=int(outputs.get("parameter_count", 0)),
            tags={"classes": ",".join(signature.classes)} if signature.classes else {},
        )
        try:
            created = await stub.CreateModelVersion(
                registry_pb2.CreateModelVersionRequest(
                    parent=job.target_model,
                    model_version=version,
                    request_id=job_id(source_job)[:64],
                )
            )
        except grpc.aio.AioRpcError as err:
            raise _rpc_error("registry CreateModelVersion", err) from err
        return created.name

    async def _upload(
        self,
        stub: registry_pb2_grpc.RegistryServiceStub,
        kind: str,
        file_name: str,
        stored: dict[str, Any],
    ) -> common_pb2.Artifact:
        async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            yield registry_pb2.UploadArtifactRequest(
                header=registry_pb2.UploadArtifactHeader(
                    kind=kind,
                    file_name=file_name,
                    sha256=stored["sha256"],
                    size_bytes=stored["size_bytes"],
                )
            )
            offset = 0
            async for chunk in self.artifacts.open_stream(stored["uri"]):
                yield registry_pb2.UploadArtifactRequest(
                    chunk=common_pb2.ByteChunk(offset=offset, data=bytes(chunk))
                )
                offset += len(chunk)

        try:
            artifact = await stub.UploadArtifact(requests())
        except grpc.aio.AioRpcError as err:
            raise _rpc_error("registry UploadArtifact", err) from err
        artifact.kind = kind
        artifact.file_name = file_name
        return artifact

    # -- searches --
    async def _finish_search(self, response: tpb.CompleteTrainingJobResponse) -> None:
        """The job was the last trial of its search to end: rank the trials, register the best."""
        parent = response.search_parent
        trials = [
            {
                "name": t.name,
                "state": common_pb2.JobState.Name(t.state).removeprefix("JOB_STATE_"),
                "metrics": dict(t.metrics),
                "outputs": struct_to_dict(t.outputs) if t.outputs.fields else None,
            }
            for t in response.trials
        ]
        best = search.best_trial(trials, parent.hyperparameter_search)
        if best is None:
            reason = (
                f"no trial succeeded with metric {parent.hyperparameter_search.objective_metric!r}"
            )
            await self._complete(parent, None, "FAILED", reason=reason)
            return
        done = sum(1 for t in trials if t["state"] == "SUCCEEDED")
        version = ""
        if parent.target_model and best.get("outputs"):
            version = await self.register(parent, best["name"], best["outputs"], best["metrics"])
        metrics = dict(best["metrics"])
        metrics["objective"] = best["metrics"][parent.hyperparameter_search.objective_metric]
        await self._complete(
            parent,
            None,
            "SUCCEEDED",
            metrics=metrics,
            model_version=version,
            best_trial=best["name"],
            trials_completed=done,
        )


def _default_address(settings: Settings) -> str:
    """The address other hosts reach this one at: loopback for a stack on one machine."""
    if settings.host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _host_task(delivery: Job) -> tpb.TrainingHostTask:
    """The host task a delivery carries (host 0 of 1 for a job on one host)."""
    task = tpb.TrainingHostTask()
    if delivery.envelope.payload.Is(task.DESCRIPTOR):
        delivery.envelope.payload.Unpack(task)
    return task


def _credentials(settings: Settings) -> Callable[[], Mapping[str, str]]:
    """What the worker's calls carry: the stack's internal token when auth is on."""
    token = settings.auth.internal_token if settings.auth.enabled else None
    if token:
        return lambda: internal_headers(token)
    return outgoing_credentials


def _rpc_error(what: str, err: grpc.aio.AioRpcError) -> AimassError:
    transient = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    if err.code() in transient:
        return Unavailable(f"{what}: {err.details()}")
    return FailedPrecondition(f"{what} failed: {err.code().name}: {err.details()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aimass worker training", description=__doc__)
    parser.add_argument("--name", default="", help="worker id (default: host-pid-random)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--ack-wait", type=float, default=30.0, help="seconds before redelivery")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    offer = parser.add_argument_group(
        "what the worker offers (default: detected) and the resource class it pulls from"
    )
    offer.add_argument(
        "--resource-class", default="", help="class name (default: derived from the offer)"
    )
    offer.add_argument("--cpus", type=float, default=0, help="CPU cores (default: all)")
    offer.add_argument("--gpus", type=int, default=None, help="GPUs (default: CUDA devices)")
    offer.add_argument("--gpu-type", default="", help='GPU model, e.g. "H100"')
    offer.add_argument("--memory-gib", type=float, default=0, help="memory (default: all)")
    offer.add_argument(
        "--processes", type=int, default=0, help="most processes per job (default: no limit)"
    )
    offer.add_argument(
        "--label", action="append", default=[], help="KEY=VALUE a job may ask for (repeatable)"
    )
    return parser.parse_args(argv)


def offer_from_args(args: argparse.Namespace) -> tpb.Resources:
    """The worker's offer: what the flags say, detected where they say nothing."""
    offer = scheduling.detect_offer(
        processes=args.processes, cpus=args.cpus, gpus=args.gpus, gpu_type=args.gpu_type
    )
    if args.memory_gib:
        offer.memory_bytes = int(args.memory_gib * scheduling.GIB)
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label: must look like KEY=VALUE, got {label!r}")
        offer.labels[key] = value
    return offer


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = TrainingWorker(
        settings,
        name=args.name,
        threads=args.threads,
        ack_wait_s=args.ack_wait,
        resources=offer_from_args(args),
        resource_class=args.resource_class,
    )
    await worker.run(stop, args.max_jobs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings()
    configure_logging("training-worker", settings.log_level, settings.log_format)
    asyncio.run(serve(args, settings))


__all__ = ["TrainingWorker", "json_format", "main"]

if __name__ == "__main__":
    main()
