"""The supervisor's all-or-nothing start-up, with real processes that fail in real ways."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil
import pytest

from aimass.core.settings import Ports, load_settings
from aimass.embedded.components import ComponentSpec, plan
from aimass.embedded.errors import StartupFailed
from aimass.embedded.layout import StackLayout
from aimass.embedded.supervisor import RestartPolicy, Supervisor


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def settings_for(home: Path):
    nats, monitor, broken = free_ports(3)
    ports = Ports(nats=nats, nats_monitor=monitor, registry=broken)
    return load_settings(home=home, ports=ports.model_dump(), shutdown_grace_s=2.0), broken


def broken_component(layout: StackLayout, port: int, code: str) -> ComponentSpec:
    return ComponentSpec(
        name="broken",
        kind="grpc",
        argv=(sys.executable, "-c", code),
        address=f"127.0.0.1:{port}",
        ports=(("broken", port),),
        log=layout.log_of("broken"),
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_component_that_exits_fails_start_up_with_its_log_and_stops_nats(
    tmp_path: Path,
) -> None:
    settings, port = settings_for(tmp_path / "home")
    layout = StackLayout(settings.home)
    code = "print('boom: cannot read the model spec'); raise SystemExit(3)"
    specs = [*plan(settings, layout, []), broken_component(layout, port, code)]
    supervisor = Supervisor(settings, components=specs, startup_timeout_s=30)

    with pytest.raises(StartupFailed) as failure:
        await supervisor.start()

    assert failure.value.component == "broken"
    assert "exited with code 3" in failure.value.message
    assert "boom: cannot read the model spec" in failure.value.message
    nats_pid = int(layout.log_of("nats").read_text().split("[", 2)[1].split("]")[0])
    assert gone(nats_pid)
    assert not layout.state_file.exists()


async def test_a_component_that_never_serves_times_out_and_is_killed(tmp_path: Path) -> None:
    settings, port = settings_for(tmp_path / "home")
    layout = StackLayout(settings.home)
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
    supervisor = Supervisor(
        settings, components=[broken_component(layout, port, code)], startup_timeout_s=2
    )

    with pytest.raises(StartupFailed) as failure:
        await supervisor.start()

    assert "not SERVING" in failure.value.message
    pid = int(layout.log_of("broken").read_text().splitlines()[-1])
    assert gone(pid)


def test_restart_delay_doubles_up_to_the_cap_and_resets_after_a_healthy_run() -> None:
    policy = RestartPolicy(initial_delay_s=0.5, max_delay_s=4.0, reset_after_s=60.0)

    delays = []
    delay = None
    for _ in range(6):
        delay = policy.next_delay(delay, ran_for_s=1.0)
        delays.append(delay)

    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.next_delay(4.0, ran_for_s=120.0) == 0.5
