"""Benchmark of serving through aimass against NVIDIA Triton called directly, same run.

    .venv/bin/python tests/bench/bench_serving.py [--quick] [--out FILE]

Starts NATS, Triton (the nvidia-pytriton wheel's CPU server, python backend running
ONNX Runtime), and the registry and routing services as their own processes; registers
the digits MLP (64-512-256-10) and a Transformer classifier (encoder d256, 4 layers,
4 heads, seq 64; smaller with --quick) as ONNX, deploys each with dynamic batching,
then measures from this one client process (closed loop, grpc.aio):

- Triton direct: raw ModelInfer on one channel, outputs decoded to numpy as the SDK
  does, the baseline of every ratio;
- the fast path: ``aimass.serving.Endpoint`` (route table watched, Triton called directly);
- the router hop: ``PredictionService.Predict`` on the routing service;
- the hop's ceiling: a grpc.aio server in its own process answering fixed bytes, and
  the same server behind aimass's interceptor and tracer (the interceptor's cost);
- added latency of the hop at batch 1 (p50, p99), the dynamic-batching gain, and
  canary weights (90/10) over 10,000 requests on both paths;
- the peers of the MLP at concurrency 1/8/32: ONNX Runtime in this process (threads
  calling one session with one intra-op thread, no network), aimass REST (POST :predict
  through the REST gateway co-located in the routing process as `aimass up` runs it,
  JSON with base64 tensors, then the router and Triton), and
  ``mlflow models serve`` of the same ONNX model (POST /invocations; its own .venv-mlflow,
  see mlflow_peer.py; the row is skipped with the reason printed when that cannot be
  installed). Both HTTP rows use one aiohttp session with keep-alive and the same closed
  loop as the gRPC rows.

Targets are measured in interleaved rounds; rates are medians over rounds and ratios
medians of the per-round ratios (2 noisy cores).
``--profile-router FILE`` runs the routing service under cProfile and writes its stats.
With ``--out FILE``, every measured figure also goes to FILE with the suffix .json
(tests/bench/report.py draws the plots from it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aimass.core.db.migrate import upgrade
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc
from aimass.serving import Endpoint, encode_request
from aimass.serving.endpoint import INFER_METHOD, decode_response
from tests.bench import mlflow_peer
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import free_port
from tests.routing.conftest import RoutingStack, TritonProcess

CEILING_SERVER = """
import asyncio, sys, grpc
async def main():
    server = registration = grpc.aio.server()
    if sys.argv[3] == "intercepted":  # the wrapper every aimass service registers (server.py)
        from aimass.core.interceptors import AimassServerInterceptor, InterceptedRegistration
        from aimass.core.settings import TracingSettings
        from aimass.core.telemetry import configure_tracing
        configure_tracing("routing", TracingSettings())
        registration = InterceptedRegistration(server, AimassServerInterceptor("routing"))
    answer = bytes.fromhex(sys.argv[2])
    async def handle(request, context):
        return answer
    handler = grpc.unary_unary_rpc_method_handler(handle)
    registration.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "aimass.routing.v1.PredictionService", {"Predict": handler}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def export_mlp() -> bytes:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()
    return _export(model, torch.zeros(2, 64), "input")


def export_transformer(quick: bool) -> bytes:
    import torch

    d, layers = (128, 2) if quick else (256, 4)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(1000, d)
            layer = torch.nn.TransformerEncoderLayer(d, 4, d * 4, batch_first=True, dropout=0.0)
            self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    torch.manual_seed(0)
    return _export(Classifier().eval(), torch.zeros(2, 64, dtype=torch.int64), "tokens")


def _export(model: object, example: object, input_name: str) -> bytes:
    import torch

    torch.set_num_threads(1)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (example,), buffer, input_names=[input_name], output_names=["logits"],
        dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    return buffer.getvalue()


PROFILED_SERVICE = """
import cProfile, signal, sys
from aimass.core.service import run_service
profiler = cProfile.Profile()
def dump(*_):
    profiler.disable()
    profiler.dump_stats(sys.argv[2])
    raise SystemExit(0)
signal.signal(signal.SIGUSR1, dump)
module = __import__(f"aimass.{sys.argv[1]}.main", fromlist=["build"])
profiler.enable()
run_service(sys.argv[1], module.build)
"""


