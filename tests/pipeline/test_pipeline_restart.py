"""A pipeline process killed (SIGKILL) in the middle of a run and started again loses nothing:
the run's state is in the database, its events wait in JetStream's durable consumers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from aimass.common.v1 import common_pb2
from aimass.embedded.components import child_env
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from aimass.training.v1 import training_pb2, training_pb2_grpc
from tests.pipeline.conftest import MLP, SERVICES, open_env, stages_by_name


@contextmanager
def pipeline_process(settings: object, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m aimass.pipeline`` with the stack's settings; killed on exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "aimass.pipeline"], env=child_env(settings),  # type: ignore[arg-type]
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def serving(stub: pipeline_pb2_grpc.PipelineServiceStub, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await stub.ListPipelineRuns(pb.ListPipelineRunsRequest(), timeout=2)
            return
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.3)


async def until(
    stub: pipeline_pb2_grpc.PipelineServiceStub, name: str, done: object
) -> pb.PipelineRun:
    for _ in range(600):
        run = await stub.GetPipelineRun(pb.GetPipelineRunRequest(name=name))
        if done(run):  # type: ignore[operator]
            return run
        await asyncio.sleep(0.25)
    raise AssertionError(f"{name} never got there: {run}")


async def test_killed_pipeline_process_does_not_lose_the_run(tmp_path: Path, nats_url: str) -> None:
    others = [s for s in SERVICES if s != "pipeline"]
    async with open_env(tmp_path, nats_url, others) as env:
        settings = env.stack.settings
        spec = env.spec(
            model={"name": "restart", **MLP},
            training={"optimizer": {"type": "adam", "learning_rate": 0.01}, "epochs": 10},
            evaluation={"metrics": ["accuracy"]},
            release={"alias": "production"},
        )
        training = training_pb2_grpc.TrainingServiceStub(env.stack.channel("training"))
        channel = grpc.aio.insecure_channel(settings.service_address("pipeline"))
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        log = tmp_path / "pipeline.log"
        try:
            with pipeline_process(settings, log) as first:
                await serving(stub)
                run = await stub.CreatePipelineRun(
                    pb.CreatePipelineRunRequest(
                        pipeline_run=pb.PipelineRun(spec=spec), pipeline_run_id="restart-run"
                    )
                )
                # No worker yet: the training job waits on the queue, the run at its train stage.
                waiting = await until(stub, run.name, lambda r: train_stage(r).resource)
                assert train_stage(waiting).state == pb.STAGE_STATE_RUNNING
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=30)
            # The job is trained, and announces it, while no pipeline process runs.
            job = train_stage(waiting).resource
            async with env.training_worker():
                await until_job_ends(training, job)
            with pipeline_process(settings, log):
                await serving(stub)
                final = await until(stub, run.name, lambda r: r.state != pb.RUN_STATE_RUNNING)
        finally:
            await channel.close()
        assert final.state == pb.RUN_STATE_SUCCEEDED, (final.reason, log.read_text()[-3000:])
        stages = stages_by_name(final)
        assert stages["STAGE_TRAIN"].attempt == 1
        assert stages["STAGE_TRAIN"].resource == job
        assert stages["STAGE_EVALUATE"].state == pb.STAGE_STATE_SUCCEEDED
        assert final.summary.model_version == "models/restart/versions/1"
        assert final.summary.alias == "models/restart/aliases/production"
        jobs = await training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest())
        assert [j.name for j in jobs.training_jobs] == [job]


def train_stage(run: pb.PipelineRun) -> pb.StageStatus:
    return stages_by_name(run)["STAGE_TRAIN"]


async def until_job_ends(stub: training_pb2_grpc.TrainingServiceStub, name: str) -> None:
    for _ in range(600):
        job = await stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(name=name))
        if job.status.state == common_pb2.JOB_STATE_SUCCEEDED:
            return
        assert job.status.state != common_pb2.JOB_STATE_FAILED, job.status.reason
        await asyncio.sleep(0.25)
    raise AssertionError(f"{name} never ended")
