"""The routing service's engine: servers, deployments, model placement and Predict.

State lives in the database (servers, deployments and their specs); what is
loaded where is this process's view, rebuilt at start by reconciliation
(every deployment's versions written and loaded on its servers, aimass's
entries nobody needs unloaded), so what aimass thinks is deployed is what
Triton serves.

Changes never drop requests: a new plan's versions are loaded and ready
before the plan replaces the old one, and versions only the old plan used
are unloaded after their in-flight requests drained. A failed load marks the
deployment FAILED with the server's message and leaves the previous plan
serving (or none, for a new deployment): nothing is half-routed.

Health: every server is checked every ``health_interval_s`` (ServerLive and
ServerReady), and a server that answers UNAVAILABLE to a request is skipped
for a second at once, so a dead server is out of rotation within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from aimass.core.auth import scope
from aimass.core.errors import (
    AimassError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from aimass.core.events import Envelope, EventBus, unpack
from aimass.core.settings import S3Settings
from aimass.core.telemetry import inject_headers
from aimass.core.triton.s3_repository import parse_s3_repository
from aimass.events.v1 import events_pb2
from aimass.routing.backends import BACKEND_LABEL, UpstreamError, make_backend
from aimass.routing.coalesce import Coalescer, LayoutKey, Metadata, layout_of
from aimass.routing.config import RoutingConfig
from aimass.routing.metrics import RoutingMetrics
from aimass.routing.plan import LoadedModel, Plan, ServerRuntime, serving_options
from aimass.routing.prediction_log import Captured, PredictionLogger, sampled
from aimass.routing.repository import Backend, ServingOptions, entry_name
from aimass.routing.store import RoutingStore, check_id
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.versions import VersionInfo, VersionResolver, check_model_reference
from aimass.routing.wire import validate_inputs

log = logging.getLogger(__name__)

IN_PROCESS = "inferenceServers/in-process"
ALIAS_CONSUMER = "routing-on-alias-moved"
TOPIC_ALIAS_MOVED = "aimass.registry.alias.moved"
MAX_SHADOW_IN_FLIGHT = 64
_TRACER = trace.get_tracer("aimass.routing")


@dataclass
class _Watcher:
    deployment: str | None
    pending: dict[str, pb.RouteTable] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Router:
    """Control plane and data plane of one routing service process."""

    def __init__(
        self,
        store: RoutingStore,
        resolver: VersionResolver,
        config: RoutingConfig,
        max_message_bytes: int,
        metrics: RoutingMetrics | None = None,
        s3: S3Settings | None = None,
    ) -> None:
        self.store = store
        # How to write s3:// model repositories (endpoint, credentials; else boto3's chain).
        self.s3 = s3
        self.resolver = resolver
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics or RoutingMetrics()
        self.servers: dict[str, ServerRuntime] = {}
        self.plans: dict[str, Plan] = {}
        self.states: dict[str, pb.Deployment] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._server_locks: dict[str, asyncio.Lock] = {}
        self._watchers: list[_Watcher] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._shadow_in_flight = 0
        self._health_task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        # Set by the service when prediction logging is available (see prediction_log).
        self.prediction_log: PredictionLogger | None = None
        self.metrics.watch_coalescing(self._coalescing_figures)

    def _coalescing_figures(self) -> list[tuple[str, str, int, int]]:
        return [
            (server.name, model, coalescer.calls, coalescer.requests)
            for server in list(self.servers.values())
            for (model, _), coalescer in list(server.coalescers.items())
        ]

    # ---- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads servers, registers the configured Triton, then reconciles in the background."""
        await self._ensure_builtin_servers()
        for proto in await asyncio.to_thread(self.store.all_servers):
            self._add_server(proto)
        self._health_task = asyncio.create_task(self._health_loop())
        self._spawn(self._reconcile())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self.servers.values():
            await server.backend.close()

    async def subscribe_alias_moves(self, bus: EventBus) -> None:
        await bus.subscribe(ALIAS_CONSUMER, [TOPIC_ALIAS_MOVED], self.on_alias_moved)

    def _spawn(self, coroutine: object) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _ensure_builtin_servers(self) -> None:
        """The in-process backend always exists; the configured Triton is registered once."""
        builtin = [
            (
                IN_PROCESS.split("/")[1],
                pb.InferenceServer(
                    kind=pb.SERVER_KIND_ONNXRUNTIME_IN_PROCESS,
                    description="ONNX Runtime inside the routing service",
                ),
            )
        ]
        if self.config.triton_grpc:
            builtin.append(
                (
                    "local-triton",
                    pb.InferenceServer(
                        kind=pb.SERVER_KIND_TRITON,
                        description="Triton started by the embedded stack",
                        grpc_address=self.config.triton_grpc,
                        http_address=self.config.triton_http,
                        model_repository_uri=self.config.triton_repository,
                    ),
                )
            )
        existing = {s.name for s in await asyncio.to_thread(self.store.all_servers)}
        for server_id, proto in builtin:
            if f"inferenceServers/{server_id}" not in existing:
                with contextlib.suppress(AimassError):
                    await asyncio.to_thread(self.store.create_server, server_id, proto)

    def _add_server(self, proto: pb.InferenceServer) -> ServerRuntime:
        backend = make_backend(proto, self.config.triton_backend, self.max_message_bytes, self.s3)
        runtime = ServerRuntime(proto=proto, backend=backend)
        if runtime.in_process:
            runtime.state = "READY"
        self.servers[proto.name] = runtime
        return runtime

    # ---- servers ------------------------------------------------------------------------

    async def create_server(self, server_id: str, server: pb.InferenceServer) -> pb.InferenceServer:
        check_id(server_id, "inference_server_id")
        if server.kind == pb.SERVER_KIND_UNSPECIFIED:
            server.kind = pb.SERVER_KIND_TRITON
        if server.kind not in pb.ServerKind.values():  # proto3 enums are open
            raise InvalidArgument("inference_server.kind", f"unknown value {server.kind}")
        _check_backend_label(server.labels)
        if server.kind == pb.SERVER_KIND_TRITON and not server.grpc_address:
            raise InvalidArgument(
                "inference_server.grpc_address", "is required for a Triton server"
            )
        if server.memory_budget_bytes < 0:
            raise InvalidArgument("inference_server.memory_budget_bytes", "must be 0 or more")
        _check_repository(server.model_repository_uri)
        created = await asyncio.to_thread(self.store.create_server, server_id, server)
        runtime = self._add_server(created)
        await self._check_server(runtime)
        return self.server_view(runtime)

    def server_view(self, runtime: ServerRuntime) -> pb.InferenceServer:
        view = pb.InferenceServer()
        view.CopyFrom(runtime.proto)
        states = {"READY": 1, "NOT_READY": 2, "UNREACHABLE": 3}
        view.state = states.get(runtime.state, 0)  # type: ignore[assignment]
        view.live = runtime.state in ("READY", "NOT_READY")
        view.ready = runtime.state == "READY"
        view.state_reason = runtime.reason
        users: dict[str, list[str]] = {}
        for plan in self.plans.values():
            if runtime in plan.servers:
                for version in plan.versions():
                    users.setdefault(plan.model_name(version), []).append(plan.name)
        for model in runtime.models.values():
            view.loaded_models.append(
                pb.LoadedModel(
                    triton_model_name=model.name,
                    model_version=model.model_version,
                    state=model.state,
                    reason=model.reason,
                    size_bytes=model.size_bytes,
                    deployments=users.get(model.name, []),
                )
            )
        view.memory_used_bytes = runtime.memory_used()
        return view

    def server(self, name: str) -> ServerRuntime:
        runtime = self.servers.get(name)
        if runtime is None:
            raise NotFound(f"{name} not found")
        return runtime

    async def update_server(
        self, server_id: str, server: pb.InferenceServer, paths: list[str]
    ) -> pb.InferenceServer:
        if "model_repository_uri" in paths:
            _check_repository(server.model_repository_uri)
        if "labels" in paths:
            _check_backend_label(server.labels)
        updated = await asyncio.to_thread(self.store.update_server, server_id, server, paths)
        runtime = self.server(updated.name)
        if {"grpc_address", "model_repository_uri", "labels"} & set(paths):
            await runtime.backend.close()
            runtime.backend = make_backend(
                updated, self.config.triton_backend, self.max_message_bytes, self.s3
            )
        runtime.proto = updated
        await self._check_server(runtime)
        for plan in self.plans.values():
            if runtime in plan.servers:
                self._publish(plan)
        return self.server_view(runtime)

    async def delete_server(self, name: str, etag: str, force: bool) -> None:
        server_id = name.split("/", 1)[1]
        runtime = self.server(name)
        if not force and any(runtime in p.servers for p in self.plans.values()):
            users = [p.name for p in self.plans.values() if runtime in p.servers]
            raise FailedPrecondition(f"{name} serves {users[0]}: move it or delete with force")
        await asyncio.to_thread(self.store.delete_server, server_id, etag, force)
        self.servers.pop(name, None)
        for plan in list(self.plans.values()):
            if runtime in plan.servers:
                plan.servers = [s for s in plan.servers if s is not runtime]
                self._publish(plan)
        for model in list(runtime.models):
            with contextlib.suppress(Exception):
                await runtime.backend.unload(model)
        await runtime.backend.close()

    # ---- health -------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            servers = [s for s in self.servers.values() if not s.in_process]
            await asyncio.gather(*(self._check_server(s) for s in servers), return_exceptions=True)

    async def _check_server(self, runtime: ServerRuntime) -> None:
        timeout = max(0.2, min(self.config.health_interval_s, 1.0))
        state, reason = await runtime.backend.check(timeout)
        if state != "READY" and runtime.state == "READY" and runtime.missed_checks == 0:
            # One late answer from a READY server is a loaded machine more often than a
            # dead server: the next check decides. A request that fails ejects it at once.
            runtime.missed_checks = 1
            return
        runtime.missed_checks = 0
        if (state, reason) == (runtime.state, runtime.reason):
            return
        was_ready = runtime.state == "READY"
        runtime.state, runtime.reason = state, reason
        if state == "READY":
            runtime.ejected_until = 0.0
        log.info("%s is %s %s", runtime.name, state, reason)
        self._spawn(
            asyncio.to_thread(
                self.store.set_server_health, runtime.name.split("/")[1], state, reason
            )
        )
        if state == "READY" and not was_ready and self.ready.is_set():
            # A restarted Triton lost its models: reload what the plans need.
            self._spawn(self._reconcile_server(runtime))
        for plan in self.plans.values():
            if runtime in plan.servers:
                self._publish(plan)

    # ---- reconciliation -------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """At start: every deployment's versions loaded, aimass's unneeded entries unloaded."""
        try:
            await asyncio.gather(
                *(self._check_server(s) for s in self.servers.values()), return_exceptions=True
            )
            for deployment in await asyncio.to_thread(self.store.all_deployments):
                await self._restore(deployment)
            for runtime in list(self.servers.values()):
                await self._unload_unneeded(runtime)
        finally:
            self.ready.set()

    async def _restore(self, deployment: pb.Deployment) -> None:
        deployment_id = deployment.name.split("/", 1)[1]
        async with self._lock(deployment_id):
            try:
                plan = await self._plan(deployment, resolve=True)
                await self._load_plan(plan)
            except AimassError as err:
                self.states[deployment_id] = deployment
                await self._set_state(deployment_id, "FAILED", err.message)
                return
            changed = [v for v, _ in plan.routes] != [r.resolved_version for r in deployment.routes]
            self._activate(deployment_id, plan)
            await self._set_state(deployment_id, "READY", "", bump=changed)

    async def _reconcile_server(self, runtime: ServerRuntime) -> None:
        with contextlib.suppress(Exception):
            index = await runtime.backend.index()
            for name, model in list(runtime.models.items()):
                if index.get(name) != "READY":
                    runtime.forget(name)
                    del model
        for plan in list(self.plans.values()):
            if runtime in plan.servers:
                with contextlib.suppress(AimassError):
                    for version in plan.versions():
                        info = await self.resolver.info(version, "model")
                        await self._ensure_loaded(runtime, info, plan.options)
                self._publish(plan)

    def _needed(self, runtime: ServerRuntime) -> set[str]:
        return {
            plan.model_name(v)
            for plan in self.plans.values()
            if runtime in plan.servers
            for v in plan.versions()
        }

    async def _unload_unneeded(self, runtime: ServerRuntime) -> None:
        needed = self._needed(runtime)
        try:
            index = await runtime.backend.index()
        except Exception:
            return
        # An s3:// repository is listed over the network: not on the event loop.
        try:
            managed = await asyncio.to_thread(runtime.backend.managed)
        except AimassError as err:
            log.warning("%s: cannot list its repository: %s", runtime.name, err.message)
            return
        for name in managed:
            if name not in needed and index.get(name) in ("READY", "LOADING"):
                with contextlib.suppress(AimassError):
                    await runtime.backend.unload(name)
            if name not in needed:
                runtime.forget(name)

    # ---- deployments ----------------------------------------------------------------------

    def _lock(self, deployment_id: str) -> asyncio.Lock:
        return self._locks.setdefault(deployment_id, asyncio.Lock())

    async def validate(self, deployment: pb.Deployment) -> None:
        """Checks a spec without side effects; resolves its routes (fills resolved_version)."""
        if not deployment.routes:
            raise InvalidArgument("deployment.routes", "give at least one route")
        total = 0
        for i, route in enumerate(deployment.routes):
            field = f"deployment.routes[{i}]"
            check_model_reference(route.model, f"{field}.model")
            if not 0 <= route.weight_percent <= 100:
                raise InvalidArgument(
                    f"{field}.weight_percent", f"{route.weight_percent} is not in 0-100"
                )
            total += route.weight_percent
        if total != 100:
            raise InvalidArgument(
                "deployment.routes", f"weights add up to {total}; they must add up to 100"
            )
        if deployment.HasField("shadow") and deployment.shadow.model:
            check_model_reference(deployment.shadow.model, "deployment.shadow.model")
            if not 0 <= deployment.shadow.sample_percent <= 100:
                raise InvalidArgument("deployment.shadow.sample_percent", "must be in (0, 100]")
        config = deployment.serving_config
        for name in ("max_batch_size", "instance_count", "max_queue_size", "max_retries"):
            if getattr(config, name) < 0:
                raise InvalidArgument(f"deployment.serving_config.{name}", "must be 0 or more")
        for size in config.dynamic_batching.preferred_batch_sizes:
            if size <= 0 or (config.max_batch_size and size > config.max_batch_size):
                raise InvalidArgument(
                    "deployment.serving_config.dynamic_batching.preferred_batch_sizes",
                    f"{size} is not in 1..max_batch_size ({config.max_batch_size})",
                )
        if config.HasField("request_timeout") and config.request_timeout.ToNanoseconds() <= 0:
            raise InvalidArgument("deployment.serving_config.request_timeout", "must be positive")
        _check_prediction_logging(config.prediction_logging)
        for i, server in enumerate(deployment.servers):
            if server not in self.servers:
                raise NotFound(f"deployment.servers[{i}]: {server} not found")
        await self._plan(deployment, resolve=True)

    async def _plan(self, deployment: pb.Deployment, *, resolve: bool) -> Plan:
        routes = []
        infos: list[VersionInfo] = []
        for i, route in enumerate(deployment.routes):
            field = f"deployment.routes[{i}].model"
            version = route.resolved_version
            if resolve or not version:
                version = await self.resolver.resolve(route.model, field)
                route.resolved_version = version
            infos.append(await self.resolver.info(version, field))
            routes.append((version, route.weight_percent))
        shadow = None
        if deployment.HasField("shadow") and deployment.shadow.model:
            target = deployment.shadow
            version = await self.resolver.resolve(target.model, "deployment.shadow.model")
            target.resolved_version = version
            infos.append(await self.resolver.info(version, "deployment.shadow.model"))
            shadow = (version, target.sample_percent or 100.0)
        signature = infos[0].signature
        for info in infos[1:]:
            if info.signature.inputs != signature.inputs:
                raise FailedPrecondition(
                    f"deployment.routes: {info.name} takes inputs"
                    f" {_describe(info.signature.inputs)}"
                    f" but {infos[0].name} takes {_describe(signature.inputs)}: every version of a"
                    " deployment must share one signature"
                )
        options = serving_options(deployment.serving_config, self.config.max_queue)
        return Plan(
            deployment=deployment,
            signature=signature,
            options=options,
            routes=routes,
            shadow=shadow,
            servers=self._placement(deployment),
        )

    def _placement(self, deployment: pb.Deployment) -> list[ServerRuntime]:
        if deployment.servers:
            return [self.server(name) for name in deployment.servers]
        tritons = [s for s in self.servers.values() if not s.in_process and s.state == "READY"]
        return tritons or [self.servers[IN_PROCESS]]

    async def create_deployment(
        self, deployment_id: str, deployment: pb.Deployment, validate_only: bool
    ) -> pb.Deployment:
        check_id(deployment_id, "deployment_id")
        await self.validate(deployment)
        if validate_only:
            deployment.name = f"deployments/{deployment_id}"
            return deployment
        created = await asyncio.to_thread(self.store.create_deployment, deployment_id, deployment)
        self.states[deployment_id] = created
        self._spawn(self._roll(deployment_id, created, first=True))
        return created

    async def update_deployment(
        self, deployment_id: str, deployment: pb.Deployment, etag: str
    ) -> pb.Deployment:
        await self.validate(deployment)
        state = "UPDATING" if deployment_id in self.plans else "CREATING"
        updated = await asyncio.to_thread(
            self.store.update_deployment, deployment_id, deployment, etag, state
        )
        self.states[deployment_id] = updated
        self._spawn(self._roll(deployment_id, updated, first=False))
        return updated

    async def _roll(self, deployment_id: str, deployment: pb.Deployment, *, first: bool) -> None:
        """Loads the new plan's versions, swaps it in, then drains and unloads the old ones."""
        async with self._lock(deployment_id):
            try:
                plan = await self._plan(deployment, resolve=False)
                await self._load_plan(plan)
            except AimassError as err:
                log.warning("%s failed: %s", deployment.name, err.message)
                await self._set_state(deployment_id, "FAILED", err.message)
                await self._unload_orphans(_spec_versions(deployment))
                return
            old = self._activate(deployment_id, plan)
            await self._set_state(deployment_id, "READY", "")
        if old is not None:
            await self._drain_and_unload(old)

    async def _load_plan(self, plan: Plan) -> None:
        for server in plan.servers:
            if not server.healthy:
                raise Unavailable(
                    f"{server.name} is {server.state or 'not checked'}: {server.reason}"
                )
            for version in plan.versions():
                info = await self.resolver.info(version, "model")
                await self._ensure_loaded(server, info, plan.options)

    def _activate(self, deployment_id: str, plan: Plan) -> Plan | None:
        old = self.plans.get(deployment_id)
        self.plans[deployment_id] = plan
        self._publish(plan)
        return old

    async def _drain_and_unload(self, old: Plan) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while old.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter, polled)
            await asyncio.sleep(0.02)
        await self._unload_orphans(set(old.versions()))

    async def _unload_orphans(self, candidates: set[str]) -> None:
        """Unloads those of ``candidates`` no live plan uses (a failed roll, a drained plan)."""
        for runtime in list(self.servers.values()):
            needed = self._needed(runtime)
            for name, model in list(runtime.models.items()):
                if name in needed or model.model_version not in candidates:
                    continue
                if model.in_flight:
                    continue
                await self._unload(runtime, name, "unload")

    async def delete_deployment(self, deployment_id: str, etag: str) -> None:
        async with self._lock(deployment_id):
            gone = await asyncio.to_thread(self.store.delete_deployment, deployment_id, etag)
            plan = self.plans.pop(deployment_id, None)
            self.states.pop(deployment_id, None)
            self._publish_deleted(gone.name)
        if plan is not None:
            await self._drain_and_unload(plan)

    async def on_alias_moved(self, envelope: Envelope) -> None:
        """Rolls every deployment that follows the alias onto its new version."""
        moved = unpack(envelope, events_pb2.AliasMoved)
        for deployment_id, deployment in list(self.states.items()):
            references = [r.model for r in deployment.routes]
            if deployment.HasField("shadow"):
                references.append(deployment.shadow.model)
            if moved.alias not in references or moved.new_version == 0:
                continue
            current = await asyncio.to_thread(self.store.get_deployment, deployment_id)
            for route in current.routes:
                if route.model == moved.alias:
                    route.resolved_version = ""
            try:
                await self._plan(current, resolve=True)
            except AimassError as err:
                await self._set_state(deployment_id, "FAILED", err.message)
                continue
            updated = await asyncio.to_thread(
                self.store.update_deployment, deployment_id, current, "", "UPDATING"
            )
            self.states[deployment_id] = updated
            await self._roll(deployment_id, updated, first=False)

    async def _set_state(
        self, deployment_id: str, state: str, reason: str, *, bump: bool = False
    ) -> None:
        updated = await asyncio.to_thread(
            self.store.set_deployment_state, deployment_id, state, reason, bump_revision=bump
        )
        if updated is not None:
            self.states[deployment_id] = updated
            plan = self.plans.get(deployment_id)
            if plan is not None:
                plan.deployment.revision = updated.revision
                plan.deployment.state = updated.state
                self._publish(plan)

    async def get_deployment(self, deployment_id: str) -> pb.Deployment:
        return await asyncio.to_thread(self.store.get_deployment, deployment_id)

    # ---- model placement ------------------------------------------------------------------

    def _server_lock(self, runtime: ServerRuntime) -> asyncio.Lock:
        return self._server_locks.setdefault(runtime.name, asyncio.Lock())

    async def _ensure_loaded(
        self, runtime: ServerRuntime, info: VersionInfo, options: ServingOptions
    ) -> LoadedModel:
        name = entry_name(info.name, options)
        async with self._server_lock(runtime):
            loaded = runtime.models.get(name)
            if loaded is not None and loaded.state == "READY":
                loaded.last_used = time.monotonic()
                return loaded
            await self._make_room(runtime, info.size_bytes, keep=name)
            marker = {"model_version": info.name, "sha256": info.sha256}
            try:
                size = await runtime.backend.load(name, info.path, info.signature, options, marker)
            except AimassError:
                self.metrics.model_events.labels(runtime.name, "load_failed").inc()
                with contextlib.suppress(Exception):
                    await runtime.backend.unload(name)
                raise
            self.metrics.model_events.labels(runtime.name, "load").inc()
            loaded = LoadedModel(name=name, model_version=info.name, size_bytes=size)
            runtime.models[name] = loaded
            return loaded

    async def _make_room(self, runtime: ServerRuntime, size: int, keep: str) -> None:
        """Unloads the least recently used idle models until ``size`` fits the budget."""
        budget = runtime.proto.memory_budget_bytes
        if budget <= 0:
            return
        if size > budget:
            raise ResourceExhausted(
                f"{runtime.name}: the model needs {size} bytes, more than the whole memory budget"
                f" of {budget}"
            )
        used = runtime.memory_used()
        idle = sorted(
            (m for m in runtime.models.values() if m.name != keep and m.in_flight == 0),
            key=lambda m: m.last_used,
        )
        while used + size > budget:
            if not idle:
                raise ResourceExhausted(
                    f"{runtime.name}: loading {keep} ({size} bytes) exceeds the memory budget of"
                    f" {budget} bytes and every loaded model has requests in flight"
                )
            victim = idle.pop(0)
            used -= victim.size_bytes
            await self._unload(runtime, victim.name, "evict")

    async def _unload(self, runtime: ServerRuntime, name: str, event: str) -> None:
        runtime.forget(name)
        try:
            await runtime.backend.unload(name)
        except AimassError as err:
            log.warning("%s: unloading %s failed: %s", runtime.name, name, err.message)
        self.metrics.model_events.labels(runtime.name, event).inc()
        for plan in self.plans.values():
            if runtime in plan.servers:
                self._publish(plan)

    # ---- route tables ---------------------------------------------------------------------

    def route_table(self, deployment_id: str) -> pb.RouteTable:
        plan = self.plans.get(deployment_id)
        if plan is not None:
            return plan.route_table()
        state = self.states.get(deployment_id)
        if state is None:
            raise NotFound(f"deployments/{deployment_id} not found")
        return pb.RouteTable(
            name=f"deployments/{deployment_id}/routeTable",
            deployment=f"deployments/{deployment_id}",
            revision=state.revision,
        )

    def _publish(self, plan: Plan) -> None:
        if not self._watchers:
            return
        table = plan.route_table()
        self._notify(plan.name, table)

    def _publish_deleted(self, name: str) -> None:
        table = pb.RouteTable(name=f"{name}/routeTable", deployment=name, deleted=True)
        self._notify(name, table)

    def _notify(self, name: str, table: pb.RouteTable) -> None:
        for watcher in self._watchers:
            if watcher.deployment in (None, name):
                watcher.pending[name] = table
                watcher.changed.set()

    async def watch(
        self, deployment: str | None, known_revision: int
    ) -> AsyncIterator[pb.RouteTable]:
        """The current table(s), then every change, until the caller leaves."""
        watcher = _Watcher(deployment)
        self._watchers.append(watcher)
        try:
            if deployment is None:
                initial = [p.route_table() for p in self.plans.values()]
            else:
                initial = [self.route_table(deployment.split("/", 1)[1])]
            for table in initial:
                if known_revision == 0 or table.revision > known_revision:
                    yield table
            while True:
                await watcher.changed.wait()
                watcher.changed.clear()
                pending, watcher.pending = watcher.pending, {}
                for table in pending.values():
                    yield table
        finally:
            self._watchers.remove(watcher)

    # ---- data plane -----------------------------------------------------------------------

    def plan_of(self, deployment: str) -> Plan:
        deployment_id = deployment[12:] if deployment.startswith("deployments/") else ""
        plan = self.plans.get(deployment_id)
        if plan is not None:
            scope.check_visible(plan.deployment.project, f"deployment: {deployment}")
            return plan
        if not deployment_id:
            raise InvalidArgument("deployment", f"{deployment!r} is not deployments/{{deployment}}")
        state = self.states.get(deployment_id)
        if state is None:
            raise NotFound(f"deployment: {deployment} not found")
        raise Unavailable(
            f"{deployment} is {pb.DeploymentState.Name(state.state)[17:]}:"
            f" {state.state_reason or 'not serving yet'}"
        )

    async def predict(
        self,
        raw: bytes,
        deadline_s: float | None,
        request_id: Callable[[], str] | None = None,
    ) -> bytes:
        """One Predict: routes the request bytes, answers with Triton's (fields appended).

        A call sampled by the deployment's prediction logging is queued for
        capture after it ended (``request_id`` is asked only then).
        """
        request = pb.PredictRequest.FromString(raw)
        plan = self.plan_of(request.deployment)
        options = plan.options
        if plan.in_flight >= options.max_queue_size:
            raise ResourceExhausted(
                f"{plan.name} has {plan.in_flight} requests queued, its limit"
                " (serving_config.max_queue_size): retry later",
                retry_after_s=0.05,
            )
        if not plan.input_check.passes(request.inputs, request.raw_input_contents):
            validate_inputs(
                request.inputs, request.raw_input_contents, plan.signature, options.max_batch_size
            )
        if request.model_version:
            if request.model_version not in plan.versions():
                raise FailedPrecondition(
                    f"model_version: {plan.name} does not route to {request.model_version}"
                )
            version = request.model_version
        else:
            version = plan.pick(request.routing_key)
        timeout = (
            options.request_timeout_s
            if deadline_s is None
            else min(deadline_s, options.request_timeout_s)
        )
        capture = self.prediction_log is not None and sampled(
            plan.capture.sample_rate, random.random
        )
        started = time.monotonic()
        plan.in_flight += 1
        code = "OK"
        response: bytes | None = None
        try:
            response = await self._forward(plan, version, raw, started + timeout, request)
            if plan.shadow is not None and random.random() * 100 < plan.shadow[1]:
                self._shadow(plan, raw, response)
            return response + plan.wire(version)[2]
        except AimassError as err:
            code = err.code.name
            raise
        finally:
            plan.in_flight -= 1
            elapsed = time.monotonic() - started
            self.metrics.observe(plan.name, version, code, elapsed)
            if capture:
                self._capture(plan, version, raw, response, code, elapsed, request_id)

    def _capture(
        self,
        plan: Plan,
        version: str,
        raw: bytes,
        response: bytes | None,
        code: str,
        elapsed: float,
        request_id: Callable[[], str] | None,
    ) -> None:
        if response is None and code == "OK":
            code = "CANCELLED"
        call = Captured(
            time=time.time(),
            request_id=(request_id() if request_id else "") or uuid.uuid4().hex,
            model_version=version,
            latency_s=elapsed,
            code=code,
            request=raw,
            response=response,
        )
        self.prediction_log.offer(plan.name, plan.capture, call)  # type: ignore[union-attr]

    async def _forward(
        self,
        plan: Plan,
        version: str,
        raw: bytes,
        deadline: float,
        request: pb.PredictRequest | None = None,
    ) -> bytes:
        """The server's answer to ``raw``; ``request`` (parsed) lets it be merged with others."""
        model, suffix, _ = plan.wire(version)
        forward = raw + suffix
        layout = (
            layout_of(request)
            if request is not None and plan.mergeable and self.config.coalesce_max_in_flight > 0
            else None
        )
        tried: set[str] = set()
        attempts = plan.options.max_retries + 1
        last_error: AimassError | None = None
        for _ in range(attempts):
            server = plan.choose(version, tried) or await self._load_on_demand(
                plan, version, tried, deadline
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            loaded = server.models.get(model)
            server.outstanding += 1
            if loaded is not None:
                loaded.in_flight += 1
                loaded.last_used = time.monotonic()
            try:
                return await self._call(
                    plan,
                    version,
                    server,
                    model,
                    self._sender(
                        plan, server, (model, suffix), request, layout, forward, remaining
                    ),
                )
            except UpstreamError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                server.eject()
                tried.add(server.name)
                last_error = err
            finally:
                server.outstanding -= 1
                if loaded is not None:
                    loaded.in_flight -= 1
        if last_error is not None:
            raise last_error
        raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{plan.name}: deadline exceeded")

    def _sender(
        self,
        plan: Plan,
        server: ServerRuntime,
        entry: tuple[str, bytes],
        request: pb.PredictRequest | None,
        layout: tuple[LayoutKey, int] | None,
        forward: bytes,
        timeout_s: float,
    ) -> Callable[[Metadata], Awaitable[bytes]]:
        """How this request reaches ``server``: through the model's coalescer when it can be
        merged with others (see aimass.routing.coalesce), else as its own call."""
        model, suffix = entry
        backend = server.backend
        if layout is None or request is None:
            return lambda metadata: backend.call(model, forward, timeout_s, metadata)
        key, rows = layout
        coalescer = server.coalescers.get((model, key))
        if coalescer is None:

            async def send(body: bytes, seconds: float, metadata: Metadata) -> bytes:
                return await backend.call(model, body, seconds, metadata)

            coalescer = server.coalescers[(model, key)] = Coalescer(
                send,
                suffix,
                plan.options.max_batch_size,
                # Each instance of the model can run a batch at once.
                self.config.coalesce_max_in_flight * plan.options.instance_count,
                # The delay the deployment grants batching (Triton's max_queue_delay).
                plan.options.max_queue_delay_us / 1e6 if plan.options.dynamic_batching else 0.0,
            )
        deadline = time.monotonic() + timeout_s
        return lambda metadata: coalescer.call(request, forward, rows, deadline, metadata)

    async def _call(
        self,
        plan: Plan,
        version: str,
        server: ServerRuntime,
        model: str,
        send: Callable[[Metadata], Awaitable[bytes]],
    ) -> bytes:
        """One call to a server, in a CLIENT span (child of the Predict span) when tracing.

        The span's context goes to Triton as W3C ``traceparent`` metadata, so a
        Triton with OpenTelemetry tracing continues the same trace (a merged call,
        serving several traces, carries none; each caller still has its span).
        """
        if not trace.get_current_span().is_recording():
            return await send(None)
        with _TRACER.start_as_current_span(
            "triton ModelInfer",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "inference.GRPCInferenceService",
                "rpc.method": "ModelInfer",
                "aimass.deployment": plan.name,
                "aimass.model_version": version,
                "aimass.inference_server": server.name,
                "triton.model_name": model,
                "server.address": server.proto.grpc_address,
            },
        ) as span:
            try:
                return await send(tuple(inject_headers().items()))
            except UpstreamError as err:
                span.set_status(Status(StatusCode.ERROR, err.code.name))
                span.set_attribute("rpc.grpc.status_code", err.code.value[0])
                raise

    async def _load_on_demand(
        self, plan: Plan, version: str, tried: set[str], deadline: float
    ) -> ServerRuntime:
        """Loads an evicted version on the least busy server, waiting at most until the deadline."""
        server = plan.any_server(tried)
        if server is None:
            states = ", ".join(f"{s.name} {s.state} {s.reason}".strip() for s in plan.servers)
            raise Unavailable(f"{plan.name}: no healthy server holds {version} ({states})")
        info = await self.resolver.info(version, "model")
        try:
            await asyncio.wait_for(
                self._ensure_loaded(server, info, plan.options),
                max(deadline - time.monotonic(), 0.001),
            )
        except TimeoutError as err:
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{plan.name}: {version} is still loading"
            ) from err
        self._publish(plan)
        return server

    def _shadow(self, plan: Plan, raw: bytes, primary: bytes) -> None:
        if self._shadow_in_flight >= MAX_SHADOW_IN_FLIGHT or plan.shadow is None:
            return
        self._shadow_in_flight += 1
        self._spawn(self._run_shadow(plan, plan.shadow[0], raw, primary))

    async def _run_shadow(self, plan: Plan, version: str, raw: bytes, primary: bytes) -> None:
        try:
            deadline = time.monotonic() + plan.options.request_timeout_s
            answer = await self._forward(plan, version, raw, deadline)
            result = "match" if _same_outputs(primary, answer) else "differ"
        except Exception:
            result = "error"
        finally:
            self._shadow_in_flight -= 1
        self.metrics.shadow.labels(plan.name, version, result).inc()

    async def predict_batch(
        self, request: pb.PredictBatchRequest, deadline_s: float | None
    ) -> pb.PredictBatchResponse:
        if len(request.requests) > 1000:
            raise InvalidArgument("requests", f"has {len(request.requests)} requests; at most 1000")
        if not request.requests:
            raise InvalidArgument("requests", "give at least one request")

        async def one(index: int, item: pb.PredictRequest) -> pb.PredictResult:
            if item.deployment and item.deployment != request.deployment:
                return pb.PredictResult(
                    error=pb.PredictError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        message=f"requests[{index}].deployment: {item.deployment} differs from"
                        f" {request.deployment}",
                    )
                )
            item.deployment = request.deployment
            try:
                raw = await self.predict(item.SerializeToString(), deadline_s)
            except AimassError as err:
                return pb.PredictResult(
                    error=pb.PredictError(code=err.code.value[0], message=err.message)
                )
            return pb.PredictResult(response=pb.PredictResponse.FromString(raw))

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(request.requests)))
        return pb.PredictBatchResponse(results=results)

    async def health(self, deployment_id: str) -> pb.GetDeploymentHealthResponse:
        plan = self.plan_of(f"deployments/{deployment_id}")
        response = pb.GetDeploymentHealthResponse(deployment=plan.name, live=True)
        ready_versions = set()
        for version in plan.versions():
            model = plan.model_name(version)
            for server in plan.servers:
                model_ready = False
                reason = server.reason
                if server.state == "READY":
                    try:
                        model_ready = (await server.backend.index()).get(model) == "READY"
                    except Exception as err:
                        reason = str(err)
                    if not model_ready and not reason:
                        reason = f"{model} is not loaded on {server.name}"
                if model_ready:
                    ready_versions.add(version)
                response.routes.append(
                    pb.RouteHealth(
                        model_version=version,
                        server=server.name,
                        server_live=server.state in ("READY", "NOT_READY"),
                        server_ready=server.state == "READY",
                        model_ready=model_ready,
                        reason=reason,
                    )
                )
        response.ready = all(v in ready_versions for v, w in plan.routes if w > 0)
        response.check_time.GetCurrentTime()
        return response


