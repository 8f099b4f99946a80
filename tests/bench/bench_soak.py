"""Bounded soak: mixed traffic on the embedded stack for a fixed time, on loopback.

    .venv/bin/python tests/bench/bench_soak.py [--quick] [--duration-s 300] [--out FILE]

Starts the embedded stack as users do (``aimass up --detach --home TMP --port-offset N``:
NATS, every service, Triton, a training worker, the gateway, each its own process), runs
the digits pipeline (examples/pipelines/digits.yaml, fewer epochs) to get a dataset, a
model and the deployment ``digits``, then for ``--duration-s`` seconds:

- Predict through the router (``PredictionService.Predict``) at a fixed rate, open loop
  (a call starts every 1/rate s whether or not earlier ones finished);
- registry reads (ListRegisteredModels, GetModelVersion, ListModelVersions, GetAlias)
  at a fixed rate;
- a training job (2 epochs on the digits version) and a compression job (the pipeline's
  INT8 recipe on the trained version) submitted periodically, each followed to its end.

It reports p50/p99 latency per kind (a job's latency is submission to its end), errors
by gRPC code (goal: none but deliberate RESOURCE_EXHAUSTED), and each process's RSS (the
process and its children: Triton's python backend stubs count for Triton) after a warm-up
and at the end (goal: growth at most 10%). Growth is a ratio against the same process at
the start of the same run; latencies are absolute, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aimass.cli.pipeline import write_demo_data
from aimass.common.v1 import common_pb2
from aimass.compression.v1 import compression_pb2, compression_pb2_grpc
from aimass.embedded.components import stack_settings
from aimass.embedded.layout import StackLayout
from aimass.embedded.state import read_state
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2, routing_pb2_grpc
from aimass.serving.endpoint import encode_request
from aimass.training.v1 import training_pb2, training_pb2_grpc
from tests.fixtures.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_FILE = ROOT / "examples" / "pipelines" / "digits.yaml"
AIMASS = Path(sys.executable).with_name("aimass")
CALL_TIMEOUT_S = 10.0
DONE = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
RUN_DONE = {
    pipeline_pb2.RUN_STATE_SUCCEEDED,
    pipeline_pb2.RUN_STATE_FAILED,
    pipeline_pb2.RUN_STATE_CANCELLED,
}
RSS_GOAL = 0.10


@dataclass
class Tally:
    """Latencies (s) and outcomes per kind of traffic."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: list[str] = field(default_factory=list)

    async def timed(self, kind: str, call: Callable[[], Awaitable[object]]) -> object | None:
        start = time.perf_counter()
        try:
            result = await call()
        except grpc.aio.AioRpcError as err:
            self.codes[kind][err.code().name] += 1
            if len(self.failures) < 20:
                self.failures.append(f"{kind}: {err.code().name}: {err.details()}")
            return None
        self.latencies[kind].append(time.perf_counter() - start)
        self.codes[kind]["OK"] += 1
        return result


def process_rss(home: Path) -> dict[str, int]:
    """RSS in bytes of every recorded process of the stack, with its children."""
    state = read_state(StackLayout(home))
    assert state is not None, f"no stack state under {home}"
    sizes = {}
    for record in state.all_processes():
        try:
            proc = psutil.Process(record.pid)
            # The supervisor is every component's parent: only its own memory is its own.
            children = [] if record.kind == "supervisor" else proc.children(recursive=True)
            family = [proc, *children]
            sizes[record.name] = sum(_rss(p) for p in family)
        except psutil.NoSuchProcess:
            sizes[record.name] = 0
    return sizes


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


def start_stack(home: Path, port_offset: int) -> None:
    # Every service process tries ports.metrics and the first one keeps it; the routing
    # service insists on its own metrics port (AIMASS_ROUTING_METRICS_PORT, default the
    # same port) and exits when it is taken, so it gets a port of its own here.
    env = {**os.environ, "AIMASS_ROUTING_METRICS_PORT": str(free_port())}
    subprocess.run(
        [str(AIMASS), "up", "--detach", "--home", str(home), "--port-offset", str(port_offset),
         "--timeout", "180"],
        check=True, cwd=ROOT, env=env,
    )  # fmt: skip


