"""A pipeline run across a NATS crash: the pipeline service runs as its own process
(``python -m aimass.pipeline``), the services it drives run in the test process (as in
tests/pipeline), and the NATS server is SIGKILLed while the run's ingest job is in flight,
then restarted on the same store. The run finishes, its ingest ran once, one dataset
version exists, and the run's events are in the stream once each.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from aimass.data.v1 import data_pb2
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from tests.faults.procs import ServiceProcess, report, running, stored_events
from tests.fixtures.nats import NatsServer
from tests.pipeline.conftest import SERVICES, open_env, stages_by_name

pytestmark = pytest.mark.slow

DOWN_S = 2.0
RUN_DEADLINE_S = 150.0


async def until(
    stub: pipeline_pb2_grpc.PipelineServiceStub, name: str, done: object
) -> pb.PipelineRun:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S
    while True:
        run = await stub.GetPipelineRun(pb.GetPipelineRunRequest(name=name), timeout=10)
        if done(run):  # type: ignore[operator]
            return run
        assert loop.time() < deadline, f"{name} never got there: {run}"
        await asyncio.sleep(0.1)


async def test_pipeline_run_survives_a_nats_crash(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The in-process router's Prometheus endpoint off: its fixed default port may be taken.
    monkeypatch.setenv("AIMASS_ROUTING_METRICS_PORT", "0")
    others = [s for s in SERVICES if s != "pipeline"]
    async with open_env(tmp_path, nats_server.url, others) as env:
        settings = env.stack.settings
        version = await env.train_and_register("fault", await env.ingest("fault-pre"), epochs=10)
        spec = env.spec(
            model={"name": "fault", "version": version},
            evaluation={"metrics": ["accuracy"]},
            release={"alias": "production"},
        )
        pipeline = ServiceProcess.service("pipeline", settings)
        channel = grpc.aio.insecure_channel(settings.service_address("pipeline"))
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        try:
            with running(pipeline):
                await asyncio.to_thread(pipeline.start)
                run = await stub.CreatePipelineRun(
                    pb.CreatePipelineRunRequest(
                        pipeline_run=pb.PipelineRun(spec=spec), pipeline_run_id="fault-run"
                    )
                )
                await until(stub, run.name, lambda r: stages_by_name(r)["STAGE_INGEST"].resource)
                before = {e.id for e in await stored_events(nats_server.url)}
                nats_server.stop(kill=True)
                killed = time.monotonic()
                await asyncio.sleep(DOWN_S)
                await asyncio.to_thread(nats_server.start)
                restarted = time.monotonic()
                final = await until(stub, run.name, lambda r: r.state != pb.RUN_STATE_RUNNING)
                done_s = time.monotonic() - restarted
                assert pipeline.alive(), pipeline.log_tail()
        finally:
            await channel.close()
        ingest = await env.data.GetIngestJob(
            data_pb2.GetIngestJobRequest(name=stages_by_name(final)["STAGE_INGEST"].resource)
        )
        versions = await env.data.ListDatasetVersions(
            data_pb2.ListDatasetVersionsRequest(
                parent=ingest.dataset_version.split("/versions/")[0]
            )
        )
        after = await stored_events(nats_server.url)

    assert final.state == pb.RUN_STATE_SUCCEEDED, (final.reason, pipeline.log_tail())
    stages = stages_by_name(final)
    assert stages["STAGE_INGEST"].attempt == 1
    assert stages["STAGE_EVALUATE"].state == pb.STAGE_STATE_SUCCEEDED
    assert final.summary.alias == "models/fault/aliases/production"
    assert [v.name for v in versions.dataset_versions] == [ingest.dataset_version]
    ids = Counter(e.id for e in after)
    assert before <= set(ids), "events stored before the kill were lost"
    assert [i for i, n in ids.items() if n > 1] == []
    run_events = Counter(e.topic for e in after if e.subject == final.name)
    assert run_events, "the run announced nothing"
    report(
        f"NATS SIGKILLed mid-pipeline (ingest stage in flight), back after {DOWN_S:.0f}s",
        nats_down=restarted - killed,
        run_done_after_restart=done_s,
    )
