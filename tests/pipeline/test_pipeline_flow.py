"""A pipeline run end to end through the real services: every stage started by an event."""

from __future__ import annotations

from pathlib import Path

from aimass.pipeline.v1 import pipeline_pb2 as pb
from tests.fixtures.stack import record_events
from tests.pipeline.conftest import Env, stages_by_name

COMPRESSION = {"steps": [{"name": "int8", "quantize_dynamic": {}}]}


async def test_run_goes_from_ingest_to_predict(env: Env, nats_url: str, tmp_path: Path) -> None:
    spec = env.spec(
        training={"optimizer": {"type": "adam", "learning_rate": 0.01}, "epochs": 15},
        evaluation={"metrics": ["accuracy", "roc_auc"]},
        compression=COMPRESSION,
        release={"alias": "production"},
        deploy={"deployment": "cancer"},
    )
    topics = ["aimass.pipeline.>"]
    async with env.training_worker(), record_events(nats_url, "test-pipeline", topics) as events:
        created = await env.start(spec, "cancer-run")
        run, seen = await env.wait(created.name)
        assert run.state == pb.RUN_STATE_SUCCEEDED, run.reason
        stages = stages_by_name(run)
        for name, stage in stages.items():
            assert stage.state == pb.STAGE_STATE_SUCCEEDED, name
        summary = run.summary
        assert summary.dataset_version == "datasets/cancer/versions/1"
        assert sum(summary.split_rows.values()) == 569
        assert summary.model_version == "models/cancer-mlp/versions/1"
        assert stages["STAGE_TRAIN"].resource.startswith("trainingJobs/")
        assert summary.metrics["accuracy"] > 0.85
        assert 0.9 < summary.metrics["roc_auc"] <= 1.0
        assert summary.compressed_version.startswith("models/cancer-mlp/versions/")
        assert [row.step for row in summary.compression] == ["baseline", "int8"]
        assert summary.compression[1].size_ratio > 0
        assert summary.alias == "models/cancer-mlp/aliases/production"
        assert summary.released_version == summary.compressed_version
        assert summary.deployment == "deployments/cancer"
        assert summary.predict_version == summary.compressed_version
        assert summary.predict_server == "routing's in-process ONNX Runtime"
        assert "label" in summary.predict_answer
        # Each stage was started by its own event, in order.
        await events.wait_for(lambda e: any(x.topic.endswith("run.succeeded") for x in e))
        started = [e.payload for e in events.of("aimass.pipeline.stage.started")]
        assert len(started) == 7
        # The Watch stream showed the stages moving one after the other (snapshots may
        # coalesce several changes on a busy machine, but never go backwards).
        done = [
            sum(stage.state == pb.STAGE_STATE_SUCCEEDED for stage in snapshot.stages)
            for snapshot in seen
        ]
        assert len(seen) >= 2
        assert done == sorted(done)
        assert done[-1] == 7
