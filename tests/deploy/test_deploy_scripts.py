"""deploy/scripts: the container health check against a real gRPC server, and
the Triton registration requests."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aimass.routing.v1 import routing_pb2
from tests.deploy.deploy_files import DEPLOY

SCRIPTS = DEPLOY / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def health_server():
    server = aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, servicer
    await server.stop(0)


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    # A process of its own, as Docker runs it (a blocking client beside the test's loop).
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "healthcheck.py"), str(port), "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_healthcheck_passes_only_while_serving(health_server):
    port, servicer = health_server
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = await asyncio.to_thread(run_healthcheck, port)
    assert result.returncode == 0, result.stderr
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = await asyncio.to_thread(run_healthcheck, port)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_healthcheck(port)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_register_requests_one_server_per_statefulset_member():
    script = load_script("register_triton")
    requests = script.server_requests(
        "triton-{i}", "triton-{i}.triton:8001", "triton-{i}.triton:8000", "/models", 2
    )
    assert [r.inference_server_id for r in requests] == ["triton-0", "triton-1"]
    assert [r.inference_server.grpc_address for r in requests] == [
        "triton-0.triton:8001",
        "triton-1.triton:8001",
    ]
    assert all(r.inference_server.kind == routing_pb2.SERVER_KIND_TRITON for r in requests)
    assert requests[1].inference_server.model_repository_uri == "/models"


def test_register_refuses_a_count_below_one(capsys):
    script = load_script("register_triton")
    with pytest.raises(SystemExit):
        script.main(["--count", "0"])
    assert "--count must be at least 1" in capsys.readouterr().err


def test_scripts_are_executable_with_a_shebang():
    for path in SCRIPTS.glob("*.py"):
        assert Path(path).read_text().startswith("#!/usr/bin/env python3\n"), path.name