def start_service(
    name: str, env: dict[str, str], log: Path, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """The service as its own process; with ``profile``, under cProfile (stats on SIGUSR1)."""
    command = [sys.executable, "-m", f"aimass.{name}"]
    if profile is not None:
        command = [sys.executable, "-c", PROFILED_SERVICE, name, str(profile)]
    return subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def wait_serving(address: str, timeout_s: float = 180) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not start")
            await asyncio.sleep(0.2)


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    """Requests per second and every latency, ``concurrency`` callers for ``seconds``."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    for _ in range(20):  # warm-up
        await call()
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


def threaded_loop(
    call: Callable[[], object], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    """closed_loop's figures for a blocking call: ``concurrency`` threads for ``seconds``."""
    latencies: list[float] = []  # list.append is atomic under the GIL

    def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - started)

    for _ in range(20):  # warm-up
        call()
    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    began = time.perf_counter()
    stop = began + seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - began), latencies


async def call_counts(metrics_port: int, model: str) -> tuple[float, float]:
    """(calls the router sent to Triton, requests they carried) for one model entry."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        text = await answer.text()
    found = {"aimass_server_calls_total": 0.0, "aimass_server_call_requests_total": 0.0}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in found and f'model="{model}"' in rest:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found["aimass_server_calls_total"], found["aimass_server_call_requests_total"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


PEER_CONCURRENCY = (1, 8, 32)
IN_PROCESS, REST, MLFLOW = "onnxruntime in-process", "aimass REST", "mlflow models serve"
# The MLP's paths in the peer table and plots, fastest-possible first.
PATHS = {
    IN_PROCESS: "ONNX Runtime in-process", "direct": "Triton direct (gRPC)",
    "fast path": "aimass SDK fast path", "router": "aimass router (gRPC)",
    REST: "aimass REST (gateway)", MLFLOW: "mlflow models serve",
}  # fmt: skip
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class Peers:
    """The MLP's peer paths: target -> call (the in-process one blocks), and their client."""

    calls: dict[str, Callable[[], Any]]
    http: aiohttp.ClientSession
    mlflow_skipped: str | None  # why the mlflow row is missing, if it is


def rest_caller(
    http: aiohttp.ClientSession, port: int, feeds: dict[str, np.ndarray]
) -> Callable[[], Awaitable[np.ndarray]]:
    """POST :predict through the gateway: proto3 JSON, tensors as base64 raw bytes."""
    url = f"http://127.0.0.1:{port}/v1/deployments/mlp:predict"
    ((name, array),) = feeds.items()
    body = json.dumps({
        "inputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape)}],
        "rawInputContents": [base64.b64encode(array.tobytes()).decode()],
    }).encode()  # fmt: skip

    async def call() -> np.ndarray:
        async with http.post(url, data=body, headers=JSON_HEADERS) as reply:
            payload = await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"REST :predict answered {reply.status}: {payload[:200]!r}")
        raw = json.loads(payload)["rawOutputContents"][0]
        return np.frombuffer(base64.b64decode(raw), np.float32)

    return call


def mlflow_caller(
    http: aiohttp.ClientSession, port: int, feeds: dict[str, np.ndarray]
) -> Callable[[], Awaitable[np.ndarray]]:
    """POST /invocations of ``mlflow models serve``: tensors as JSON lists, decoded to numpy."""
    url = f"http://127.0.0.1:{port}/invocations"
    body = mlflow_peer.invocation_body(feeds)

    async def call() -> np.ndarray:
        async with http.post(url, data=body, headers=JSON_HEADERS) as reply:
            payload = await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"/invocations answered {reply.status}: {payload[:200]!r}")
        predictions = json.loads(payload)["predictions"]
        if isinstance(predictions, dict):  # one entry per named output
            predictions = predictions["logits"]
        return np.asarray(predictions, np.float32)

    return call


