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
the worker goes on with the next job. The worker writes the job's state,
metrics, logs and checkpoints straight into the database (the training
store) and publishes ``aimass.training.job.*`` through the outbox.
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
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from aimass.common.v1 import common_pb2
from aimass.core import nn as ann
from aimass.core.artifacts import ArtifactStore, open_artifact_store
from aimass.core.clients import ServiceChannels
from aimass.core.db.engine import Database
from aimass.core.errors import AimassError, FailedPrecondition, NotFound, Unavailable
from aimass.core.events import EventBus, Job, OutboxRelay
from aimass.core.logging import configure_logging
from aimass.core.protodict import message_to_dict
from aimass.core.settings import Settings, load_settings
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.training import search
from aimass.training.ddp import run_distributed
from aimass.training.sources import ServiceSplitSource
from aimass.training.store import TrainingStore, job_id
from aimass.training.trainer import Trainer, TrainingFailed, TrainPlan, TrainResult
from aimass.training.v1 import training_pb2 as tpb
from aimass.training.validation import fetch_dataset_version

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
CHUNK = 1 << 20


class _Hooks:
    """Reports of the training thread, written to the job's record (called off the loop)."""

    def __init__(
        self,
        worker: TrainingWorker,
        job: tpb.TrainingJob,
        loop: asyncio.AbstractEventLoop,
        total_steps: int,
    ) -> None:
        self.worker, self.job, self.loop = worker, job, loop
        self.stop = threading.Event()
        self.total = total_steps
        self.attempt = job.status.attempt + 1

    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None:
        payload = {"step": step, "epoch": epoch, "metrics": values, "completed": step}
        payload["total"] = self.total
        self.worker.store.append_events(self.job.name, [("metrics", payload)])

    def log(self, message: str, stream: str = "system") -> None:
        self.worker.job_log(self.job.name, self.attempt, message, stream)

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        stored = asyncio.run_coroutine_threadsafe(
            self.worker.artifacts.put_file(path), self.loop
        ).result()
        artifact = {
            "uri": stored.uri,
            "sha256": stored.sha256,
            "size_bytes": stored.size,
            "file_name": path.name,
        }
        keep = self.job.training.keep_checkpoints or 3
        self.worker.store.record_checkpoint(self.job.name, step, epoch, artifact, metrics, keep)

    def should_stop(self) -> bool:
        return self.stop.is_set()


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
    ) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.threads = threads
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.db = Database(settings.database_url)
        self.store = TrainingStore(self.db)
        self.channels = ServiceChannels(settings, addresses)
        self.artifacts: ArtifactStore = open_artifact_store(settings.artifact_root, settings.s3)
        self.work_root = Path(settings.home) / "work" / "training"
        self.jobs_done = 0

    # -- logs --
    def job_log(self, name: str, attempt: int, message: str, stream: str = "system") -> None:
        lines = message.rstrip("\n").splitlines() or [""]
        events = [
            (
                "log",
                {
                    "attempt": attempt,
                    "rank": 0,
                    "worker": f"workers/{self.name}",
                    "stream": stream,
                    "message": line,
                },
            )
            for line in lines
        ]
        self.store.append_events(name, events)

    # -- the loop --
    async def run(self, stop: asyncio.Event, max_jobs: int | None = None) -> None:
        bus = await EventBus.connect(self.settings, f"aimass-worker-{self.name}")
        await bus.ensure_streams()
        relay = OutboxRelay(self.db, bus)
        relay.start()
        self.relay = relay
        queue = await bus.job_queue(
            "training", ack_wait_s=self.ack_wait_s, max_deliver=self.max_deliver
        )
        await asyncio.to_thread(
            self.store.register_worker,
            self.name,
            socket.gethostname(),
            os.getpid(),
            {"threads": self.threads, "cpus": os.cpu_count()},
        )
        log.info("worker %s pulls training jobs", self.name)
        try:
            while not stop.is_set() and (max_jobs is None or self.jobs_done < max_jobs):
                job = await queue.pull(timeout_s=1.0)
                if job is None:
                    continue
                await self.handle(job)
                self.jobs_done += 1
        finally:
            await asyncio.to_thread(self.store.worker_state, self.name, "GONE")
            await queue.close()
            await relay.stop()
            await bus.close()
            await self.channels.close()
            await asyncio.to_thread(self.db.dispose)

    async def handle(self, delivery: Job) -> None:
        """Runs one delivery to its end and settles it (ack, or nak for a transient error)."""
        name = delivery.name
        try:
            job = await asyncio.to_thread(self.store.begin_attempt, name, self.name)
        except NotFound:
            await delivery.term()
            return
        if job is None:
            await delivery.ack()
            return
        await asyncio.to_thread(self.store.worker_state, self.name, "BUSY", name)
        attempt = job.status.attempt
        work_dir = self.work_root / job_id(name) / str(attempt)
        try:
            async with delivery.keep_alive(self.ack_wait_s / 3):
                await self._run_job(job, work_dir)
            await delivery.ack()
        except Unavailable as err:
            if delivery.num_delivered >= self.max_deliver:
                await self._fail(job, f"gave up after {delivery.num_delivered} attempts: {err}")
                await delivery.ack()
            else:
                self.job_log(name, attempt, f"transient failure, retrying: {err}")
                await delivery.nak(delay_s=2.0)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
            await asyncio.to_thread(self.store.worker_state, self.name, "IDLE")
            self.relay.notify()

    async def _fail(self, job: tpb.TrainingJob, reason: str) -> None:
        await asyncio.to_thread(self.store.finish, job.name, "FAILED", reason=reason)
        await self._after_trial(job)

    async def _run_job(self, job: tpb.TrainingJob, work_dir: Path) -> None:
        name, attempt = job.name, job.status.attempt
        await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
        self.job_log(name, attempt, f"attempt {attempt} on worker {self.name}")
        try:
            version = await fetch_dataset_version(self.channels.get("data"), job.dataset_version)
        except (NotFound, FailedPrecondition) as err:
            await self._fail(job, err.message)
            return
        data = ann.data_signature_from_version(version)
        resume = await self._download_checkpoint(name, work_dir)
        plan = TrainPlan(
            job=name,
            spec=job.model.SerializeToString(),
            config=job.training.SerializeToString(),
            data_signature=data.to_dict(),
            work_dir=str(work_dir),
            resume_from=str(resume) if resume else "",
            threads=self.threads,
        )
        source = ServiceSplitSource(self.channels.address("data"), job.dataset_version)
        loop = asyncio.get_running_loop()
        hooks = _Hooks(self, job, loop, 0)
        hooks.attempt = attempt
        world = max(1, job.resources.processes)
        monitor = asyncio.create_task(self._watch_cancel(name, hooks))
        try:
            result = await asyncio.to_thread(self._train, plan, source, hooks, world)
        except (TrainingFailed, AimassError) as err:
            trace = getattr(err, "traceback_text", "") or traceback.format_exc()
            self.job_log(name, attempt, trace, "stderr")
            reason = str(err) if isinstance(err, TrainingFailed) else err.message
            await self._fail(job, reason)
            return
        except Exception as err:  # user code and anything else: the worker must survive
            self.job_log(name, attempt, traceback.format_exc(), "stderr")
            await self._fail(job, f"training raised {err!r}")
            return
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        if result.cancelled:
            await asyncio.to_thread(
                self.store.finish, name, "CANCELLED", reason="cancelled on request"
            )
            await self._after_trial(job)
            return
        await self._succeed(job, result, data)

    def _train(
        self, plan: TrainPlan, source: ServiceSplitSource, hooks: _Hooks, world: int
    ) -> TrainResult:
        if world > 1:
            hooks.log(f"data parallel over {world} processes (gloo)")
            return run_distributed(plan, source, hooks, world)
        return Trainer(plan, source, hooks).run()

    async def _watch_cancel(self, name: str, hooks: _Hooks) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                if await asyncio.to_thread(self.store.heartbeat, name):
                    hooks.stop.set()
            except AimassError as err:
                log.warning("heartbeat of %s not recorded: %s", name, err)

    async def _download_checkpoint(self, name: str, work_dir: Path) -> Path | None:
        uri = await asyncio.to_thread(self.store.checkpoint_uri, name)
        if not uri:
            return None
        path = work_dir / "resume.pt"
        await self.artifacts.get_file(uri, path)
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
        self, job: tpb.TrainingJob, result: TrainResult, data: ann.DataSignature
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
        self.job_log(
            job.name,
            job.status.attempt,
            f"succeeded after {result.steps} steps"
            + (f"; registered {version}" if version else ""),
        )
        await asyncio.to_thread(
            self.store.finish,
            job.name,
            "SUCCEEDED",
            metrics=metrics,
            model_version=version,
            outputs=outputs,
        )
        await self._after_trial(job)

    async def register(
        self,
        job: tpb.TrainingJob,
        source_job: str,
        outputs: dict[str, Any],
        metrics: dict[str, float],
    ) -> str:
        """Uploads the outputs to the registry and creates the version (idempotent per job)."""
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
    async def _after_trial(self, job: tpb.TrainingJob) -> None:
        """When the job was the last trial of a search to end: rank, register the best."""
        outcome = await asyncio.to_thread(self.store.search_outcome, job.name)
        if outcome is None:
            return
        parent: tpb.TrainingJob = outcome["parent"]
        trials = outcome["trials"]
        best = search.best_trial(trials, parent.hyperparameter_search)
        done = sum(1 for t in trials if t["state"] == "SUCCEEDED")
        if best is None:
            await asyncio.to_thread(
                self.store.finish,
                parent.name,
                "FAILED",
                reason=f"no trial succeeded with metric "
                f"{parent.hyperparameter_search.objective_metric!r}",
            )
            return
        await asyncio.to_thread(self.store.set_best_trial, parent.name, best["name"], done)
        version = ""
        if parent.target_model and best.get("outputs"):
            version = await self.register(parent, best["name"], best["outputs"], best["metrics"])
        metrics = dict(best["metrics"])
        metrics["objective"] = best["metrics"][parent.hyperparameter_search.objective_metric]
        await asyncio.to_thread(
            self.store.finish,
            parent.name,
            "SUCCEEDED",
            metrics=metrics,
            model_version=version,
        )


def _rpc_error(what: str, err: grpc.aio.AioRpcError) -> AimassError:
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{what}: {err.details()}")
    return FailedPrecondition(f"{what} failed: {err.code().name}: {err.details()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aimass worker training", description=__doc__)
    parser.add_argument("--name", default="", help="worker id (default: host-pid-random)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--ack-wait", type=float, default=30.0, help="seconds before redelivery")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = TrainingWorker(
        settings, name=args.name, threads=args.threads, ack_wait_s=args.ack_wait
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
