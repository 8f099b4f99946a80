"""A deployment as the data plane sees it: versions, weights, servers and the route table.

A :class:`Plan` is immutable in its routes; the router swaps the whole plan
when a deployment changes (new versions loaded first), so a request always
sees one consistent set of routes. Weighted choice maps a uniform point in
[0, 100) onto cumulative weights; a routing key hashes to a fixed point, so
the same key keeps its version while the weights stay the same.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from aimass.routing.prediction_log import CaptureOptions
from aimass.routing.repository import (
    TRITON_VERSION,
    ServingOptions,
    Signature,
    entry_name,
)
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.wire import InputCheck, string_field

DEFAULT_TIMEOUT_S = 10.0
# How long a server that answered UNAVAILABLE is skipped before it is tried again.
EJECT_S = 1.0


@dataclass
class LoadedModel:
    name: str
    model_version: str
    size_bytes: int
    state: str = "READY"
    reason: str = ""
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


@dataclass
class ServerRuntime:
    """An inference server's live state in this router."""

    proto: pb.InferenceServer
    backend: Any
    state: str = "UNKNOWN"
    reason: str = ""
    ejected_until: float = 0.0
    # Failed health checks in a row while READY (one is forgiven, see Router._check_server).
    missed_checks: int = 0
    outstanding: int = 0
    models: dict[str, LoadedModel] = field(default_factory=dict)
    # (model entry, tensor layout) -> its Coalescer (aimass.routing.coalesce).
    coalescers: dict[tuple[str, Any], Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def in_process(self) -> bool:
        return self.proto.kind == pb.SERVER_KIND_ONNXRUNTIME_IN_PROCESS

    @property
    def healthy(self) -> bool:
        return self.state == "READY" and time.monotonic() >= self.ejected_until

    def eject(self) -> None:
        self.ejected_until = time.monotonic() + EJECT_S

    def has_ready(self, model: str) -> bool:
        loaded = self.models.get(model)
        return loaded is not None and loaded.state == "READY"

    def forget(self, model: str) -> None:
        """Drops what this router keeps about a model entry that left the server."""
        self.models.pop(model, None)
        for key in [k for k in self.coalescers if k[0] == model]:
            del self.coalescers[key]

    def memory_used(self) -> int:
        return sum(m.size_bytes for m in self.models.values() if m.state == "READY")


def serving_options(config: pb.ServingConfig, default_queue: int) -> ServingOptions:
    kinds = {pb.INSTANCE_KIND_CPU: "CPU", pb.INSTANCE_KIND_GPU: "GPU"}
    timeout = (
        config.request_timeout.ToTimedelta().total_seconds()
        if config.HasField("request_timeout")
        else DEFAULT_TIMEOUT_S
    )
    batching = config.dynamic_batching
    return ServingOptions(
        max_batch_size=config.max_batch_size,
        dynamic_batching=config.HasField("dynamic_batching"),
        max_queue_delay_us=batching.max_queue_delay_microseconds or 100,
        preferred_batch_sizes=tuple(batching.preferred_batch_sizes),
        instance_count=max(config.instance_count, 1),
        instance_kind=kinds.get(config.instance_kind, "CPU"),
        max_queue_size=(config.max_queue_size * max(config.instance_count, 1))
        if config.max_queue_size
        else default_queue,
        request_timeout_s=timeout or DEFAULT_TIMEOUT_S,
        max_retries=config.max_retries,
    )


def sticky_point(key: str) -> float:
    """A fixed point in [0, 100) for a routing key."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


@dataclass
class Plan:
    """The live routes of one deployment."""

    deployment: pb.Deployment
    signature: Signature
    options: ServingOptions
    # (version, weight percent) in route order, versions resolved.
    routes: list[tuple[str, int]]
    shadow: tuple[str, float] | None
    servers: list[ServerRuntime]
    in_flight: int = 0
    version_in_flight: Counter[str] = field(default_factory=Counter)
    _bounds: list[float] = field(default_factory=list)
    _versions: list[str] = field(default_factory=list)
    # Per version, computed once: (entry name, bytes appended to the request for
    # Triton, bytes appended to Triton's answer). Predict pays no encoding.
    _wire: dict[str, tuple[str, bytes, bytes]] = field(default_factory=dict)
    # Prediction logging of this deployment (sample rate 0: nothing captured).
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    # The signature's inputs, precomputed for the check of every request.
    input_check: InputCheck = field(init=False)
    mergeable: bool = field(init=False)

    def __post_init__(self) -> None:
        self.input_check = InputCheck(self.signature, self.options.max_batch_size)
        # Requests can be merged along the batch dimension only when the model has one and
        # every tensor has a fixed item size (BYTES elements carry their own lengths).
        self.mergeable = self.options.max_batch_size > 0 and all(
            t.datatype != "BYTES" for t in (*self.signature.inputs, *self.signature.outputs)
        )
        self.capture = CaptureOptions.from_proto(self.deployment.serving_config.prediction_logging)
        total = 0.0
        for version, weight in self.routes:
            if weight > 0:
                total += weight
                self._bounds.append(total)
                self._versions.append(version)
        for version in self.versions():
            model = entry_name(version, self.options)
            self._wire[version] = (
                model,
                string_field(1, model) + string_field(2, TRITON_VERSION),
                string_field(1, self.deployment.name) + string_field(2, version),
            )

    def model_name(self, version: str) -> str:
        """The Triton entry serving ``version`` for this deployment."""
        wire = self._wire.get(version)
        return wire[0] if wire is not None else entry_name(version, self.options)

    def wire(self, version: str) -> tuple[str, bytes, bytes]:
        """(entry name, request suffix for Triton, response suffix for the caller)."""
        return self._wire[version]

    @property
    def name(self) -> str:
        return self.deployment.name

    def versions(self) -> list[str]:
        """Every version the plan serves, shadow included."""
        found = [v for v, _ in self.routes]
        if self.shadow is not None:
            found.append(self.shadow[0])
        return list(dict.fromkeys(found))

    def routed(self, version: str) -> bool:
        return any(v == version for v, _ in self.routes)

    def pick(self, routing_key: str) -> str:
        point = sticky_point(routing_key) if routing_key else random.random() * 100.0
        index = bisect.bisect_right(self._bounds, point * self._bounds[-1] / 100.0)
        return self._versions[min(index, len(self._versions) - 1)]

    def choose(self, version: str, exclude: set[str]) -> ServerRuntime | None:
        """The healthy server holding ``version`` with the fewest requests outstanding."""
        model = self.model_name(version)
        best = None
        for server in self.servers:
            if server.name in exclude or not server.healthy or not server.has_ready(model):
                continue
            if best is None or server.outstanding < best.outstanding:
                best = server
        return best

    def any_server(self, exclude: set[str]) -> ServerRuntime | None:
        """A healthy server of the placement, for loading an evicted version on demand."""
        candidates = [s for s in self.servers if s.healthy and s.name not in exclude]
        return min(candidates, key=lambda s: s.outstanding, default=None)

    def route_table(self) -> pb.RouteTable:
        table = pb.RouteTable(
            name=f"{self.name}/routeTable",
            deployment=self.name,
            revision=self.deployment.revision,
            request_timeout=Duration(
                seconds=int(self.options.request_timeout_s),
                nanos=int(self.options.request_timeout_s % 1 * 1e9),
            ),
            max_retries=self.options.max_retries,
            update_time=_now(),
        )
        table.entries.extend(self._entries([(v, float(w)) for v, w in self.routes]))
        if self.shadow is not None:
            table.shadow_entries.extend(self._entries([(self.shadow[0], 100.0)]))
            table.shadow_sample_percent = self.shadow[1]
        return table

    def _entries(self, routes: list[tuple[str, float]]) -> list[pb.RouteEntry]:
        entries = []
        for version, weight in routes:
            model = self.model_name(version)
            holders = [s for s in self.servers if s.healthy and s.has_ready(model)]
            for server in holders:
                entries.append(
                    pb.RouteEntry(
                        server=server.name,
                        grpc_address=server.proto.grpc_address,
                        http_address=server.proto.http_address,
                        triton_model_name=model,
                        triton_model_version=TRITON_VERSION,
                        model_version=version,
                        weight=weight / len(holders),
                    )
                )
        return entries


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