async def wait_http(http: aiohttp.ClientSession, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with http.get(url) as reply:
                if reply.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200")
        await asyncio.sleep(0.3)


async def start_peers(
    base: Path, ports: dict[str, int], onnx_bytes: bytes, feeds: dict[str, np.ndarray],
    processes: list[subprocess.Popen[bytes]],
) -> Peers:  # fmt: skip
    """In-process ORT, aimass REST and mlflow serving the MLP, checked to answer alike."""
    import onnxruntime as ort

    # One intra-op thread: a batch-1 MLP gains nothing from more, and idle pool threads
    # spinning in this client process would slow the other rows down.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    def in_process() -> np.ndarray:
        return session.run(None, feeds)[0]

    # One client for both HTTP rows: keep-alive, at most one connection per caller.
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(PEER_CONCURRENCY)))
    await wait_http(http, f"http://127.0.0.1:{ports['gateway']}/healthz")
    calls: dict[str, Callable[[], Any]] = {
        IN_PROCESS: in_process, REST: rest_caller(http, ports["gateway"], feeds)
    }  # fmt: skip
    skipped = None
    port = free_port()
    try:
        processes.append(
            await asyncio.to_thread(mlflow_peer.start, onnx_bytes, base / "mlflow", port)
        )
        calls[MLFLOW] = mlflow_caller(http, port, feeds)
    except mlflow_peer.PeerUnavailable as err:
        skipped = str(err)
        print(f"the {MLFLOW} row is skipped: {skipped}", flush=True)
    expected = in_process()
    for target, call in calls.items():  # the same model answers on every path
        answer = call() if target == IN_PROCESS else await call()
        if not np.allclose(np.reshape(answer, expected.shape), expected, atol=1e-4):
            raise RuntimeError(f"{target} answered {answer}, in-process ORT {expected}")
    return Peers(calls, http, skipped)


async def run(quick: bool, profile: Path | None = None) -> tuple[list[str], dict]:
    # Many short interleaved rounds: each ratio is the median of per-round ratios, so a
    # burst of load from elsewhere moves one round's pair, not the figure.
    seconds, rounds = (1.5, 1) if quick else (2.0, 7)
    canary_n = 2000 if quick else 10_000
    base = Path(tempfile.mkdtemp(prefix="aimass-bench-serving-"))
    nats = NatsServer(base / "nats")
    nats.start()
    triton = TritonProcess(base / "models", base / "triton.log")
    triton.start()
    db_url = f"sqlite:///{base / 'aimass.db'}"
    upgrade(db_url)
    ports = {
        "registry": free_port(), "routing": free_port(), "gateway": free_port(),
        "routing_metrics": free_port(),
    }  # fmt: skip
    env = dict(os.environ)
    env.update({
        "AIMASS_HOME": str(base / "home"), "AIMASS_DATABASE_URL": db_url,
        "AIMASS_ARTIFACT_ROOT": (base / "artifacts").as_uri(), "AIMASS_NATS_URL": nats.url,
        "AIMASS_PORTS__REGISTRY": str(ports["registry"]),
        "AIMASS_PORTS__ROUTING": str(ports["routing"]), "AIMASS_LOG_LEVEL": "WARNING",
        "AIMASS_PORTS__GATEWAY": str(ports["gateway"]),
        "AIMASS_ROUTING_TRITON_GRPC": triton.grpc_address,
        "AIMASS_ROUTING_TRITON_REPOSITORY": str(triton.repository),
        "AIMASS_ROUTING_METRICS_PORT": str(ports["routing_metrics"]),
    })  # fmt: skip
    ceiling_port = free_port()
    # The REST gateway rides in routing's process, as `aimass up` runs it.
    routing_env = {**env, "AIMASS_CO_LOCATED_GATEWAY": "routing"}
    processes = [
        start_service("registry", env, base / "registry.log"),
        start_service("routing", routing_env, base / "routing.log", profile),
    ]
    try:
        routing_address = f"127.0.0.1:{ports['routing']}"
        await wait_serving(f"127.0.0.1:{ports['registry']}")
        await wait_serving(routing_address)
        return await measure(
            base, triton, routing_address, ports, ceiling_port, seconds, rounds, canary_n,
            quick, processes,
        )  # fmt: skip
    finally:
        if profile is not None:
            processes[1].send_signal(signal.SIGUSR1)
            processes[1].wait(timeout=60)
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        triton.stop()
        nats.stop()


