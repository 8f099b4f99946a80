"""PNG plots of the benchmark results, drawn from the JSON the benches write beside their tables.

- serving.json (bench_serving.py): latency percentiles of the MLP on every path, and its
  throughput against concurrency per path;
- compression.json (bench_compression.py): file size against accuracy of each compressed
  variant, per model.

Each plot is drawn only when its JSON is there; report.py embeds what was drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

SERVING_LATENCY = "serving_latency.png"
SERVING_THROUGHPUT = "serving_throughput.png"
COMPRESSION_TRADEOFF = "compression_tradeoff.png"
PERCENTILES = ("p50_ms", "p90_ms", "p99_ms")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def serving_rows(results: dict, model: str = "mlp") -> dict[str, dict[int, dict]]:
    """path -> concurrency -> row, for the paths the bench lists, in its order."""
    by_path: dict[str, dict[int, dict]] = {path: {} for path in results.get("paths", [])}
    for row in results["rows"]:
        if row["model"] == model and row["path"] in by_path:
            by_path[row["path"]][row["concurrency"]] = row
    return {path: rows for path, rows in by_path.items() if rows}


def label_of(rows: dict[int, dict], path: str) -> str:
    return next(iter(rows.values())).get("label", path)


def draw_latency(results: dict, out: Path) -> bool:
    """Grouped bars: p50/p90/p99 per path, one panel per concurrency every path was run at."""
    by_path = serving_rows(results)
    shared = set.intersection(*(set(rows) for rows in by_path.values())) if by_path else set()
    levels = sorted(shared)
    if not levels:
        return False
    levels = [levels[0], levels[-1]] if len(levels) > 1 else levels
    figure, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4), squeeze=False)
    paths = list(by_path)
    width = 0.8 / len(PERCENTILES)
    for ax, concurrency in zip(axes[0], levels, strict=True):
        for index, key in enumerate(PERCENTILES):
            values = [by_path[path][concurrency][key] for path in paths]
            offset = (index - (len(PERCENTILES) - 1) / 2) * width
            positions = [p + offset for p in range(len(paths))]
            ax.barh(positions, values, height=width, label=key.removesuffix("_ms"))
        ax.set_yticks(range(len(paths)), [label_of(by_path[p], p) for p in paths])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log scale)")
        ax.set_title(f"MLP, batch 1, concurrency {concurrency}")
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def draw_throughput(results: dict, out: Path) -> bool:
    """Requests/s against concurrency, one line per path."""
    by_path = serving_rows(results)
    if not by_path:
        return False
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for path, rows in by_path.items():
        levels = sorted(rows)
        ax.plot(levels, [rows[c]["rps"] for c in levels], marker="o", label=label_of(rows, path))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    levels = sorted({c for rows in by_path.values() for c in rows})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("requests/s (log scale)")
    ax.set_title("MLP, batch 1: throughput against concurrency")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def draw_compression(results: dict, out: Path) -> bool:
    """File size (x of FP32) against accuracy change (points), one panel per model.

    Only the figures a rerun reproduces exactly (fixed seeds): sizes, parameters, accuracy;
    throughput ratios move with the machine's load and stay in the table.
    """
    by_model: dict[str, list[dict]] = {}
    for row in results["rows"]:
        if "file_ratio" in row:  # failed steps have no figures
            by_model.setdefault(row["model"], []).append(row)
    if not by_model:
        return False
    figure, axes = plt.subplots(
        1, len(by_model), figsize=(4.5 * len(by_model), 4.6), squeeze=False, sharey=True
    )
    steps = list(dict.fromkeys(row["step"] for rows in by_model.values() for row in rows))
    # One colour and shape per step in every panel: steps that land on one spot stay visible.
    styles = {step: (f"C{i % 10}", "ovD^<>p*h"[i % 9]) for i, step in enumerate(steps)}
    for ax, (model, rows) in zip(axes[0], by_model.items(), strict=True):
        ax.scatter([1.0], [0.0], s=140, marker="s", color="black")
        for row in rows:
            delta = (row["metric_after"] - row["metric_before"]) * 100
            color, marker = styles[row["step"]]
            ax.scatter([row["file_ratio"]], [delta], s=20 + 120 * row["params_ratio"],
                       color=color, marker=marker, alpha=0.75)  # fmt: skip
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("file size, x of FP32")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy change, points")
    handles = [plt.Line2D([], [], color="black", marker="s", linestyle="", label="FP32 parent")]
    handles += [
        plt.Line2D([], [], color=color, marker=marker, linestyle="", label=step)
        for step, (color, marker) in styles.items()
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small")
    figure.suptitle("Compressed variants: file size against accuracy (marker area ~ parameters)")
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def draw_all(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Every plot its data allows, into ``folder``: bench name -> [(caption, PNG file name)]."""
    drawn: dict[str, list[tuple[str, str]]] = {}
    serving = load(folder / "serving.json")
    if serving is not None:
        for draw, name, caption in (
            (draw_latency, SERVING_LATENCY, "Latency percentiles per serving path"),
            (draw_throughput, SERVING_THROUGHPUT, "Throughput against concurrency per path"),
        ):
            if draw(serving, folder / name):
                drawn.setdefault("serving", []).append((caption, name))
    compression = load(folder / "compression.json")
    if compression is not None and draw_compression(compression, folder / COMPRESSION_TRADEOFF):
        drawn["compression"] = [("Size and accuracy of compressed variants", COMPRESSION_TRADEOFF)]
    return drawn
