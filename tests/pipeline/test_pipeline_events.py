"""Events delivered twice start a stage once; a stage's job is created once per attempt."""

from __future__ import annotations

import asyncio

from aimass.data.v1 import data_pb2
from aimass.evaluation.v1 import evaluation_pb2, evaluation_pb2_grpc
from aimass.pipeline.engine import Engine
from aimass.pipeline.v1 import pipeline_pb2 as pb
from tests.fixtures.stack import record_events
from tests.pipeline.conftest import Env, stages_by_name


async def test_same_event_twice_starts_a_stage_once(env: Env, nats_url: str) -> None:
    version = await env.train_and_register("twice", await env.ingest("twice-pre"), epochs=3)
    engine: Engine = env.stack.contexts["pipeline"].resources["pipeline_engine"]
    # Stop the service's consumers: the start events wait in JetStream while this test
    # delivers them by hand, twice at the same time.
    await engine.stop()
    spec = env.spec(model={"name": "twice", "version": version}, evaluation={})
    async with record_events(nats_url, "test-twice", ["aimass.pipeline.stage.started"]) as log:
        run = await env.start(spec, "twice-run")
        await log.wait_for(lambda events: len(events) == 1)
        first = log.envelopes[0]
        started = await asyncio.gather(engine.on_stage_started(first),
                                       engine.on_stage_started(first))  # fmt: skip
        assert sorted(started) == [False, True]
        # Delivered again later: the stage has moved on, nothing happens.
        assert await engine.on_stage_started(first) is False
        jobs = await env.data.ListIngestJobs(data_pb2.ListIngestJobsRequest())
        assert len([j for j in jobs.ingest_jobs if j.dataset == "datasets/cancer"]) == 1

        # The consumers come back: the stream redelivers the start event (a third copy,
        # ignored) and the run goes on through its events.
        await engine.start(await env.stack.contexts["pipeline"].event_bus())
        run, _ = await env.wait(run.name)
        assert run.state == pb.RUN_STATE_SUCCEEDED, run.reason
        await log.wait_for(lambda events: len(events) == 2)
        evaluate_started = log.envelopes[1]

    # The evaluation's completion event and its start event, both handled again.
    before = await env.pipeline.GetPipelineRun(pb.GetPipelineRunRequest(name=run.name))
    assert await engine.on_stage_started(evaluate_started) is False
    evaluations = evaluation_pb2_grpc.EvaluationServiceStub(env.stack.channel("evaluation"))
    listed = await evaluations.ListEvaluations(evaluation_pb2.ListEvaluationsRequest())
    assert [e.name for e in listed.evaluations] == [stages_by_name(run)["STAGE_EVALUATE"].resource]
    after = await env.pipeline.GetPipelineRun(pb.GetPipelineRunRequest(name=run.name))
    assert after.etag == before.etag