def _check_prediction_logging(config: pb.PredictionLogging) -> None:
    where = "deployment.serving_config.prediction_logging"
    if math.isnan(config.sample_rate) or not 0.0 <= config.sample_rate <= 1.0:
        raise InvalidArgument(f"{where}.sample_rate", f"{config.sample_rate} is not in [0, 1]")
    if config.calls_per_file < 0:
        raise InvalidArgument(f"{where}.calls_per_file", "must be 0 or more")
    if config.HasField("flush_interval") and config.flush_interval.ToNanoseconds() <= 0:
        raise InvalidArgument(f"{where}.flush_interval", "must be positive")


def _check_backend_label(labels: Mapping[str, str]) -> None:
    """The backend label, when given, names a backend (checked before anything is stored)."""
    value = labels.get(BACKEND_LABEL)
    if value is not None and value not in {b.value for b in Backend}:
        raise InvalidArgument(
            f"inference_server.labels[{BACKEND_LABEL!r}]",
            f"must be one of {sorted(b.value for b in Backend)}, got {value!r}",
        )


def _check_repository(uri: str) -> None:
    """An s3:// repository must be spelled so that Triton reads it too (INVALID_ARGUMENT)."""
    if uri.startswith("s3://"):
        parse_s3_repository(uri, "inference_server.model_repository_uri")


def _describe(tensors: tuple[object, ...]) -> str:
    return "[" + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in tensors) + "]"  # type: ignore[attr-defined]


def _same_outputs(primary: bytes, shadow: bytes) -> bool:
    a, b = pb.PredictResponse.FromString(primary), pb.PredictResponse.FromString(shadow)
    if len(a.raw_output_contents) != len(b.raw_output_contents):
        return False
    for tensor, x, y in zip(a.outputs, a.raw_output_contents, b.raw_output_contents, strict=True):
        if tensor.datatype == "FP32":
            if len(x) != len(y) or not np.allclose(
                np.frombuffer(x, np.float32), np.frombuffer(y, np.float32), atol=1e-4
            ):
                return False
        elif x != y:
            return False
    return True


def _spec_versions(deployment: pb.Deployment) -> set[str]:
    found = {r.resolved_version for r in deployment.routes if r.resolved_version}
    if deployment.HasField("shadow") and deployment.shadow.resolved_version:
        found.add(deployment.shadow.resolved_version)
    return found
