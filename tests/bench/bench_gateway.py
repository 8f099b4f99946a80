"""Benchmark of the REST gateway and of the auth interceptor.

    .venv/bin/python tests/bench/bench_gateway.py [--quick] [--out FILE]

1. Auth cost per call: the auth hook alone (AllowAll, an API key, an HS256 JWT, both
   cached as they are after the first call), timed in a tight loop in this process.
2. Auth cost end to end: sequential unary calls (LookupCallerIdentity) to a grpc.aio server
   with auth off, then on (API key), interleaved rounds.
3. REST vs gRPC on the same RPC (registry GetRegisteredModel, auth on, same key): nats-server,
   the registry, the routing service and the gateway run as their own processes, as in
   `aimass up`; one client process drives concurrency C over grpc.aio and over aiohttp,
   interleaved rounds.
4. Predict: a small ONNX MLP (8 -> 16 -> 3, batch of 4 rows) deployed on the routing
   service's in-process ONNX Runtime backend (no Triton). gRPC Predict on the routing
   process against REST POST /v1/deployments/{id}:predict (JSON, base64 raw tensors)
   served by the same routing process (the co-located gateway of `aimass up`: Predict
   called in process, no second hop), and, as an extra column, through the separate
   gateway process (the Envoy-like topology: one more gRPC hop), concurrency 1, 8 and 32,
   interleaved rounds. CPU time per call of the routing process (gRPC and co-located REST)
   and of the separate gateway process.
Medians; ratios against the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import psutil
from joserfc import jwt
from joserfc.jwk import OctKey

from aimass.access.v1 import access_pb2, access_pb2_grpc
from aimass.common.v1 import common_pb2
from aimass.core.auth.api import access_service
from aimass.core.auth.bootstrap import ensure_admin_key
from aimass.core.auth.hook import AccessControl
from aimass.core.auth.keys import SqlKeyStore
from aimass.core.db.engine import Database
from aimass.core.db.migrate import upgrade
from aimass.core.interceptors import AllowAll
from aimass.core.server import create_server
from aimass.core.settings import load_settings
from aimass.embedded.components import nats_server_binary
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.gateway.onnx_mlp import (
    IN_FEATURES,
    deploy_ready,
    mlp_onnx,
    register_onnx,
)

SECRET = "bench-hs256-secret-bench-hs256-secret-0123"
METHOD = "/aimass.registry.v1.RegistryService/GetRegisteredModel"
PREDICT_CONCURRENCY = [1, 8, 32]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- 1. the hook alone ---------------------------------------------------------------------


async def hook_cost(db_url: str, key: str, calls: int) -> dict[str, float]:
    settings = load_settings(database_url=db_url, auth={"enabled": True, "hs256_secret": SECRET})
    control = AccessControl(settings.auth, SqlKeyStore(Database(db_url)))
    token = jwt.encode(
        {"alg": "HS256"},
        {"sub": "bench", "role": "viewer", "exp": int(time.time()) + 3600},
        OctKey.import_key(SECRET),
    )
    # A rate no loop reaches: the bucket's cost is measured, never a refusal.
    control.limiter.default_rate = 1e12
    cases = {
        "AllowAll (auth off)": (AllowAll(), {}),
        "API key (cached)": (control, {"x-api-key": key}),
        "JWT HS256 (cached)": (control, {"authorization": f"Bearer {token}"}),
    }
    results = {}
    for name, (hook, metadata) in cases.items():
        await hook.authenticate(METHOD, metadata)  # warm the caches
        start = time.perf_counter()
        for _ in range(calls):
            await hook.authenticate(METHOD, metadata)
        results[name] = (time.perf_counter() - start) / calls * 1e6
    return results


# ---- 2. interceptor end to end -------------------------------------------------------------


async def sequential_latency(port: int, metadata: tuple, calls: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = access_pb2_grpc.AccessServiceStub(channel)
        request = access_pb2.LookupCallerIdentityRequest()
        for _ in range(50):
            await stub.LookupCallerIdentity(request, metadata=metadata)
        start = time.perf_counter()
        for _ in range(calls):
            await stub.LookupCallerIdentity(request, metadata=metadata)
        return (time.perf_counter() - start) / calls * 1e6


async def interceptor_cost(db_url: str, key: str, calls: int, rounds: int) -> tuple[float, float]:
    database = Database(db_url)
    off = load_settings(database_url=db_url, host="127.0.0.1")
    on = load_settings(
        database_url=db_url, host="127.0.0.1", auth={"enabled": True, "rate_limit_per_s": 1e12}
    )
    service = [access_service(SqlKeyStore(database))]
    plain = await create_server("registry", service, off, port=0)
    secured = await create_server("registry", service, on, port=0)
    off_us, on_us = [], []
    try:
        for _ in range(rounds):
            off_us.append(await sequential_latency(plain.port, (), calls))
            on_us.append(await sequential_latency(secured.port, (("x-api-key", key),), calls))
    finally:
        await plain.stop(0)
        await secured.stop(0)
        database.dispose()
    return statistics.median(off_us), statistics.median(on_us)


# ---- 3. REST vs gRPC -------------------------------------------------------------------------


def start_processes(home: Path, db_url: str) -> tuple[list[subprocess.Popen], dict[str, int]]:
    names = ("registry", "routing", "gateway", "nats", "nats_monitor")
    ports = {name: free_port() for name in names}
    # The REST gateway inside routing (co-located), beside the separate one on ports.gateway.
    co_located = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    env.update(
        {
            "AIMASS_HOME": str(home),
            "AIMASS_DATABASE_URL": db_url,
            "AIMASS_NATS_URL": f"nats://127.0.0.1:{ports['nats']}",
            "AIMASS_AUTH__ENABLED": "true",
            # The benchmark measures throughput, not the limiter's refusals.
            "AIMASS_AUTH__RATE_LIMIT_PER_S": "1e12",
            "AIMASS_LOG_LEVEL": "WARNING",
            # No Triton: the routing service serves with its in-process ONNX Runtime backend.
            "AIMASS_ROUTING_METRICS_PORT": "0",
            **{f"AIMASS_PORTS__{name.upper()}": str(port) for name, port in ports.items()},
        }
    )
    nats = subprocess.Popen(
        [str(nats_server_binary()), "-js", "-sd", str(home / "nats"), "-a", "127.0.0.1",
         "-p", str(ports["nats"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    logs = (home / "logs").open("w")
    processes = [nats]
    routing_env = {
        "AIMASS_CO_LOCATED_GATEWAY": "routing",
        "AIMASS_PORTS__GATEWAY": str(co_located),
    }
    for module, extra in (
        ("aimass.registry", {}),
        ("aimass.routing", routing_env),
        ("aimass.gateway", {}),
    ):
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", module], env={**env, **extra}, stdout=logs, stderr=logs
            )
        )
    return processes, {**ports, "co_located": co_located}


async def wait_ready(ports: dict[str, int], key: str) -> None:
    deadline = time.monotonic() + 60
    for port in (ports["gateway"], ports["co_located"]):
        while True:
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(
                        f"http://127.0.0.1:{port}/v1/models", headers={"x-api-key": key}
                    ) as reply,
                ):
                    if reply.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("a service or gateway did not start (see the logs in the home)")
            await asyncio.sleep(0.3)


# (gRPC method, request, REST path): one RPC that reads the database, one that does not.
CASES = {
    "GetRegisteredModel (SQLite read)": (
        "/aimass.registry.v1.RegistryService/GetRegisteredModel",
        registry_pb2.GetRegisteredModelRequest(name="models/bench"),
        "/v1/models/bench",
    ),
    "LookupCallerIdentity (no I/O)": (
        "/aimass.access.v1.AccessService/LookupCallerIdentity",
        access_pb2.LookupCallerIdentityRequest(),
        "/v1/callerIdentity:lookup",
    ),
}


async def grpc_round(port: int, key: str, case: str, concurrency: int, requests: int) -> float:
    method, message, _ = CASES[case]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)
        request = message.SerializeToString()
        metadata = (("x-api-key", key),)
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(request, metadata=metadata)

        await call(request, metadata=metadata)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - start)


async def rest_round(port: int, key: str, case: str, concurrency: int, requests: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"http://127.0.0.1:{port}{CASES[case][2]}"
        headers = {"x-api-key": key}
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with http.get(url, headers=headers) as reply:
                    await reply.read()
                    assert reply.status == 200, reply.status

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - start)


# ---- 4. Predict ------------------------------------------------------------------------------

BATCH = np.random.default_rng(0).normal(size=(4, IN_FEATURES)).astype(np.float32)


def predict_request(deployment: str) -> routing_pb2.PredictRequest:
    return routing_pb2.PredictRequest(
        deployment=deployment,
        inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=list(BATCH.shape))],
        raw_input_contents=[BATCH.tobytes()],
    )


def predict_body() -> bytes:
    """The same request as proto3 JSON (bytes as base64), as a REST client sends it."""
    tensor = {"name": "input", "datatype": "FP32", "shape": list(BATCH.shape)}
    raw = base64.b64encode(BATCH.tobytes()).decode()
    return json.dumps({"inputs": [tensor], "rawInputContents": [raw]}).encode()


async def drive(concurrency: int, requests: int, call: Callable[[], Awaitable[None]]) -> float:
    """Requests per second of ``requests`` calls spread over ``concurrency`` workers."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    await call()  # warm: connection and first inference
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - start)


