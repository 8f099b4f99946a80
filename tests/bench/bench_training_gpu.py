"""Training on a GPU: samples/s of the aimass loop on CUDA against a plain PyTorch loop on
CUDA (same model, data, batch size and seed) and against the aimass loop on the CPU of the
same machine, measured in one run, interleaved, medians of rounds.

Needs a CUDA device; on a machine without one it prints why and writes nothing (CI and the
2-core development machines have none: the figures come from the lent GPU machine).

    python tests/bench/bench_training_gpu.py --out docs/benchmarks/training_gpu.md [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from aimass.core import nn as ann
from aimass.core.protodict import message_from_dict
from aimass.training.sources import TableSource
from aimass.training.trainer import Trainer, TrainPlan
from aimass.training.v1 import training_pb2 as tpb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import Hooks, token_tables  # the CPU bench's helpers


def feature_tables(rows: int, features: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    labels = (x[:, :10].sum(axis=1) > 0).astype(np.int64) + 2 * (x[:, 10] > 0)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(features)}, "label": labels})
    cut = int(rows * 0.9)
    return table.slice(0, cut), table.slice(cut)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(case: dict, data: ann.DataSignature, device: str) -> float:
    """The loop a user writes by hand on the device, timed from the table like ours."""
    train, epochs, batch = case["tables"][0], case["epochs"], case["batch"]
    synchronize(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    built = ann.build_model(ann.spec_from_dict(case["spec"]), data)
    inputs, y = ann.table_to_tensors(train, built.signature)
    inputs, y = tuple(t.to(device) for t in inputs), y.to(device)
    model = built.module.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = len(y)
    for _ in range(epochs):
        order = torch.randperm(rows, device=device)
        for i in range(0, rows, batch):
            picked = order[i : i + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(*(t[picked] for t in inputs)), y[picked])
            loss.backward()
            optimizer.step()
            loss.item()
    synchronize(device)
    return epochs * rows / (time.perf_counter() - start)


def aimass_loop(case: dict, data: ann.DataSignature, device: str) -> float:
    config = message_from_dict(
        {"epochs": case["epochs"], "batch_size": case["batch"], "seed": 0},
        tpb.TrainingConfig(),
    )
    plan = TrainPlan(
        job="trainingJobs/bench",
        spec=ann.spec_from_dict(case["spec"]).SerializeToString(),
        config=config.SerializeToString(),
        data_signature=data.to_dict(),
        work_dir=tempfile.mkdtemp(),
        threads=torch.get_num_threads(),
        export=False,
        device=device,
    )
    train, valid = case["tables"]
    synchronize(device)
    start = time.perf_counter()
    Trainer(plan, TableSource({"train": train, "valid": valid}), Hooks()).run()
    synchronize(device)
    return case["epochs"] * train.num_rows / (time.perf_counter() - start)


def measure(case: dict, rounds: int) -> dict[str, float]:
    data = ann.data_signature_from_table(pa.concat_tables(case["tables"]), "label")
    runs: dict[str, list[float]] = {"plain_cuda": [], "aimass_cuda": [], "aimass_cpu": []}
    aimass_loop(case, data, "cuda")  # warm-up: CUDA context, kernels, allocator
    for _ in range(rounds):
        runs["plain_cuda"].append(plain_loop(case, data, "cuda"))
        runs["aimass_cuda"].append(aimass_loop(case, data, "cuda"))
        runs["aimass_cpu"].append(aimass_loop({**case, "epochs": case["cpu_epochs"]}, data, "cpu"))
    return {name: statistics.median(values) for name, values in runs.items()}


def cases(quick: bool) -> list[dict]:
    rows = 20_000 if quick else 100_000
    seq = 64
    return [
        {
            "name": "MLP 256-1024-1024-4",
            "tables": feature_tables(rows, 256),
            "spec": {"mlp": {"hidden_sizes": [1024, 1024]}},
            "epochs": 3,
            "cpu_epochs": 1,
            "batch": 256,
        },
        {
            "name": f"Transformer d256 x4 8 heads seq {seq}",
            "tables": token_tables(rows // 4, seq, 1000),
            "spec": {
                "transformer": {
                    "vocab_size": 1000,
                    "max_sequence_length": seq,
                    "d_model": 256,
                    "num_layers": 4,
                    "num_heads": 8,
                }
            },
            "epochs": 2,
            "cpu_epochs": 1,
            "batch": 128,
        },
    ]


def table(results: list[tuple[dict, dict[str, float]]], rounds: int) -> str:
    device = torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Training on a GPU: the aimass loop on CUDA",
        "",
        f"{device}; the CPU row uses the same machine's {torch.get_num_threads()} torch threads"
        f" ({cpu}); torch {torch.__version__}; medians of {rounds} interleaved rounds after a"
        " warm-up, timed from the table (model build and the copy to the device included).",
        "",
        "| model | plain PyTorch, CUDA | aimass, CUDA | aimass / plain | aimass CUDA / CPU |",
        "|---|---|---|---|---|",
    ]
    for case, figures in results:
        plain, ours, cpu_rate = (
            figures["plain_cuda"],
            figures["aimass_cuda"],
            figures["aimass_cpu"],
        )
        lines.append(
            f"| {case['name']} | {plain:,.0f} samples/s | {ours:,.0f} samples/s"
            f" | {ours / plain:.2f}x | {ours / cpu_rate:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_training_gpu: no CUDA device on this machine; nothing measured")
        return 0
    rounds = 2 if args.quick else 3
    results = [(case, measure(case, rounds)) for case in cases(args.quick)]
    text = table(results, rounds)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
