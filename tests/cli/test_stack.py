"""The embedded stack through the real `aimass` command: real processes, real nats-server.

One stack (module scope) serves the read-only checks and the restart check; the
tests that stop a stack or must fail to start one use their own home and ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from aimass.core.settings import Ports
from aimass.core.triton_setup import pytriton_root

CLI_TIMEOUT_S = 120
RESTART_DEADLINE_S = 60.0
# The gRPC services each service process must offer (routing serves two).
# Besides NATS and the services: the REST gateway (probed over HTTP), a training worker
# (no port) and Triton where the nvidia-pytriton wheel is installed.
EXTRA_COMPONENTS = {"gateway", "training-worker"} | ({"triton"} if pytriton_root() else set())
EXPECTED_SERVICES = {
    "data": {"aimass.data.v1.DataService"},
    "training": {"aimass.training.v1.TrainingService"},
    "evaluation": {"aimass.evaluation.v1.EvaluationService"},
    "compression": {"aimass.compression.v1.CompressionService"},
    # The registry process also serves access control (API keys, webhooks).
    "registry": {
        "aimass.registry.v1.RegistryService",
        "aimass.access.v1.AccessService",
        "aimass.access.v1.WebhookService",
    },
    "routing": {"aimass.routing.v1.RoutingService", "aimass.routing.v1.PredictionService"},
    "pipeline": {"aimass.pipeline.v1.PipelineService"},
}
# Statuses a service's own handler gives to an empty request (UNIMPLEMENTED while it is a
# skeleton); UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN or INTERNAL would mean it did not answer.
HANDLER_ANSWERS = {
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OK,
}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    ports: dict[str, int]


def free_ports(names: list[str]) -> dict[str, int]:
    """Distinct free ports, one per name: all held open together so none is handed out twice."""
    sockets = []
    try:
        for _ in names:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return {name: s.getsockname()[1] for name, s in zip(names, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()


def stack_env(home: Path) -> tuple[dict[str, str], dict[str, int]]:
    ports = free_ports(list(Ports.model_fields))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env["AIMASS_HOME"] = str(home)
    env["AIMASS_SHUTDOWN_GRACE_S"] = "3"
    for name, port in ports.items():
        env[f"AIMASS_PORTS__{name.upper()}"] = str(port)
    return env, ports


def aimass(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def status_json(stack: Stack) -> tuple[int, dict]:
    result = aimass("status", "--json", env=stack.env)
    return result.returncode, json.loads(result.stdout)


def components(status: dict) -> dict[str, dict]:
    return {c["name"]: c for c in status["components"]}


def processes_of_home(home: Path) -> list[psutil.Process]:
    """Live processes started for this home: its AIMASS_HOME in their environment, or the
    home in their command line (nats-server's store)."""
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        try:
            in_cmdline = any(str(home) in part for part in proc.info["cmdline"] or [])
            in_env = proc.environ().get("AIMASS_HOME") == str(home)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if in_cmdline or in_env:
            found.append(proc)
    return found


def live_in_group(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_stack(home: Path) -> Stack:
    env, ports = stack_env(home)
    stack = Stack(home=home, env=env, ports=ports)
    try:
        result = aimass("up", "--detach", "--timeout", "90", env=env)
    except subprocess.TimeoutExpired:
        aimass("down", env=env)  # whatever did start must not outlive the test
        raise
    if result.returncode != 0:
        aimass("down", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("stack") / "home")
    yield started
    aimass("down", env=started.env)


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return reply.status


def reflected_services(channel: grpc.Channel) -> tuple[set[str], descriptor_pool.DescriptorPool]:
    database = ProtoReflectionDescriptorDatabase(channel)
    names = {n for n in database.get_services() if n.startswith("aimass.")}
    return names, descriptor_pool.DescriptorPool(database)


def call_first_unary(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, name: str):
    """Calls the service's first unary method with an empty request; returns the status code."""
    service = pool.FindServiceByName(name)
    method = next(m for m in service.methods if not m.client_streaming and not m.server_streaming)
    request = message_factory.GetMessageClass(method.input_type)()
    call = channel.unary_unary(
        f"/{name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda data: data,
    )
    try:
        call(request, timeout=5)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_status_shows_every_component_serving(stack: Stack) -> None:
    code, status = status_json(stack)

    assert code == 0
    assert status["all_serving"] is True
    rows = components(status)
    # The REST gateway (aimass.gateway) is a component too, probed over HTTP.
    assert set(rows) == {"supervisor", "nats", *EXTRA_COMPONENTS, *EXPECTED_SERVICES}
    assert {r["state"] for r in rows.values()} == {"SERVING"}
    assert rows["registry"]["address"] == f"127.0.0.1:{stack.ports['registry']}"
    assert rows["nats"]["address"] == f"127.0.0.1:{stack.ports['nats']}"
    assert (stack.home / "run" / "stack.json").exists()
    assert (stack.home / "logs" / "registry.log").exists()


def test_human_status_lists_components(stack: Stack) -> None:
    result = aimass("status", env=stack.env)

    assert result.returncode == 0, result.stderr
    for name in ("nats", *EXPECTED_SERVICES):
        assert name in result.stdout


def test_each_service_port_answers_health_and_a_domain_rpc(stack: Stack) -> None:
    for name, expected in EXPECTED_SERVICES.items():
        address = f"127.0.0.1:{stack.ports[name]}"
        assert health_of(address) == health_pb2.HealthCheckResponse.SERVING, name
        with grpc.insecure_channel(address) as channel:
            offered, pool = reflected_services(channel)
            assert offered == expected
            for service in sorted(offered):
                code = call_first_unary(channel, pool, service)
                assert code in HANDLER_ANSWERS, f"{service}: {code}"


def test_status_shows_calls_errors_and_queues_of_each_service(stack: Stack) -> None:
    address = f"127.0.0.1:{stack.ports['registry']}"
    with grpc.insecure_channel(address) as channel:
        _, pool = reflected_services(channel)
        for _ in range(3):
            call_first_unary(channel, pool, "aimass.registry.v1.RegistryService")
    _, status = status_json(stack)
    rows = components(status)
    registry = rows["registry"]["metrics"]
    assert registry is not None, rows["registry"]
    assert registry["requests"] >= 3
    # Empty requests are the caller's mistakes (INVALID_ARGUMENT...), not server errors.
    assert all(rows[name]["metrics"]["server_errors"] == 0 for name in EXPECTED_SERVICES)
    # The services that run jobs report their work queues.
    assert "training" in rows["training"]["metrics"]["queued"]
    assert rows["nats"]["metrics"] is None  # not an aimass service: no page of ours
    table = aimass("status", env={**stack.env, "COLUMNS": "200"}).stdout
    assert "calls" in table
    assert "errors" in table


def test_killed_service_is_restarted_and_serves_again(stack: Stack) -> None:
    _, before = status_json(stack)
    old = components(before)["evaluation"]
    os.kill(old["pid"], signal.SIGKILL)

    deadline = time.monotonic() + RESTART_DEADLINE_S
    row = old
    while time.monotonic() < deadline:
        code, status = status_json(stack)
        row = components(status)["evaluation"]
        if code == 0 and row["pid"] != old["pid"] and row["state"] == "SERVING":
            break
        time.sleep(0.5)

    assert row["pid"] != old["pid"]
    assert row["state"] == "SERVING"
    assert row["restarts"] == old["restarts"] + 1
    assert not pid_alive(old["pid"])
    assert health_of(row["address"]) == health_pb2.HealthCheckResponse.SERVING
    log = (stack.home / "logs" / "supervisor.log").read_text()
    assert "restarting" in log
    assert "evaluation" in log


def test_killed_routing_comes_back_with_the_gateway_it_hosts(stack: Stack) -> None:
    """The REST gateway rides in routing's process: when routing dies, the supervisor's
    restart brings REST back too, and status shows the gateway at the new pid."""
    _, before = status_json(stack)
    old = components(before)
    assert old["gateway"]["pid"] == old["routing"]["pid"]
    os.kill(old["routing"]["pid"], signal.SIGKILL)

    deadline = time.monotonic() + RESTART_DEADLINE_S
    rows = old
    while time.monotonic() < deadline:
        code, status = status_json(stack)
        rows = components(status)
        fresh = rows["routing"]["pid"] != old["routing"]["pid"]
        if code == 0 and fresh and rows["gateway"]["state"] == "SERVING":
            break
        time.sleep(0.5)

    assert rows["routing"]["pid"] != old["routing"]["pid"]
    assert rows["gateway"]["pid"] == rows["routing"]["pid"]
    assert rows["gateway"]["state"] == "SERVING"
    url = f"http://{rows['gateway']['address']}/v1/deployments"
    with urllib.request.urlopen(url, timeout=10) as answer:  # served in routing, in process
        assert answer.status == 200
        assert answer.headers["x-aimass-rpc"].endswith("/ListDeployments")
        assert isinstance(json.loads(answer.read()), dict)


def test_down_leaves_no_process_and_status_then_exits_3(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "home")
    _, status = status_json(stack)
    recorded = components(status)
    state = json.loads((stack.home / "run" / "stack.json").read_text())
    groups = [c["pgid"] for c in state["components"]]
    # One group per service, plus nats, the REST gateway and the training worker.
    # NATS, every service and every extra component run in their own process group.
    assert len(groups) == 1 + len(EXPECTED_SERVICES) + len(EXTRA_COMPONENTS)

    result = aimass("down", env=stack.env)

    assert result.returncode == 0, result.stderr
    assert "nothing left running" in result.stdout
    assert [name for name, c in recorded.items() if pid_alive(c["pid"])] == []
    assert [g for g in groups if live_in_group(g)] == []
    assert processes_of_home(stack.home) == []
    assert not (stack.home / "run" / "stack.json").exists()
    after = aimass("status", env=stack.env)
    assert after.returncode == 3
    assert "no stack is running" in after.stderr


def test_taken_port_fails_naming_it_and_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env, ports = stack_env(home)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["registry"]))
        holder.listen(1)

        result = aimass("up", "--detach", env=env)

        assert result.returncode == 1
        assert f"127.0.0.1:{ports['registry']} (registry)" in result.stderr
        assert "already in use" in result.stderr
        assert processes_of_home(home) == []
        assert not (home / "run" / "stack.json").exists()
        assert aimass("status", env=env).returncode == 3


def test_bad_port_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env, _ = stack_env(tmp_path / "home")
    env["AIMASS_PORTS__REGISTRY"] = "notaport"

    result = aimass("up", "--detach", env=env)

    assert result.returncode == 2
    assert "AIMASS_PORTS__REGISTRY" in result.stderr
    assert processes_of_home(tmp_path / "home") == []


def test_port_offset_past_65535_exits_2(tmp_path: Path) -> None:
    env, _ = stack_env(tmp_path / "home")

    result = aimass("up", "--detach", "--port-offset", "70000", env=env)

    assert result.returncode == 2
    assert "--port-offset" in result.stderr


def test_demo_shows_every_service_answering_and_stops_everything(tmp_path: Path) -> None:
    env, _ = stack_env(tmp_path / "unused")
    home = tmp_path / "demo"

    # --services-only: the full demo (both example pipelines) is `make demo`.
    result = aimass("demo", "--home", str(home), "--services-only", env=env)

    assert result.returncode == 0, result.stderr + result.stdout
    assert "UNIMPLEMENTED" in result.stdout
    for name in EXPECTED_SERVICES:
        assert name in result.stdout
    assert "nothing left running" in result.stdout
    assert processes_of_home(home) == []