async def measure(
    base: Path, triton: TritonProcess, routing_address: str, ports: dict[str, int],
    ceiling_port: int, seconds: float, rounds: int, canary_n: int, quick: bool,
    processes: list[subprocess.Popen[bytes]],
) -> tuple[list[str], dict]:  # fmt: skip
    from aimass.registry.v1 import registry_pb2_grpc

    registry_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['registry']}")
    routing_channel = grpc.aio.insecure_channel(routing_address)
    stack = RoutingStack(
        settings=None, config=None,  # type: ignore[arg-type]
        registry=registry_pb2_grpc.RegistryServiceStub(registry_channel),
        routing=routing_pb2_grpc.RoutingServiceStub(routing_channel),
        prediction=routing_pb2_grpc.PredictionServiceStub(routing_channel),
        routing_address=routing_address, channels=[],
    )  # fmt: skip
    config = pb.ServingConfig(
        max_batch_size=64, dynamic_batching=pb.DynamicBatching(max_queue_delay_microseconds=200),
        instance_kind=pb.INSTANCE_KIND_CPU,
    )  # fmt: skip
    servers = ["inferenceServers/local-triton"]
    mlp_onnx = await asyncio.to_thread(export_mlp)
    mlp = await stack.register("mlp", mlp_onnx)
    mlp_b = await stack.register("mlp", await asyncio.to_thread(export_mlp))
    transformer = await stack.register(
        "transformer", await asyncio.to_thread(export_transformer, quick)
    )
    await stack.deploy("mlp", [(mlp, 100)], servers=servers, serving_config=config)
    await stack.deploy("transformer", [(transformer, 100)], servers=servers, serving_config=config)
    await stack.deploy("canary", [(mlp, 90), (mlp_b, 10)], servers=servers, serving_config=config)
    rng = np.random.default_rng(0)
    inputs = {
        "mlp": {"input": rng.random((1, 64), dtype=np.float32)},
        "transformer": {"tokens": rng.integers(0, 1000, (1, 64), dtype=np.int64)},
    }
    triton_channel = grpc.aio.insecure_channel(triton.grpc_address)
    infer = triton_channel.unary_unary(INFER_METHOD)
    predict = routing_channel.unary_unary("/aimass.routing.v1.PredictionService/Predict")
    ceiling_answer = b""
    results: dict[tuple[str, str, int], list[tuple[float, list[float]]]] = {}

    def direct_call(model: str, name: str) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            request = encode_request(inputs[model])
            request.deployment, request.model_version = name, "1"
            # Outputs decoded to numpy, as any caller (and the SDK) does.
            return decode_response(
                pb.PredictResponse.FromString(await infer(request.SerializeToString()))
            )

        return call

    def router_call(model: str) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            request = encode_request(inputs[model])
            request.deployment = f"deployments/{model}"
            return pb.PredictResponse.FromString(await predict(request.SerializeToString()))

        return call

    endpoints = {m: Endpoint(routing_address, m) for m in ("mlp", "transformer", "canary")}
    for endpoint in endpoints.values():
        await endpoint.start()

    def fast_call(model: str) -> Callable[[], Awaitable[object]]:
        endpoint = endpoints[model]

        async def call() -> object:
            return await endpoint.predict(inputs[model])

        return call

    first = await router_call("mlp")()
    ceiling_answer = first.SerializeToString()  # type: ignore[attr-defined]
    ceiling_channels = []
    intercepted_port = free_port()
    for port, mode in ((ceiling_port, "plain"), (intercepted_port, "intercepted")):
        processes.append(
            subprocess.Popen(  # noqa: ASYNC220 (started once, before measuring)
                [sys.executable, "-c", CEILING_SERVER, str(port), ceiling_answer.hex(), mode]
            )
        )
        ceiling_channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    await asyncio.sleep(2.0)

    def ceiling_call(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
        ceiling_predict = channel.unary_unary("/aimass.routing.v1.PredictionService/Predict")

        async def call() -> object:
            request = encode_request(inputs["mlp"])
            request.deployment = "deployments/mlp"
            return pb.PredictResponse.FromString(await ceiling_predict(request.SerializeToString()))

        return call

    for model, endpoint in endpoints.items():  # on a loaded machine the first table is late
        deadline = time.monotonic() + 120
        while not (endpoint.route_table and endpoint.route_table.entries):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no route table for deployments/{model}")
            await asyncio.sleep(0.2)
    names = {m: endpoints[m].route_table.entries[0].triton_model_name for m in inputs}
    peers = await start_peers(base, ports, mlp_onnx, inputs["mlp"], processes)
    plan = []
    for model in ("mlp", "transformer"):
        for concurrency in (1, 8, 16, 32) if model == "mlp" else (1, 16, 32):
            plan.append((model, "direct", concurrency, direct_call(model, names[model])))
            plan.append((model, "fast path", concurrency, fast_call(model)))
            plan.append((model, "router", concurrency, router_call(model)))
    for concurrency in (1, 16, 32):
        plan.append(("mlp", "ceiling", concurrency, ceiling_call(ceiling_channels[0])))
        plan.append(("mlp", "intercepted", concurrency, ceiling_call(ceiling_channels[1])))
    for concurrency in PEER_CONCURRENCY:
        plan += [("mlp", target, concurrency, call) for target, call in peers.calls.items()]
    merges: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for model, target, concurrency, call in plan:
            if model == "transformer" and concurrency == 1 and target == "fast path":
                continue
            before = await call_counts(ports["routing_metrics"], names[model])
            results.setdefault((model, target, concurrency), []).append(
                await asyncio.to_thread(threaded_loop, call, concurrency, seconds)
                if target == IN_PROCESS
                else await closed_loop(call, concurrency, seconds)
            )
            if target == "router":
                after = await call_counts(ports["routing_metrics"], names[model])
                calls, requests = after[0] - before[0], after[1] - before[1]
                merges.setdefault((model, concurrency), []).append(requests / max(calls, 1))

    def rate(model: str, target: str, concurrency: int) -> float:
        return statistics.median(r for r, _ in results[(model, target, concurrency)])

    def ratio(model: str, target: str, base: str, concurrency: int) -> float:
        """Median over rounds of target/base measured side by side in the same round."""
        pairs = zip(
            results[(model, target, concurrency)], results[(model, base, concurrency)], strict=True
        )
        return statistics.median(t / b for (t, _), (b, _) in pairs)

    def lat(model: str, target: str, q: float) -> float:
        return statistics.median(pct(lats, q) for _, lats in results[(model, target, 1)])

    # Canary weights over canary_n requests on both paths.
    async def canary_router() -> pb.PredictResponse:
        request = encode_request(inputs["mlp"])
        request.deployment = "deployments/canary"
        return pb.PredictResponse.FromString(await predict(request.SerializeToString()))

    shares = {}
    for path, endpoint_call in (
        ("fast path", lambda: endpoints["canary"].predict(inputs["mlp"])),
        ("router", canary_router),
    ):
        answers = []
        for start in range(0, canary_n, 256):
            batch = min(256, canary_n - start)
            answers.extend(await asyncio.gather(*(endpoint_call() for _ in range(batch))))
        shares[path] = sum(a.model_version.endswith("/2") for a in answers) / len(answers)

    for endpoint in endpoints.values():
        await endpoint.close()
    for channel in (triton_channel, *ceiling_channels, registry_channel, routing_channel):
        await channel.close()
    await peers.http.close()

    rows = [
        "| measure | value | goal |",
        "|---|---|---|",
    ]
    for model in ("mlp", "transformer"):
        for concurrency in (16, 32):
            base_rate = rate(model, "direct", concurrency)
            rows.append(
                f"| {model}: Triton direct, c={concurrency} | {base_rate:,.0f} req/s | baseline |"
            )
            rows.append(
                f"| {model}: fast path / direct, c={concurrency} |"
                f" {ratio(model, 'fast path', 'direct', concurrency):.2f}x"
                f" ({rate(model, 'fast path', concurrency):,.0f} req/s) |"
                f" {'>= 0.95' if concurrency == 32 else ''} |"
            )
            rows.append(
                f"| {model}: router / direct, c={concurrency} |"
                f" {ratio(model, 'router', 'direct', concurrency):.2f}x"
                f" ({rate(model, 'router', concurrency):,.0f} req/s) |"
                f" {'>= 0.85' if (model, concurrency) == ('transformer', 16) else ''} |"
            )
    for concurrency in (16, 32):
        ceiling_rate = rate("mlp", "ceiling", concurrency)
        rows.append(
            f"| mlp: router / do-nothing grpc.aio server, c={concurrency} |"
            f" {ratio('mlp', 'router', 'ceiling', concurrency):.2f}x"
            f" (ceiling {ceiling_rate:,.0f} req/s) | >= 0.6 |"
        )
        rows.append(
            f"| do-nothing server with aimass's interceptor / without, c={concurrency} |"
            f" {ratio('mlp', 'intercepted', 'ceiling', concurrency):.2f}x"
            f" ({rate('mlp', 'intercepted', concurrency):,.0f} req/s) | (cost of the interceptor) |"
        )
    for (model, concurrency), merged in sorted(merges.items()):
        rows.append(
            f"| {model}: router, requests per Triton call (coalescing), c={concurrency} |"
            f" {statistics.median(merged):.2f} | |"
        )
    for q, goal in ((50, "<= 1 ms"), (99, "<= 3 ms")):
        added = lat("mlp", "router", q) - lat("mlp", "direct", q)
        rows.append(
            f"| mlp: router added latency, batch 1, p{q} | {added:.2f} ms"
            f" (direct {lat('mlp', 'direct', q):.2f} ms) | {goal} |"
        )
    gain = rate("mlp", "fast path", 32) / rate("mlp", "fast path", 1)
    rows.append(f"| mlp: fast path c=32 / c=1 (dynamic batching gain) | {gain:.2f}x | >= 3x |")
    for path, share in shares.items():
        rows.append(
            f"| canary 90/10 over {canary_n:,} requests, {path}: share of v2 |"
            f" {share * 100:.1f}% | 10% +- 2 |"
        )
    rows += peer_rows(results, peers)
    return rows, figures(results, peers, shares)


def peer_rows(
    results: dict[tuple[str, str, int], list[tuple[float, list[float]]]], peers: Peers
) -> list[str]:
    """The MLP on every path at PEER_CONCURRENCY, with its ratios to in-process ORT and Triton."""

    def rate(target: str, concurrency: int) -> float:
        return statistics.median(r for r, _ in results[("mlp", target, concurrency)])

    def lat(target: str, concurrency: int, q: float) -> float:
        return statistics.median(pct(lats, q) for _, lats in results[("mlp", target, concurrency)])

    rows = [
        "",
        "MLP 64-512-256-10, batch 1, on every path at concurrency 1/8/32 (medians of the"
        " rounds); requests/s as ratios to ONNX Runtime in this process and to Triton direct,"
        " same run:",
        "",
        "| path | concurrency | req/s | p50 ms | p99 ms | / in-process ORT | / Triton direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, label in PATHS.items():
        for c in PEER_CONCURRENCY:
            if ("mlp", target, c) not in results:
                continue
            rows.append(
                f"| {label} | {c} | {rate(target, c):,.0f} | {lat(target, c, 50):.2f} |"
                f" {lat(target, c, 99):.2f} | {rate(target, c) / rate(IN_PROCESS, c):.3f}x |"
                f" {rate(target, c) / rate('direct', c):.2f}x |"
            )
    rows.append("")
    if peers.mlflow_skipped:
        rows.append(f"{MLFLOW}: skipped ({peers.mlflow_skipped}).")
    else:
        rows.append(
            f"{MLFLOW}: mlflow {mlflow_peer.MLFLOW_VERSION} in .venv-mlflow, the same ONNX file"
            " saved with mlflow.onnx.save_model (tensor signature), `mlflow models serve -m DIR"
            " --env-manager local` with its default server settings; requests"
            ' `{"inputs": {"input": [[64 floats]]}}`.'
        )
    return rows


def figures(
    results: dict[tuple[str, str, int], list[tuple[float, list[float]]]], peers: Peers,
    shares: dict[str, float],
) -> dict:  # fmt: skip
    """Every measured target as machine-readable medians, for report.py's plots."""
    rows = []
    for (model, target, concurrency), runs in sorted(results.items()):
        rows.append({
            "model": model, "path": target, "label": PATHS.get(target, target),
            "concurrency": concurrency, "rounds": len(runs),
            "rps": statistics.median(r for r, _ in runs),
            **{f"p{q}_ms": statistics.median(pct(lats, q) for _, lats in runs)
               for q in (50, 90, 99)},
        })  # fmt: skip
    return {
        "bench": "serving", "paths": list(PATHS), "rows": rows, "canary_share_v2": shares,
        "mlflow": {"version": mlflow_peer.MLFLOW_VERSION, "skipped": peers.mlflow_skipped},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument(
        "--profile-router", type=Path, help="run the routing service under cProfile, stats here"
    )
    args = parser.parse_args()
    started = time.monotonic()
    rows, measured = asyncio.run(run(args.quick, args.profile_router))
    text = "\n".join(
        [
            "# Serving: aimass against Triton called directly",
            "",
            "One closed-loop grpc.aio client process; Triton of nvidia-pytriton (CPU, python"
            " backend running ONNX Runtime), dynamic batching (max 64, 200 us); ratios against"
            " Triton direct measured in the same run"
            f" ({'--quick' if args.quick else 'full'}; {time.monotonic() - started:.0f} s).",
            "",
            *rows,
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text)
        measured.update(quick=args.quick, seconds=round(time.monotonic() - started))
        args.out.with_suffix(".json").write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
