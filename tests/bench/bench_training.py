"""Samples/s of the aimass training loop against a plain PyTorch loop (same model, data,
batch size, seed, threads), measured in the same run, interleaved rounds, medians.

The aimass side is the job's loop (aimass.training.trainer.Trainer): batches from the
epoch permutation, loss/learning-rate/samples-per-second metrics, validation each epoch, a
checkpoint (model + optimizer + RNG state serialized and handed to the hooks) every epoch.
The plain side is the loop a user writes by hand: shuffle, slice, forward, backward, step.

    python tests/bench/bench_training.py --out docs/benchmarks/training.md [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from sklearn.datasets import load_digits

from aimass.core import nn as ann
from aimass.core.protodict import message_from_dict
from aimass.training.sources import TableSource
from aimass.training.trainer import Trainer, TrainPlan
from aimass.training.v1 import training_pb2 as tpb


class Hooks:
    def metrics(self, step: int, epoch: int, values: dict[str, float]) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def checkpoint(self, step: int, epoch: int, path: Path, metrics: dict[str, float]) -> None:
        path.read_bytes()

    def should_stop(self) -> bool:
        return False


def digits_tables() -> tuple[pa.Table, pa.Table]:
    d = load_digits()
    table = pa.table({**{f"p{i}": d.data[:, i] / 16 for i in range(64)}, "label": d.target})
    return table.slice(0, 1437), table.slice(1437)


def token_tables(rows: int, seq: int, vocab: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, size=(rows, seq))
    labels = (tokens[:, 0] > vocab // 2).astype(np.int64)
    table = pa.table({**{f"t{i}": tokens[:, i] for i in range(seq)}, "label": labels})
    cut = int(rows * 0.9)
    return table.slice(0, cut), table.slice(cut)


def plain_loop(
    spec: dict, data: ann.DataSignature, train: pa.Table, epochs: int, batch: int
) -> float:
    torch.manual_seed(0)
    built = ann.build_model(ann.spec_from_dict(spec), data)
    (x,), y = ann.table_to_tensors(train, built.signature)
    model = built.module
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            rows = order[i : i + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            loss.item()
    return epochs * len(x) / (time.perf_counter() - start)


def aimass_loop(
    spec: dict, data: ann.DataSignature, tables: tuple, epochs: int, batch: int
) -> float:
    config = message_from_dict(
        {"epochs": epochs, "batch_size": batch, "seed": 0, "optimizer": {"type": "adam"}},
        tpb.TrainingConfig(),
    )
    plan = TrainPlan(
        job="trainingJobs/bench",
        spec=ann.spec_from_dict(spec).SerializeToString(),
        config=config.SerializeToString(),
        data_signature=data.to_dict(),
        work_dir=tempfile.mkdtemp(),
        threads=torch.get_num_threads(),
        export=False,
    )
    source = TableSource({"train": tables[0], "valid": tables[1]})
    start = time.perf_counter()
    result = Trainer(plan, source, Hooks()).run()
    elapsed = time.perf_counter() - start
    # The job's own figure covers the loop; the wall time adds model build and data load.
    return min(result.samples_per_second, result.steps and tables[0].num_rows * epochs / elapsed)


def measure(name: str, spec: dict, tables: tuple, epochs: int, batch: int, rounds: int) -> list:
    data = ann.data_signature_from_table(pa.concat_tables(tables), "label")
    plain, ours = [], []
    for _ in range(rounds):
        plain.append(plain_loop(spec, data, tables[0], epochs, batch))
        ours.append(aimass_loop(spec, data, tables, epochs, batch))
    p, o = statistics.median(plain), statistics.median(ours)
    return [name, batch, epochs, f"{p:,.0f}", f"{o:,.0f}", f"{o / p:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 3 if args.quick else 5
    rows = []
    digits = digits_tables()
    rows.append(
        measure(
            "MLP digits 64-512-256-10",
            {"mlp": {"hidden_sizes": [512, 256]}},
            digits,
            3 if args.quick else 10,
            64,
            rounds,
        )
    )
    seq, d_model, layers = (32, 64, 2) if args.quick else (64, 256, 4)
    tokens = token_tables(400 if args.quick else 1200, seq, 1000)
    transformer = {
        "transformer": {
            "vocab_size": 1000,
            "max_sequence_length": seq,
            "d_model": d_model,
            "num_layers": layers,
            "num_heads": 4,
        }
    }
    rows.append(
        measure(f"Transformer d{d_model} x{layers} seq {seq}", transformer, tokens, 1, 32, rounds)
    )
    header = (
        "| model | batch | epochs | plain torch samples/s | aimass job loop samples/s | ratio |"
    )
    lines = [
        "# Training throughput: aimass job loop vs a plain PyTorch loop",
        "",
        f"1 torch thread, medians of {rounds} interleaved rounds"
        + (" (--quick sizes)" if args.quick else "")
        + ". The aimass loop includes validation each epoch, metrics and a checkpoint per "
        "epoch.",
        "",
        header,
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
        "Recovery from a killed worker is bounded by the queue's ack_wait (the job is "
        "redelivered after it) plus the new attempt's start: see docs/training.md.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
