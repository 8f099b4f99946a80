"""A service as the process it runs as: `python -m aimass.registry`, health, SIGTERM, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.core.db.migrate import upgrade

GRACE_S = 2.0
START_DEADLINE_S = 60.0
# Beyond the drain grace: interpreter shutdown, closing resources.
EXIT_MARGIN_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(home: Path, port: int, nats_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(
        {
            "AIMASS_HOME": str(home),
            "AIMASS_PORTS__REGISTRY": str(port),
            "AIMASS_SHUTDOWN_GRACE_S": str(GRACE_S),
            "AIMASS_NATS_URL": nats_url,
        }
    )
    return env


def start_registry(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aimass.registry"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def exit_code(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The process's exit status; killed (never leaked) when it outlives timeout_s."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="aimass.registry.v1.RegistryService"),
                timeout=1,
            )
        except grpc.RpcError:
            return None
    return reply.status


def wait_serving(proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"registry exited with {proc.returncode}: {log.read_text()}")
        if health(address) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    pytest.fail(f"registry not SERVING on {address}: {log.read_text()}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home whose SQLite database is at the schema head."""
    home = tmp_path / "home"
    home.mkdir()
    # As `aimass up` does: services may refuse a schema that is not at head.
    upgrade(f"sqlite:///{home / 'aimass.db'}")
    return home


def test_registry_process_serves_then_exits_0_on_sigterm(
    home: Path, tmp_path: Path, nats_url: str
) -> None:
    port = free_port()
    log = tmp_path / "registry.log"
    proc = start_registry(service_env(home, port, nats_url), log)
    try:
        wait_serving(proc, f"127.0.0.1:{port}", log)
    except BaseException:
        exit_code(proc, 0.1)
        raise

    proc.send_signal(signal.SIGTERM)
    code = exit_code(proc, GRACE_S + EXIT_MARGIN_S)

    assert code == 0, log.read_text()
    assert health(f"127.0.0.1:{port}") is None


def test_taken_port_exits_1_naming_it(home: Path, tmp_path: Path, nats_url: str) -> None:
    log = tmp_path / "registry.log"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = start_registry(service_env(home, port, nats_url), log)
        code = exit_code(proc, START_DEADLINE_S)

    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in log.read_text()


def test_bad_setting_exits_2_naming_the_variable(home: Path, tmp_path: Path) -> None:
    env = service_env(home, free_port(), "nats://127.0.0.1:4232")
    env["AIMASS_PORTS__REGISTRY"] = "notaport"
    log = tmp_path / "registry.log"

    code = exit_code(start_registry(env, log), START_DEADLINE_S)

    assert code == 2
    assert "AIMASS_PORTS__REGISTRY" in log.read_text()
