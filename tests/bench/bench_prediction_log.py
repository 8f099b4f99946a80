"""Benchmark: what prediction logging costs Predict (router path), sampling 0 against 1.0.

    .venv/bin/python tests/bench/bench_prediction_log.py [--quick] [--out FILE]

Starts NATS, Triton (the nvidia-pytriton wheel's CPU server) and the registry and
routing services as their own processes, registers a digits-sized MLP (64-512-256-10,
random weights) as ONNX and deploys it four times: on the in-process ONNX Runtime
backend and on Triton, each with ``prediction_logging.sample_rate`` 0 and 1.0 (files
flushed every second, so writing Parquet happens during the measurement). From one
client process (closed loop, grpc.aio): sequential calls (p50, p99) and 8 concurrent
callers (requests/s, p99), at batch 1 and batch 32. Targets are measured in
interleaved rounds and the median kept (2 noisy cores); every ratio compares sampling
1.0 with sampling 0 on the same backend in the same run. The rows written and the
samples dropped are read back from the prediction_logs table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import duration_pb2
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aimass.core.db.migrate import upgrade
from aimass.registry.v1 import registry_pb2_grpc
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc
from aimass.serving import encode_request
from tests.bench.bench_serving import start_service, wait_serving
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import free_port
from tests.routing.conftest import RoutingStack, TritonProcess

PREDICT = "/aimass.routing.v1.PredictionService/Predict"


def mlp_onnx() -> bytes:
    """64-512-256-10 with ReLU, random weights, dynamic batch axis."""
    rng = np.random.default_rng(0)
    sizes = [64, 512, 256, 10]
    nodes, weights, current = [], [], "input"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = np.zeros(n_out, np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        gemm = "logits" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm], [f"h{i}"]))
        current = gemm if last else f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    for _ in range(20):
        await call()
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def run(quick: bool) -> list[str]:
    seconds, rounds = (1.0, 1) if quick else (3.0, 3)
    base = Path(tempfile.mkdtemp(prefix="aimass-bench-predlog-"))
    nats = NatsServer(base / "nats")
    nats.start()
    triton = TritonProcess(base / "models", base / "triton.log")
    triton.start()
    db_url = f"sqlite:///{base / 'aimass.db'}"
    upgrade(db_url)
    ports = {"registry": free_port(), "routing": free_port()}
    env = dict(os.environ)
    env.update({
        "AIMASS_HOME": str(base / "home"), "AIMASS_DATABASE_URL": db_url,
        "AIMASS_ARTIFACT_ROOT": (base / "artifacts").as_uri(), "AIMASS_NATS_URL": nats.url,
        "AIMASS_PORTS__REGISTRY": str(ports["registry"]),
        "AIMASS_PORTS__ROUTING": str(ports["routing"]), "AIMASS_LOG_LEVEL": "WARNING",
        "AIMASS_ROUTING_TRITON_GRPC": triton.grpc_address,
        "AIMASS_ROUTING_TRITON_REPOSITORY": str(triton.repository),
        "AIMASS_ROUTING_METRICS_PORT": str(free_port()),
    })  # fmt: skip
    processes = [
        start_service("registry", env, base / "registry.log"),
        start_service("routing", env, base / "routing.log"),
    ]
    try:
        await wait_serving(f"127.0.0.1:{ports['registry']}")
        await wait_serving(f"127.0.0.1:{ports['routing']}")
        lines = await measure(ports, seconds, rounds)
        await asyncio.sleep(2.5)  # the last files flush (1 s) and commit
        return lines + written(db_url)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        triton.stop()
        nats.stop()


def written(db_url: str) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "select deployment, count(*), sum(rows), sum(dropped) from prediction_logs"
                " group by deployment order by deployment"
            )
        ).all()
    engine.dispose()
    out = [
        "",
        "| deployment | Parquet files | rows captured | samples dropped |",
        "|---|---|---|---|",
    ]
    out += [f"| {d} | {n} | {r:,} | {x:,} |" for d, n, r, x in rows]
    return out


async def measure(ports: dict[str, int], seconds: float, rounds: int) -> list[str]:
    registry_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['registry']}")
    routing_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['routing']}")
    stack = RoutingStack(
        settings=None, config=None,  # type: ignore[arg-type]
        registry=registry_pb2_grpc.RegistryServiceStub(registry_channel),
        routing=routing_pb2_grpc.RoutingServiceStub(routing_channel),
        prediction=routing_pb2_grpc.PredictionServiceStub(routing_channel),
        routing_address="", channels=[],
    )  # fmt: skip
    version = await stack.register("mlp", mlp_onnx())
    backends = {
        "in-process": "inferenceServers/in-process",
        "Triton": "inferenceServers/local-triton",
    }
    for backend, server in backends.items():
        for rate in (0.0, 1.0):
            config = pb.ServingConfig(
                max_batch_size=64,
                dynamic_batching=pb.DynamicBatching(max_queue_delay_microseconds=200),
                prediction_logging=pb.PredictionLogging(
                    sample_rate=rate, flush_interval=duration_pb2.Duration(seconds=1)
                ),
            )
            await stack.deploy(
                deployment_id(backend, rate), [(version, 100)], servers=[server],
                serving_config=config,
            )  # fmt: skip
    predict = routing_channel.unary_unary(PREDICT)
    rng = np.random.default_rng(0)

    def call(name: str, batch: int) -> Callable[[], Awaitable[object]]:
        request = encode_request({"input": rng.random((batch, 64), dtype=np.float32)})
        request.deployment = f"deployments/{name}"
        raw = request.SerializeToString()

        async def one() -> object:
            return await predict(raw)

        return one

    targets = [
        (backend, rate, batch, concurrency)
        for batch in (1, 32)
        for concurrency in (1, 8)
        for backend in backends
        for rate in (0.0, 1.0)
    ]
    results: dict[tuple[str, float, int, int], list[tuple[float, list[float]]]] = {}
    for _ in range(rounds):
        for target in targets:
            backend, rate, batch, concurrency = target
            outcome = await closed_loop(
                call(deployment_id(backend, rate), batch), concurrency, seconds
            )
            results.setdefault(target, []).append(outcome)
    for channel in (registry_channel, routing_channel):
        await channel.close()
    return table(results, backends)


def deployment_id(backend: str, rate: float) -> str:
    return f"{'inproc' if backend == 'in-process' else 'triton'}-{'on' if rate else 'off'}"


def table(results: dict, backends: dict[str, str]) -> list[str]:
    def median(target: tuple, what: Callable[[tuple[float, list[float]]], float]) -> float:
        return statistics.median(what(r) for r in results[target])

    lines = [
        "| backend, batch | sequential p50 off -> on (ratio) | sequential p99 off -> on (ratio)"
        " | concurrency 8 req/s off -> on (ratio) | concurrency 8 p99 off -> on |",
        "|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        for backend in backends:
            off1, on1 = (backend, 0.0, batch, 1), (backend, 1.0, batch, 1)
            off8, on8 = (backend, 0.0, batch, 8), (backend, 1.0, batch, 8)
            p50 = [median(t, lambda r: pct(r[1], 50)) for t in (off1, on1)]
            p99 = [median(t, lambda r: pct(r[1], 99)) for t in (off1, on1)]
            rate = [median(t, lambda r: r[0]) for t in (off8, on8)]
            p99c = [median(t, lambda r: pct(r[1], 99)) for t in (off8, on8)]
            lines.append(
                f"| {backend}, batch {batch} | {p50[0]:.3f} -> {p50[1]:.3f} ms"
                f" ({p50[1] / p50[0]:.2f}x) | {p99[0]:.3f} -> {p99[1]:.3f} ms"
                f" ({p99[1] / p99[0]:.2f}x) | {rate[0]:,.0f} -> {rate[1]:,.0f}"
                f" ({rate[1] / rate[0]:.2f}x) | {p99c[0]:.2f} -> {p99c[1]:.2f} ms |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    lines = asyncio.run(run(args.quick))
    text = "\n".join(
        [
            "# Prediction logging: Predict with sampling 0 against 1.0",
            "",
            "Router path (`PredictionService.Predict`), one closed-loop grpc.aio client process,"
            " digits-sized MLP (64-512-256-10), files flushed every second during the run;"
            f" {'quick run' if args.quick else 'median of 3 interleaved rounds'}."
            " Ratios: sampling 1.0 over sampling 0, same backend, same run.",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
