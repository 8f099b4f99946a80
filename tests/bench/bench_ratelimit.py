"""Benchmark of cluster-wide access control: the shared rate limit and revocation events.

    .venv/bin/python tests/bench/bench_ratelimit.py [--quick] [--out FILE]

1. Auth hook cost per call (an HS256 JWT principal, cached, so no database) with the
   per-process bucket (the baseline: no NATS) against the bucket shared through NATS
   JetStream KV: leases of 50 and 10 tokens (the default lease is a quarter second of the
   rate: 50 tokens at the default 200/s), and a lease of 1 token (a KV round trip every
   call, the worst case). Interleaved rounds, medians, ratio against the baseline.
2. Revocation propagation: a key revoked in one process (its ``aimass.access.key.revoked``
   event published) until another process's link has dropped it from its cache.
A nats-server of its own runs for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import OctKey

from aimass.access.v1 import access_pb2
from aimass.core.auth.cluster import KEY_REVOKED_TOPIC, ClusterLink
from aimass.core.auth.hook import AccessControl
from aimass.core.events.bus import EventBus
from aimass.core.settings import load_settings
from aimass.embedded.components import nats_server_binary

SECRET = "bench-hs256-secret-bench-hs256-secret-0123"
METHOD = "/aimass.registry.v1.RegistryService/GetRegisteredModel"
# A rate no loop reaches: what is measured is the bucket's cost, never a refusal.
RATE = 1e9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def hook(nats_url: str, lease_tokens: int) -> AccessControl:
    settings = load_settings(auth={"enabled": True, "hs256_secret": SECRET})
    control = AccessControl(settings.auth, None, nats_url=nats_url)
    control.limiter.default_rate = RATE
    control.limiter.lease_s = lease_tokens / RATE
    await control.start()
    if nats_url and not control.cluster.connected:
        raise RuntimeError(f"could not reach NATS at {nats_url}")
    return control


async def per_call_us(control: AccessControl, metadata: dict[str, str], calls: int) -> float:
    await control.authenticate(METHOD, metadata)  # warm the caches
    start = time.perf_counter()
    for _ in range(calls):
        await control.authenticate(METHOD, metadata)
    return (time.perf_counter() - start) / calls * 1e6


async def hook_costs(nats_url: str, calls: int, rounds: int) -> dict[str, float]:
    token = jwt.encode(
        {"alg": "HS256"},
        {"sub": "bench", "role": "viewer", "exp": int(time.time()) + 3600},
        OctKey.import_key(SECRET),
    )
    metadata = {"authorization": f"Bearer {token}"}
    cases = {
        "per-process bucket (baseline)": await hook("", 1),
        "shared bucket, lease of 50": await hook(nats_url, 50),
        "shared bucket, lease of 10": await hook(nats_url, 10),
        "shared bucket, lease of 1": await hook(nats_url, 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(rounds):
            for name, control in cases.items():
                samples[name].append(await per_call_us(control, metadata, calls))
    finally:
        for control in cases.values():
            await control.close()
    return {name: statistics.median(values) for name, values in samples.items()}


async def revocation_ms(nats_url: str, rounds: int) -> list[float]:
    arrived: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
    link = ClusterLink(
        nats_url, lambda key_id: arrived.put_nowait((key_id, time.perf_counter())), lambda: None
    )
    await link.start()
    bus = await EventBus.connect(nats_url, "bench-revoker")
    await bus.ensure_streams()
    latencies = []
    try:
        for i in range(rounds):
            key = access_pb2.ApiKey(name=f"apiKeys/bench-{i}")
            start = time.perf_counter()
            await bus.publish(KEY_REVOKED_TOPIC, key, subject=key.name, source="access")
            key_id, when = await asyncio.wait_for(arrived.get(), 10)
            assert key_id == f"bench-{i}"
            latencies.append((when - start) * 1e3)
    finally:
        await bus.close()
        await link.close()
    return latencies


async def main_async(args: argparse.Namespace, url: str) -> str:
    calls, rounds = (2_000, 3) if args.quick else (10_000, 5)
    costs = await hook_costs(url, calls, rounds)
    revocations = await revocation_ms(url, 20 if args.quick else 200)
    baseline = costs["per-process bucket (baseline)"]
    lines = [
        "## Cluster-wide access control",
        "",
        f"Auth hook per call, HS256 JWT cached, {calls} calls x {rounds} interleaved rounds"
        " (median); goal < 50 us.",
        "",
        "| rate limit | us per call | x baseline |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {us:.1f} | {us / baseline:.2f} |" for name, us in costs.items()]
    revocations.sort()
    lines += [
        "",
        f"Revocation event to another process's cache, {len(revocations)} revocations:"
        f" median {statistics.median(revocations):.2f} ms,"
        f" p99 {revocations[int(len(revocations) * 0.99) - 1]:.2f} ms,"
        f" max {revocations[-1]:.2f} ms (the key cache alone: up to auth.key_cache_s = 5 s).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        nats = subprocess.Popen(
            [str(nats_server_binary()), "-js", "-sd", str(Path(tmp) / "nats"), "-a",
             "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_port(port)
            table = asyncio.run(main_async(args, f"nats://127.0.0.1:{port}"))
        finally:
            nats.terminate()
            nats.wait(10)
    print(table)
    if args.out:
        args.out.write_text(table)


def wait_for_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port}")


if __name__ == "__main__":
    sys.exit(main())