async def grpc_predict_round(
    port: int, key: str, deployment: str, concurrency: int, requests: int
) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = routing_pb2_grpc.PredictionServiceStub(channel)
        request = predict_request(deployment)
        metadata = (("x-api-key", key),)

        async def call() -> None:
            reply = await stub.Predict(request, metadata=metadata)
            assert len(reply.raw_output_contents[0]) == BATCH.shape[0] * 3 * 4

        return await drive(concurrency, requests, call)


async def rest_predict_round(
    port: int, key: str, deployment: str, concurrency: int, requests: int
) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"http://127.0.0.1:{port}/v1/{deployment}:predict"
        headers = {"x-api-key": key, "content-type": "application/json"}
        body = predict_body()

        async def call() -> None:
            async with http.post(url, data=body, headers=headers) as reply:
                payload = await reply.read()
                assert reply.status == 200, (reply.status, payload[:200])
                assert json.loads(payload)["rawOutputContents"], payload[:200]

        return await drive(concurrency, requests, call)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class PredictFigures:
    """Medians at one concurrency: requests/s per path and CPU us per call per process."""

    grpc_rps: float
    # REST served by the routing process itself (co-located gateway, in-process Predict).
    local_rps: float
    # REST through the separate gateway process (one more gRPC hop).
    hop_rps: float
    routing_grpc_us: float
    routing_local_us: float
    gateway_us: float