def stop_stack(home: Path) -> None:
    subprocess.run([str(AIMASS), "down", "--home", str(home)], check=False, cwd=ROOT)


async def deploy_digits(channel: grpc.aio.Channel, epochs: int) -> pipeline_pb2.PipelineRun:
    """Runs the digits pipeline (training shortened) to its end; the finished run."""
    spec = specs.load_yaml(PIPELINE_FILE)
    spec.model.training.epochs = epochs
    stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
    run = await stub.CreatePipelineRun(
        pipeline_pb2.CreatePipelineRunRequest(pipeline_run=pipeline_pb2.PipelineRun(spec=spec))
    )
    deadline = time.monotonic() + 600
    while run.state not in RUN_DONE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run.name} did not finish in 600 s")
        await asyncio.sleep(1.0)
        run = await stub.GetPipelineRun(pipeline_pb2.GetPipelineRunRequest(name=run.name))
    if run.state != pipeline_pb2.RUN_STATE_SUCCEEDED:
        raise RuntimeError(f"the digits pipeline failed: {run.reason}")
    return run


@dataclass
class Soak:
    channels: dict[str, grpc.aio.Channel]
    run: pipeline_pb2.PipelineRun
    tally: Tally
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def spawn(self, coroutine: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def predict_caller(self) -> Callable[[], Awaitable[object]]:
        deployment = self.run.summary.deployment
        prediction = routing_pb2_grpc.PredictionServiceStub(self.channels["routing"])
        metadata = await prediction.GetDeploymentMetadata(
            routing_pb2.GetDeploymentMetadataRequest(name=deployment)
        )
        tensor = metadata.inputs[0]
        width = int(tensor.shape[-1])
        rows = np.random.default_rng(0).uniform(0, 16, size=(256, width)).astype(np.float32)
        requests = []
        for row in rows:
            request = encode_request({tensor.name: row.reshape(1, -1)})
            request.deployment = deployment
            requests.append(request)
        counter = iter(range(10**12))

        async def call() -> object:
            request = requests[next(counter) % len(requests)]
            return await prediction.Predict(request, timeout=CALL_TIMEOUT_S)

        return call

    def registry_calls(self) -> list[Callable[[], Awaitable[object]]]:
        registry = registry_pb2_grpc.RegistryServiceStub(self.channels["registry"])
        version = self.run.summary.model_version
        model = version.split("/versions/")[0]
        alias = self.run.spec.release.alias
        return [
            lambda: registry.ListRegisteredModels(
                registry_pb2.ListRegisteredModelsRequest(), timeout=CALL_TIMEOUT_S
            ),
            lambda: registry.GetModelVersion(
                registry_pb2.GetModelVersionRequest(name=version), timeout=CALL_TIMEOUT_S
            ),
            lambda: registry.ListModelVersions(
                registry_pb2.ListModelVersionsRequest(parent=model), timeout=CALL_TIMEOUT_S
            ),
            lambda: registry.GetAlias(
                registry_pb2.GetAliasRequest(name=f"{model}/aliases/{alias}"),
                timeout=CALL_TIMEOUT_S,
            ),
        ]

    async def at_rate(
        self, kind: str, calls: list[Callable[[], Awaitable[object]]], rate: float, until: float
    ) -> None:
        """Open loop: one call every 1/rate s, started on schedule, until ``until``."""
        period, next_at, index = 1.0 / rate, time.monotonic(), 0
        while next_at < until:
            self.spawn(self.tally.timed(kind, calls[index % len(calls)]))
            index += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def training_job(self) -> None:
        stub = training_pb2_grpc.TrainingServiceStub(self.channels["training"])
        section = self.run.spec.model
        training = training_pb2.TrainingConfig()
        training.CopyFrom(section.training)
        training.epochs = 2
        job = training_pb2.TrainingJob(
            description="soak", model=section.spec, training=training,
            dataset_version=self.run.summary.dataset_version,
            target_model=f"models/{section.model}", resources=section.resources,
        )  # fmt: skip

        async def submit_and_wait() -> object:
            created = await stub.CreateTrainingJob(
                training_pb2.CreateTrainingJobRequest(training_job=job), timeout=CALL_TIMEOUT_S
            )
            return await self._wait_job(
                lambda: stub.GetTrainingJob(
                    training_pb2.GetTrainingJobRequest(name=created.name), timeout=CALL_TIMEOUT_S
                )
            )

        await self.tally.timed("training job (submit to end)", submit_and_wait)

    async def compression_job(self) -> None:
        stub = compression_pb2_grpc.CompressionServiceStub(self.channels["compression"])
        job = compression_pb2.CompressionJob(
            parent_version=self.run.summary.model_version,
            recipe=self.run.spec.compression.recipe,
            labels={"soak": "true"},
        )

        async def submit_and_wait() -> object:
            created = await stub.CreateCompressionJob(
                compression_pb2.CreateCompressionJobRequest(compression_job=job),
                timeout=CALL_TIMEOUT_S,
            )
            return await self._wait_job(
                lambda: stub.GetCompressionJob(
                    compression_pb2.GetCompressionJobRequest(name=created.name),
                    timeout=CALL_TIMEOUT_S,
                )
            )

        await self.tally.timed("compression job (submit to end)", submit_and_wait)

    async def _wait_job(self, get: Callable[[], Awaitable[object]]) -> object:
        while True:
            job = await get()
            state = job.status.state  # type: ignore[attr-defined]
            if state in DONE:
                if state != common_pb2.JOB_STATE_SUCCEEDED:
                    reason = job.status.reason  # type: ignore[attr-defined]
                    self.tally.failures.append(f"job ended {state}: {reason}")
                    raise JobFailed(reason)
                return job
            await asyncio.sleep(1.0)

    async def every(self, period_s: float, first_s: float, until: float, job: Callable) -> None:
        await asyncio.sleep(first_s)
        while time.monotonic() < until:
            self.spawn(job())
            await asyncio.sleep(min(period_s, max(0.0, until - time.monotonic())))


class JobFailed(Exception):
    pass


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def soak(args: argparse.Namespace, home: Path) -> list[str]:
    settings = stack_settings(home, args.port_offset)
    write_demo_data(settings.data_roots[0])
    start_stack(home, args.port_offset)
    names = ("pipeline", "routing", "registry", "training", "compression")
    channels = {n: grpc.aio.insecure_channel(settings.service_address(n)) for n in names}
    try:
        print("deploying digits through the pipeline ...", flush=True)
        run = await deploy_digits(channels["pipeline"], epochs=3 if args.quick else 5)
        tally = Tally()
        state = Soak(channels, run, tally)
        predict = await state.predict_caller()
        reads = state.registry_calls()
        # Warm-up: lazy imports, caches and pools fill before the "start" RSS is taken.
        warm_until = time.monotonic() + args.warmup_s
        await asyncio.gather(
            state.at_rate("warm-up", [predict], args.rate, warm_until),
            state.at_rate("warm-up", reads, args.read_rate, warm_until),
        )
        await asyncio.sleep(1.0)
        tally.latencies.pop("warm-up", None)
        tally.codes.pop("warm-up", None)
        rss_start = process_rss(home)
        started = time.monotonic()
        until = started + args.duration_s
        print(f"soak: {args.duration_s:.0f} s of mixed traffic ...", flush=True)
        await asyncio.gather(
            state.at_rate("Predict (router)", [predict], args.rate, until),
            state.at_rate("registry reads", reads, args.read_rate, until),
            state.every(args.job_every_s, 1.0, until, state.training_job),
            state.every(args.job_every_s, args.job_every_s / 2, until, state.compression_job),
        )
        elapsed = time.monotonic() - started
        # Jobs still running get a bounded grace to finish; those that do not are errors.
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=args.grace_s)
        unfinished = len(state.tasks)
        for task in list(state.tasks):
            task.cancel()
        rss_end = process_rss(home)
        return report(args, tally, rss_start, rss_end, elapsed, unfinished)
    finally:
        for channel in channels.values():
            await channel.close()
        stop_stack(home)


