"""A pipeline run survives its services being killed: on a real embedded stack, every
service process is SIGKILLed in turn while the digits pipeline runs; the supervisor
restarts each, and the run still ends SUCCEEDED with one version per stage."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import yaml

from aimass.data.examples import write_digits_csv
from aimass.pipeline.v1 import pipeline_pb2 as pb
from aimass.pipeline.v1 import pipeline_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.cli.test_stack import aimass, components, start_stack, status_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KILLED = ("data", "training", "registry", "evaluation", "compression", "routing")
RUN_DEADLINE_S = 420.0
KILL_EVERY_S = 4.0


def short_digits_pipeline(folder: Path, data_root: Path) -> Path:
    """examples/pipelines/digits.yaml with a short training; its data in the stack's data
    folder (the only place the data service reads from)."""
    spec = yaml.safe_load((ROOT / "examples/pipelines/digits.yaml").read_text())
    spec["training"]["epochs"] = 3
    data_root.mkdir(parents=True, exist_ok=True)
    write_digits_csv(data_root)
    path = folder / "digits.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def kill(stack_status: dict, name: str) -> int:
    pid = components(stack_status)[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_run_survives_every_service_being_killed(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "home")
    try:
        spec = short_digits_pipeline(tmp_path, stack.home / "data")
        started = aimass("run", str(spec), "--detach", "--id", "killed", env=stack.env)
        assert started.returncode == 0, started.stderr + started.stdout
        pipeline = f"127.0.0.1:{stack.ports['pipeline']}"
        with grpc.insecure_channel(pipeline) as channel:
            stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
            killed = {}
            deadline = time.monotonic() + RUN_DEADLINE_S
            run = None
            while time.monotonic() < deadline:
                if len(killed) < len(KILLED):
                    time.sleep(KILL_EVERY_S)
                    _, status = status_json(stack)
                    name = KILLED[len(killed)]
                    killed[name] = kill(status, name)
                else:
                    time.sleep(2)
                try:
                    run = stub.GetPipelineRun(
                        pb.GetPipelineRunRequest(name="pipelineRuns/killed"), timeout=10
                    )
                except grpc.RpcError:
                    continue  # the pipeline service answers again once its peers are back
                if run.state != pb.RUN_STATE_RUNNING and len(killed) == len(KILLED):
                    break
        assert run is not None
        reasons = [f"{pb.Stage.Name(s.stage)}: {s.reason}" for s in run.stages if s.reason]
        assert run.state == pb.RUN_STATE_SUCCEEDED, reasons
        _, status = status_json(stack)
        rows = components(status)
        for name, pid in killed.items():
            assert rows[name]["pid"] != pid, name
            assert rows[name]["restarts"] >= 1, name
        with grpc.insecure_channel(f"127.0.0.1:{stack.ports['registry']}") as channel:
            versions = registry_pb2_grpc.RegistryServiceStub(channel).ListModelVersions(
                registry_pb2.ListModelVersionsRequest(parent="models/digits-mlp")
            )
        # Exactly the trained version and its INT8 child: no stage ran twice.
        assert len(versions.model_versions) == 2
    finally:
        aimass("down", env=stack.env)