async def cpu_per_call(
    process: psutil.Process, requests: int, run: Awaitable[float]
) -> tuple[float, float]:
    """(requests/s, CPU us of ``process`` per call); ``run`` makes requests + 1 calls."""
    start = cpu_seconds(process)
    rps = await run
    return rps, (cpu_seconds(process) - start) / (requests + 1) * 1e6


async def predict_throughput(
    ports: dict[str, int],
    key: str,
    concurrencies: list[int],
    requests: int,
    rounds: int,
    routing: psutil.Process,
    gateway: psutil.Process,
) -> dict[int, PredictFigures]:
    """Per concurrency, interleaved rounds of gRPC, co-located REST and separate-gateway REST.

    CPU time per call is what the machine's load moves least: on shared cores, throughput
    ratios swing between runs, the work per request does not.
    """
    metadata = (("x-api-key", key),)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['registry']}") as registry,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['routing']}") as routing_channel,
    ):
        registry_stub = registry_pb2_grpc.RegistryServiceStub(registry)
        version = await register_onnx(registry_stub, "bench-mlp", mlp_onnx(), metadata)
        routing_stub = routing_pb2_grpc.RoutingServiceStub(routing_channel)
        deployment = await deploy_ready(routing_stub, "bench-mlp", version, metadata)
    results = {}
    for concurrency in concurrencies:
        samples: dict[str, list[float]] = {name: [] for name in PredictFigures.__annotations__}
        # (round, process whose CPU is counted, figures it fills), in interleaving order.
        paths = (
            (grpc_predict_round, ports["routing"], routing, ("grpc_rps", "routing_grpc_us")),
            (rest_predict_round, ports["co_located"], routing, ("local_rps", "routing_local_us")),
            (rest_predict_round, ports["gateway"], gateway, ("hop_rps", "gateway_us")),
        )
        for _ in range(rounds):
            for predict_round, port, process, (rate_name, cpu_name) in paths:
                # requests + 1 calls (the warm-up call included) per path and round.
                rps, us = await cpu_per_call(
                    process,
                    requests,
                    predict_round(port, key, deployment, concurrency, requests),
                )
                samples[rate_name].append(rps)
                samples[cpu_name].append(us)
        results[concurrency] = PredictFigures(
            **{name: statistics.median(values) for name, values in samples.items()}
        )
    return results


