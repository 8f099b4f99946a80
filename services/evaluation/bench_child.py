"""The benchmark process: ``python -m aimass.evaluation.bench_child CONFIG_JSON``.

Runs in its own process so its peak resident memory (``ru_maxrss``) is the
model's, not the service's, and its timings are not disturbed by the
service's event loop. Prints one JSON line per batch size as it goes, then a
last line with ``peak_memory_bytes`` and ``device``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from aimass.evaluation.inference import ONNX_TYPES, open_session


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPU"
    except OSError:
        pass
    return f"{os.cpu_count()} CPU"


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "CUDA device"


def measure(session: Any, batch: int, warmup: int, iterations: int) -> dict[str, float]:
    spec = session.get_inputs()[0]
    dims = [d if isinstance(d, int) and d > 0 else None for d in spec.shape[1:]]
    if any(d is None for d in dims):
        raise SystemExit(f"model input {spec.name!r} has a variable dimension {spec.shape}")
    rng = np.random.default_rng(0)
    array = rng.standard_normal((batch, *dims)).astype(ONNX_TYPES.get(spec.type, np.float32))
    feed = {spec.name: array}
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = time.perf_counter() - start
    p50, p90, p99 = np.percentile(times * 1e3, [50, 90, 99])
    return {
        "batch_size": batch,
        "latency_p50_ms": float(p50),
        "latency_p90_ms": float(p90),
        "latency_p99_ms": float(p99),
        "latency_mean_ms": float(times.mean() * 1e3),
        "throughput_rows_per_second": float(batch * iterations / times.sum()),
    }


def main() -> None:
    config = json.loads(sys.argv[1])
    session = open_session(Path(config["model"]), config["provider"], config["threads"])
    for batch in config["batch_sizes"]:
        result = measure(session, batch, config["warmup_iterations"], config["iterations"])
        print(json.dumps(result), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    device = gpu_name() if config["provider"] == "cuda" else cpu_name()
    print(json.dumps({"peak_memory_bytes": peak, "device": device}), flush=True)


if __name__ == "__main__":
    main()