def report(
    args: argparse.Namespace,
    tally: Tally,
    rss_start: dict[str, int],
    rss_end: dict[str, int],
    elapsed: float,
    unfinished: int,
) -> list[str]:
    lines = [
        f"# Soak: {args.duration_s:.0f} s of mixed traffic on the embedded stack"
        f"{' (--quick)' if args.quick else ''}",
        "",
        f"Predict {args.rate:g}/s through the router (open loop), registry reads "
        f"{args.read_rate:g}/s, a training and a compression job every {args.job_every_s:g} s; "
        f"{elapsed:.0f} s of traffic after a {args.warmup_s:g} s warm-up (jobs then finish). "
        "Goal: no error but deliberate RESOURCE_EXHAUSTED; RSS growth at most 10%.",
        "",
        "| traffic | calls | p50 ms | p99 ms | errors by code |",
        "|---|---:|---:|---:|---|",
    ]
    errors_total = 0
    for kind in sorted(set(tally.codes) | set(tally.latencies)):
        codes = tally.codes[kind]
        errors = {code: n for code, n in codes.items() if code != "OK"}
        errors_total += sum(n for c, n in errors.items() if c != "RESOURCE_EXHAUSTED")
        values = tally.latencies[kind]
        shown = ", ".join(f"{c} {n}" for c, n in sorted(errors.items())) or "none"
        lines.append(
            f"| {kind} | {sum(codes.values())} | {pct(values, 0.5) * 1e3:.1f} | "
            f"{pct(values, 0.99) * 1e3:.1f} | {shown} |"
        )
    errors_total += unfinished
    lines += [
        "",
        f"Jobs still running after the {args.grace_s:g} s grace: {unfinished}. "
        f"Errors other than RESOURCE_EXHAUSTED: **{errors_total}**.",
        "",
        "| process | RSS start MiB | RSS end MiB | growth (end / start) |",
        "|---|---:|---:|---:|",
    ]
    worst = 0.0
    for name in sorted(rss_start):
        start, end = rss_start[name], rss_end.get(name, 0)
        growth = end / start - 1 if start else float("nan")
        worst = max(worst, growth)
        lines.append(f"| {name} | {start / 2**20:.0f} | {end / 2**20:.0f} | {growth * 100:+.1f}% |")
    verdict = "met" if worst <= RSS_GOAL else "NOT met"
    lines += ["", f"Largest RSS growth {worst * 100:+.1f}% (goal <= 10%: {verdict})."]
    if tally.failures:
        lines += ["", "First errors:", "", *[f"- {f}" for f in tally.failures[:10]]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--quick", action="store_true", help="20 s soak, small rates")
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--rate", type=float, help="Predict calls per second (default 50)")
    parser.add_argument("--read-rate", type=float, help="registry reads per second (default 10)")
    parser.add_argument("--job-every-s", type=float, help="seconds between training jobs")
    parser.add_argument("--port-offset", type=int, default=410)
    args = parser.parse_args()
    if args.quick:
        args.duration_s = min(args.duration_s, 20.0)
    args.rate = args.rate or (20.0 if args.quick else 50.0)
    args.read_rate = args.read_rate or (5.0 if args.quick else 10.0)
    args.job_every_s = args.job_every_s or (30.0 if args.quick else 60.0)
    args.warmup_s = 3.0 if args.quick else 15.0
    args.grace_s = 60.0 if args.quick else 120.0
    home = Path(tempfile.mkdtemp(prefix="aimass-soak-"))
    try:
        lines = asyncio.run(soak(args, home))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
