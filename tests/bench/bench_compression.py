"""Compression on the reference models: INT8, FP16, structured pruning + fine-tune, distillation.

    python tests/bench/bench_compression.py --out docs/benchmarks/compression.md [--quick]
    python tests/bench/bench_compression.py --models transformer-ref --steps int8

MLP (64-512-256-10) and CNN (conv32-conv64-pool-fc128) on digits, a small transformer
classifier on synthetic token sequences, and the reference-size transformer of issue 7
(d_model 256, 4 layers, 4 heads, seq 64, 3.4M parameters; not in --quick). ``--models``
and ``--steps`` pick a subset (int8 = dynamic and static, fp16, prune, distill).

Each technique runs through the same code as a compression job
(aimass.compression.recipe) and every model is measured in one interleaved run with its
parent (aimass.compression.measure): ratios of file size, parameters and batch-64
throughput, and the accuracy difference in points. Goals
(issue 7): INT8 file <= 0.3x, throughput >= 1.5x, accuracy within 1 point; structured
50% + fine-tune params <= 0.55x within 2 points, lower latency; student <= 0.25x the
teacher's parameters within 2 points.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from aimass.compression import measure as ms
from aimass.compression import recipe as rc
from aimass.compression import structural as sx
from aimass.compression import training_jobs as tj
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core import nn as ann


def digits_tables() -> tuple[pa.Table, pa.Table]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    columns = {f"p{i}": digits.data[:, i].astype(np.float32) / 16 for i in range(64)}
    columns["digit"] = digits.target.astype(np.int64)
    table = pa.table(columns)
    order = np.random.default_rng(0).permutation(table.num_rows)
    return table.take(order[:1400]), table.take(order[1400:])


def tokens_tables(rows: int, vocab_size: int = 200) -> tuple[pa.Table, pa.Table]:
    """Class = which of 4 marker tokens appears most often in a 64-token sequence."""
    rng = np.random.default_rng(0)
    seqs = rng.integers(5, vocab_size, size=(rows, 64))
    labels = rng.integers(0, 4, size=rows)
    for row, label in enumerate(labels):
        seqs[row, rng.choice(64, 12, replace=False)] = 1 + label
    columns = {f"t{i}": seqs[:, i].astype(np.int64) for i in range(64)}
    columns["label"] = labels.astype(np.int64)
    table = pa.table(columns)
    cut = int(rows * 0.8)
    return table.slice(0, cut), table.slice(cut)


def train(spec: dict, train_table: pa.Table, label: str, epochs: int) -> sx.TorchModel:
    data = ann.data_signature_from_table(train_table, label)
    model = sx.build_student(ann.spec_from_dict(spec), data)
    inputs, labels = ann.table_to_tensors(train_table, model.signature)
    return sx.fine_tune(model, sx.TrainData(inputs, labels), epochs=epochs,
                        learning_rate=1e-3, batch_size=64)  # fmt: skip


STEP_CHOICES = ("int8", "fp16", "prune", "distill")


def bench_model(name: str, model: sx.TorchModel, train_table: pa.Table, test_table: pa.Table,
                quick: bool, work: Path, records: list[dict],
                steps_wanted: set[str]) -> list[str]:  # fmt: skip
    parent = work / f"{name}.onnx"
    arrays = ann.input_arrays(test_table, model.signature)
    sample = tuple(torch.from_numpy(a[:8]) for a in arrays)
    ann.export_onnx(model.module, model.signature, parent, sample=sample)
    feeds = {"input": arrays[0]}
    evaluation = rc.EvalData(feeds, ann.label_array(test_table, model.signature), "c", "accuracy")
    train_inputs, _ = ann.table_to_tensors(train_table, model.signature)
    calibration = [{"input": train_inputs[0][i : i + 64].numpy()} for i in range(0, 512, 64)]
    inputs = rc.Inputs(
        parent, model, "", evaluation, calibration=lambda s: calibration,
        train=tj.train_in_process({"train": train_table}),
    )  # fmt: skip
    epochs = 2 if quick else 5
    # Request defaults (empty messages), as the service applies them to a job.
    steps = []
    if "int8" in steps_wanted:
        steps += [pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic()),
                  pb.CompressionStep(quantize_static=pb.QuantizeStatic())]  # fmt: skip
    if "fp16" in steps_wanted:
        steps.append(pb.CompressionStep(fp16=pb.Fp16()))
    results = []
    if steps:
        recipe = pb.Recipe(steps=steps, mode=pb.RECIPE_MODE_CANDIDATES)
        results.append(rc.run_recipe(recipe, inputs, work))
    if "prune" in steps_wanted:
        chain = pb.Recipe(steps=[
            pb.CompressionStep(prune_structured=pb.PruneStructured(sparsity=0.5)),
            pb.CompressionStep(fine_tune=pb.FineTune(epochs=epochs, learning_rate=3e-4)),
        ])  # fmt: skip
        pruned_dir = work / f"{name}-pruned"
        pruned_dir.mkdir()
        results.append(rc.run_recipe(chain, inputs, pruned_dir))
    if "distill" in steps_wanted:
        distill_dir = work / f"{name}-distill"
        distill_dir.mkdir()
        results.append(rc.run_recipe(pb.Recipe(steps=[pb.CompressionStep(distill=pb.Distill(
            scale_factor=0.25, epochs=epochs * 3, learning_rate=3e-3))]), inputs,
            distill_dir))  # fmt: skip
    # Candidates are reported one by one; of a chain only its end result.
    outcomes = [*results[0].outcomes] if steps else []
    outcomes += [r.outcomes[-1] for r in results[1 if steps else 0 :]]
    parent_metric = results[0].parent_metric
    paths = {"fp32": parent, **{o.name: o.onnx_path for o in outcomes if o.onnx_path}}
    figures = ms.measure_all(paths, evaluation.sample(1), evaluation.sample(64),
                             rounds=2 if quick else 3)  # fmt: skip
    base = figures["fp32"]
    rows = []
    for outcome in outcomes:
        if outcome.onnx_path is None:
            records.append({"model": name, "step": outcome.name, "status": str(outcome.status),
                            "reason": outcome.reason})  # fmt: skip
            rows.append(f"| {name} | {outcome.name} | {outcome.status}: {outcome.reason} |||||")
            continue
        f = figures[outcome.name]
        params = outcome.params.get("parameters", f.parameter_count)
        records.append({
            "model": name, "step": outcome.name, "status": str(outcome.status),
            "file_ratio": f.file_size_bytes / base.file_size_bytes,
            "params_ratio": params / model.parameter_count,
            "throughput_ratio": f.throughput_rows_per_second / base.throughput_rows_per_second,
            "p50_ratio": f.latency_p50_ms / base.latency_p50_ms,
            "file_bytes": f.file_size_bytes, "parent_file_bytes": base.file_size_bytes,
            "metric_before": parent_metric, "metric_after": outcome.metric_after,
        })  # fmt: skip
        rows.append(
            f"| {name} | {outcome.name} | {f.file_size_bytes / base.file_size_bytes:.2f} | "
            f"{params / model.parameter_count:.2f} | "
            f"{f.throughput_rows_per_second / base.throughput_rows_per_second:.2f}x | "
            f"{f.latency_p50_ms / base.latency_p50_ms:.2f} | "
            f"{parent_metric:.3f} -> {outcome.metric_after:.3f} "
            f"({(outcome.metric_after - parent_metric) * 100:+.1f} pt) |"
        )
    return rows


MODEL_CHOICES = ("mlp", "cnn", "transformer", "transformer-ref")


def model_cases(quick: bool, wanted: list[str]) -> list[tuple]:
    """(name, spec, train table, test table, label, epochs) of each wanted model."""
    epochs = 5 if quick else 30
    cases = []
    if {"mlp", "cnn"} & set(wanted):
        digits_train, digits_test = digits_tables()
    if "mlp" in wanted:
        cases.append(("mlp", {"mlp": {"hidden_sizes": [512, 256]}}, digits_train, digits_test,
                      "digit", epochs))  # fmt: skip
    if "cnn" in wanted:
        cases.append(("cnn", {"cnn2d": {"channels": [32, 64], "pool_size": 2,
                      "hidden_sizes": [128]}}, digits_train, digits_test, "digit",
                      max(2, epochs // 3)))  # fmt: skip
    if "transformer" in wanted:
        tok_train, tok_test = tokens_tables(600 if quick else 3000)
        cases.append(("transformer", {"transformer": {"vocab_size": 200,
                      "max_sequence_length": 64, "d_model": 64 if quick else 128,
                      "num_layers": 2, "num_heads": 4}}, tok_train, tok_test, "label",
                      2 if quick else 6))  # fmt: skip
    if "transformer-ref" in wanted:
        # Issue 7's reference size (3.4M parameters, vocab 1,000 of them 256k); one
        # epoch keeps full runs short: the task is easy and INT8 is compared with
        # the same trained parent whatever its accuracy.
        ref_train, ref_test = tokens_tables(3000, vocab_size=1000)
        cases.append(("transformer-ref", {"transformer": {"vocab_size": 1000,
                      "max_sequence_length": 64, "d_model": 256, "num_layers": 4,
                      "num_heads": 4}}, ref_train, ref_test, "label", 1))  # fmt: skip
    return cases


def comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"pick from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--models",
        type=comma_list(MODEL_CHOICES),
        help="comma list; default all (--quick: all but transformer-ref)",
    )
    parser.add_argument("--steps", type=comma_list(STEP_CHOICES), default=list(STEP_CHOICES),
                        help="comma list; default all")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    wanted = args.models or [m for m in MODEL_CHOICES if not (args.quick and m.endswith("-ref"))]
    models = model_cases(args.quick, wanted)
    lines = [
        "# Compression benchmark (onnxruntime, 1 thread, ratios against the FP32 parent)",
        "",
        "| model | step | file x | params x | throughput @64 | p50 @1 x | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, spec, train_table, test_table, label, model_epochs) in enumerate(models):
            torch.manual_seed(0)  # the same weights whether a model runs alone or not
            model = train(spec, train_table, label, model_epochs)
            work = Path(scratch) / str(index)
            work.mkdir()
            lines += bench_model(name, model, train_table, test_table, args.quick, work,
                                 records, set(args.steps))  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        # Machine-readable beside the table: tests/bench/report.py draws the plots from it.
        results = {"bench": "compression", "quick": args.quick, "models": wanted,
                   "steps": args.steps, "rows": records}  # fmt: skip
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
