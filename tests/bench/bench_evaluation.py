"""Evaluation throughput against a plain ONNX Runtime loop, measured in the same run.

Rows/s of: (1) a bare ``session.run`` loop over batches (the baseline), (2) the evaluation's
scoring path (feature cast and reshape, batched run, output to probabilities), (3) scoring
plus the default classification metrics, (4) plus 200 bootstrap resamples. Model: an MLP
64-512-256-10 (the digits reference size) as ONNX, random inputs; one ORT thread.

    python tests/bench/bench_evaluation.py [--quick] [--out docs/benchmarks/evaluation.md]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from aimass.evaluation import inference, stats
from aimass.evaluation import metrics as mt
from aimass.evaluation.runner import default_names


def mlp_onnx(sizes: list[int]) -> bytes:
    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        weights += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}"]))
        current = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["output"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def best_of(rounds: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    rows = 5_000 if args.quick else 50_000
    rounds = 3 if args.quick else 5
    batch = 256
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(mlp_onnx([64, 512, 256, 10]), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    rng = np.random.default_rng(1)
    features = rng.random((rows, 64))
    labels = rng.integers(0, 10, rows)
    as_float = features.astype(np.float32)

    def plain() -> None:
        for start in range(0, rows, batch):
            session.run(None, {"input": as_float[start : start + batch]})

    def scoring() -> mt.Predictions:
        output = inference.run_batched(session, features, batch)
        return inference.predictions(mt.CLASSIFICATION, output, labels, None, 5)

    def with_metrics() -> None:
        p = scoring()
        mt.compute(p, default_names(p))

    p = scoring()
    names = default_names(p)
    cases = [
        ("plain onnxruntime loop (baseline)", plain, rows),
        ("evaluation scoring", scoring, rows),
        ("scoring + default metrics", with_metrics, rows),
    ]
    samples = 20 if args.quick else 200
    results = [(name, best_of(rounds, work), n) for name, work, n in cases]
    bootstrap_s = best_of(1, lambda: stats.bootstrap_intervals(p, names, samples, 0.95, 0))
    base = results[0][1]
    lines = [
        f"Evaluation throughput, MLP 64-512-256-10, {rows} rows, batch {batch}, 1 ORT thread "
        f"(median of {rounds} rounds)",
        "",
        "| path | seconds | rows/s | throughput vs baseline |",
        "|---|---|---|---|",
    ]
    for name, seconds, n in results:
        lines.append(f"| {name} | {seconds:.3f} | {n / seconds:,.0f} | {base / seconds:.2f}x |")
    lines += ["", f"Bootstrap of {len(names)} metrics: {samples} resamples in {bootstrap_s:.2f} s "
              f"({bootstrap_s / samples * 1e3:.1f} ms per resample, "
              f"{bootstrap_s / samples / base:.2f}x the baseline's whole pass)."]  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