async def rest_vs_grpc(
    home: Path, db_url: str, key: str, concurrency: int, requests: int, rounds: int
) -> tuple[dict[str, tuple[float, float]], dict[int, PredictFigures]]:
    processes, ports = start_processes(home, db_url)
    try:
        await wait_ready(ports, key)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['registry']}") as channel:
            await registry_pb2_grpc.RegistryServiceStub(channel).CreateRegisteredModel(
                registry_pb2.CreateRegisteredModelRequest(registered_model_id="bench"),
                metadata=(("x-api-key", key),),
            )
        results = {}
        for case in CASES:
            grpc_rps, rest_rps = [], []
            for _ in range(rounds):
                grpc_rps.append(
                    await grpc_round(ports["registry"], key, case, concurrency, requests)
                )
                rest_rps.append(
                    await rest_round(ports["gateway"], key, case, concurrency, requests)
                )
            results[case] = (statistics.median(grpc_rps), statistics.median(rest_rps))
        # start_processes: nats, registry, routing, gateway.
        routing, gateway = (psutil.Process(p.pid) for p in processes[2:4])
        predict = await predict_throughput(
            ports, key, PREDICT_CONCURRENCY, requests, rounds, routing, gateway
        )
        return results, predict
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


async def main_async(args: argparse.Namespace) -> str:
    quick = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db_url = f"sqlite:///{home / 'aimass.db'}"
        upgrade(db_url)
        path, _ = ensure_admin_key(home, db_url)
        key = path.read_text().strip()
        hook = await hook_cost(db_url, key, 2_000 if quick else 50_000)
        off_us, on_us = await interceptor_cost(
            db_url, key, 200 if quick else 2_000, 1 if quick else 5
        )
        concurrency = 32
        throughput, predict = await rest_vs_grpc(
            home, db_url, key, concurrency, 500 if quick else 5_000, 1 if quick else 3
        )
    base = hook["AllowAll (auth off)"]
    lines = [
        "# Gateway and access control benchmark",
        "",
        "Auth hook alone (per call, this process):",
        "",
        "| hook | us per call | extra over auth off (us) |",
        "|---|---|---|",
        *(f"| {name} | {us:.2f} | {us - base:.2f} |" for name, us in hook.items()),
        "",
        "Sequential unary gRPC calls (LookupCallerIdentity), auth off vs on (API key):",
        "",
        "| auth | us per call | ratio |",
        "|---|---|---|",
        f"| off | {off_us:.0f} | 1.00 |",
        f"| on (API key) | {on_us:.0f} | {on_us / off_us:.2f} (+{on_us - off_us:.0f} us) |",
        "",
        f"REST through the built-in gateway vs gRPC direct, concurrency {concurrency}, auth on"
        " (services and gateway in their own processes):",
        "",
        "| RPC | gRPC direct requests/s | REST via gateway requests/s | REST / gRPC |",
        "|---|---|---|---|",
        *(f"| {case} | {g:.0f} | {r:.0f} | {r / g:.2f} |" for case, (g, r) in throughput.items()),
        "",
        "Predict, REST :predict vs gRPC Predict on the routing process, auth on:"
        f" ONNX MLP 8-16-3 on the in-process ONNX Runtime backend, batch {BATCH.shape[0]}."
        " REST served by the routing process itself (co-located gateway, Predict called in"
        " process; goal REST / gRPC >= 0.70), and through the separate gateway process"
        " (one more gRPC hop):",
        "",
        "| concurrency | gRPC requests/s | REST co-located requests/s | REST co-located / gRPC"
        " | REST separate requests/s | REST separate / gRPC"
        " | routing CPU us per gRPC call | routing CPU us per REST call"
        " | separate gateway CPU us per REST call |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {c} | {f.grpc_rps:.0f} | {f.local_rps:.0f} | {f.local_rps / f.grpc_rps:.2f}"
            f" | {f.hop_rps:.0f} | {f.hop_rps / f.grpc_rps:.2f} | {f.routing_grpc_us:.0f}"
            f" | {f.routing_local_us:.0f} | {f.gateway_us:.0f} |"
            for c, f in predict.items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    table = asyncio.run(main_async(args))
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
