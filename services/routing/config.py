"""Settings of the routing service that the shared Settings do not carry.

Read from ``AIMASS_ROUTING_*`` environment variables (the embedded stack sets
them when it starts a Triton), or passed directly by tests:

- ``AIMASS_ROUTING_TRITON_GRPC``: "host:port" of a Triton to register at start
  as ``inferenceServers/local-triton`` (the embedded stack's own);
- ``AIMASS_ROUTING_TRITON_HTTP``: its HTTP address;
- ``AIMASS_ROUTING_TRITON_REPOSITORY``: the folder of its model repository;
- ``AIMASS_ROUTING_TRITON_BACKEND``: "python" (the nvidia-pytriton wheel, the
  default) or "onnxruntime" (NGC images);
- ``AIMASS_ROUTING_METRICS_PORT``: Prometheus port (default: ``ports.metrics``;
  0 turns the endpoint off);
- ``AIMASS_ROUTING_HEALTH_INTERVAL_S``: seconds between health checks (0.5);
- ``AIMASS_ROUTING_MAX_QUEUE``: requests a deployment may have in flight in
  this router when its serving config sets no limit (1024);
- ``AIMASS_ROUTING_COALESCE_IN_FLIGHT``: calls per model instance and server
  before further requests queue to be merged into one batched call (1; 0
  turns coalescing off, see :mod:`aimass.routing.coalesce`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aimass.core.settings import Settings, SettingsError
from aimass.routing.coalesce import DEFAULT_MAX_IN_FLIGHT
from aimass.routing.repository import Backend

PREFIX = "AIMASS_ROUTING_"
LOCAL_TRITON = "local-triton"


@dataclass(frozen=True)
class RoutingConfig:
    triton_grpc: str = ""
    triton_http: str = ""
    triton_repository: str = ""
    triton_backend: Backend = Backend.PYTHON
    metrics_port: int = 0
    health_interval_s: float = 0.5
    max_queue: int = 1024
    # Where downloaded ONNX files are cached, by sha256.
    cache_dir: Path = Path(".aimass/routing-cache")
    # How long an old version may drain before it is unloaded after a roll.
    drain_timeout_s: float = 30.0
    # Calls per model instance and server before requests queue to be merged (0: never).
    coalesce_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> RoutingConfig:
        env = os.environ if env is None else env

        def get(key: str, default: str) -> str:
            return env.get(PREFIX + key, default)

        try:
            backend = Backend(get("TRITON_BACKEND", Backend.PYTHON.value))
            return cls(
                triton_grpc=get("TRITON_GRPC", ""),
                triton_http=get("TRITON_HTTP", ""),
                triton_repository=get("TRITON_REPOSITORY", ""),
                triton_backend=backend,
                metrics_port=int(get("METRICS_PORT", str(settings.ports.metrics))),
                health_interval_s=float(get("HEALTH_INTERVAL_S", "0.5")),
                max_queue=int(get("MAX_QUEUE", "1024")),
                coalesce_max_in_flight=_non_negative(
                    "COALESCE_IN_FLIGHT", get("COALESCE_IN_FLIGHT", str(DEFAULT_MAX_IN_FLIGHT))
                ),
                cache_dir=settings.home / "routing-cache",
            )
        except ValueError as err:
            raise SettingsError(f"{PREFIX}*: {err}") from err


def _non_negative(key: str, value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{PREFIX}{key} must be 0 or more, got {number}")
    return number
