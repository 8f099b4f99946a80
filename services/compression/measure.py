"""Measuring ONNX models the same way, in one run: size, parameters, memory, speed, outputs.

    figures = measure_all({"baseline": parent, "int8": quantized}, sample_feeds, batch_feeds)

Latency (batch 1) and throughput (batch 64) are measured in interleaved
rounds over all models, so a burst of load from other processes on this
noisy machine hits every model alike; each figure is the median over rounds.
Every session runs on one intra-op thread, as a serving instance would.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

Feeds = dict[str, np.ndarray]


def session(path: Path, threads: int = 1) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parameter_count(path: Path) -> int:
    """Values stored in the graph's initializers (weights, biases), whatever their type."""
    model = onnx.load(str(path))
    return int(sum(int(np.prod(init.dims)) for init in model.graph.initializer))


def stored_parameters(path: Path) -> int:
    """Parameters of the network the file computes: quantized weights count once.

    Quantization adds scale and zero-point initializers, and FP16 keeps the same
    weights: counting every initializer would say INT8 has more parameters. So
    integer and float16 weights count, scalars and 1-element scales do not.
    """
    model = onnx.load(str(path))
    total = 0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if size > 1:
            total += size
    return total


def run(sess: object, feeds: Feeds) -> np.ndarray:
    outputs = sess.run(None, feeds)  # type: ignore[attr-defined]
    return np.asarray(outputs[0])


_PEAK_CHILD = """
import sys, numpy as np, onnxruntime as ort
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0
data = np.load(sys.argv[2])
before = status('VmRSS:')
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])
session.run(None, {k: data[k] for k in data.files})
print(max(status('VmHWM:') - before, 0))
"""


def peak_memory_at_load(path: Path, feeds: Feeds) -> int:
    """Peak resident memory that loading the model and running one batch added, in bytes.

    Measured in a fresh child process (after onnxruntime is imported), so memory
    this process already holds or freed cannot hide the model's. 0 where the
    platform has no /proc.
    """
    if not Path("/proc/self/status").exists():
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        arrays = Path(scratch) / "feeds.npz"
        np.savez(arrays, **feeds)
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_CHILD, str(path), str(arrays)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    try:
        return int(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def load_problem(path: Path) -> str | None:
    """None when a fresh process can create an onnxruntime session for the file, else why.

    Run in a child because some malformed or unusual graphs crash onnxruntime
    natively (a segmentation fault), which must not take the service down.
    """
    code = (
        "import sys, onnxruntime as ort; o = ort.SessionOptions(); o.intra_op_num_threads = 1; "
        "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f"onnxruntime crashed loading the model (signal {-result.returncode})"
    return f"onnxruntime cannot load the model: {result.stderr.strip().splitlines()[-1:]}"


@dataclass
class Figures:
    """What the report says about one model file."""

    file_size_bytes: int = 0
    parameter_count: int = 0
    peak_memory_bytes: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    throughput_rows_per_second: float = 0.0


def _latencies(sess: object, feeds: Feeds, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        sess.run(None, feeds)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return times


def _throughput(sess: object, feeds: Feeds, rows: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while True:
        sess.run(None, feeds)  # type: ignore[attr-defined]
        done += rows
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def measure_all(
    paths: Mapping[str, Path],
    one_row: Feeds,
    batch: Feeds,
    *,
    rounds: int = 3,
    latency_calls: int = 100,
    throughput_seconds: float = 0.2,
) -> dict[str, Figures]:
    """Figures of every model, speed measured in interleaved rounds (medians)."""
    figures = {
        name: Figures(
            file_size_bytes=path.stat().st_size,
            parameter_count=stored_parameters(path),
            peak_memory_bytes=peak_memory_at_load(path, batch),
        )
        for name, path in paths.items()
    }
    sessions = {name: session(path) for name, path in paths.items()}
    rows = next(iter(batch.values())).shape[0]
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for sess in sessions.values():  # warm up: first runs allocate
        for _ in range(3):
            sess.run(None, batch)  # type: ignore[attr-defined]
            sess.run(None, one_row)  # type: ignore[attr-defined]
    for _ in range(rounds):
        for name, sess in sessions.items():
            latencies[name] += _latencies(sess, one_row, latency_calls)
            rates[name].append(_throughput(sess, batch, rows, throughput_seconds))
    for name, figure in figures.items():
        times = np.array(latencies[name]) * 1000.0
        figure.latency_p50_ms = float(np.percentile(times, 50))
        figure.latency_p99_ms = float(np.percentile(times, 99))
        figure.throughput_rows_per_second = float(np.median(rates[name]))
    return figures


def outputs_of(path: Path, batches: Sequence[Feeds]) -> np.ndarray:
    """The model's first output over all batches, concatenated (float64)."""
    sess = session(path)
    return np.concatenate([run(sess, feeds).astype(np.float64) for feeds in batches], axis=0)


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def weight_arrays(path: Path) -> list[np.ndarray]:
    """Float weight tensors of the graph (for sparsity reporting)."""
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(init) for init in model.graph.initializer]
    return [a for a in arrays if a.dtype.kind == "f" and a.ndim >= 2]
