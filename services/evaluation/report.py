"""Evaluation reports: a Markdown and an HTML page with the metrics table, and PNG figures
(confusion matrix, ROC and precision-recall curves) drawn with matplotlib's Agg backend.

:func:`render` returns every file as bytes by name; the runner stores them as
artifacts of kind "report" and GetEvaluationReport streams them back.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np


@dataclass
class ReportData:
    """Everything a report shows, in plain Python values."""

    evaluation: str
    model_version: str
    dataset_version: str
    split: str
    task: str
    row_count: int
    confidence: float
    # name -> (value, lower, upper); bounds NaN when not bootstrapped.
    metrics: dict[str, tuple[float, float, float]]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: dict[str, Any] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _interval(value: tuple[float, float, float]) -> str:
    _, lower, upper = value
    return "" if math.isnan(lower) else f"[{_fmt(lower)}, {_fmt(upper)}]"


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def confusion_png(labels: list[str], counts: np.ndarray) -> bytes:
    size = max(4.0, 0.5 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 10 else 0)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(labels) <= 20:
        limit = counts.max() / 2 if counts.size else 0
        for (i, j), value in np.ndenumerate(counts):
            color = "white" if value > limit else "black"
            axes.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    axes.set_title("Confusion matrix")
    return _png(figure)


def curves_png(curves: list[dict[str, Any]], kind: str) -> bytes:
    figure, axes = plt.subplots(figsize=(5, 5))
    for curve in curves:
        label = curve["label"] or "positive"
        axes.plot(curve["x"], curve["y"], label=f"{label} ({curve['area']:.3f})")
    if kind == "roc":
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
        axes.set_title("ROC curve")
    else:
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.set_title("Precision-recall curve")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return _png(figure)


def figures(data: ReportData) -> dict[str, bytes]:
    """The PNG files of the report, by file name."""
    files: dict[str, bytes] = {}
    if data.confusion:
        counts = np.array(data.confusion["counts"]).reshape(len(data.confusion["labels"]), -1)
        files["confusion_matrix.png"] = confusion_png(data.confusion["labels"], counts)
    for kind, file_name in (("roc", "roc.png"), ("pr", "pr.png")):
        chosen = [c for c in data.curves if c["kind"] == kind]
        if chosen:
            files[file_name] = curves_png(chosen, kind)
    return files


def markdown(data: ReportData, images: list[str]) -> str:
    lines = [
        f"# Evaluation {data.evaluation}",
        "",
        f"- model version: `{data.model_version}`",
        f"- data: `{data.dataset_version}`, split `{data.split}`, {data.row_count} rows",
        f"- task: {data.task}",
        "",
        "## Metrics",
        "",
        f"| metric | value | {int(data.confidence * 100)}% interval |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {_fmt(v[0])} | {_interval(v)} |" for n, v in data.metrics.items()]
    if data.per_class:
        lines += ["", "## Per class", "", "| class | precision | recall | f1 | support |"]
        lines.append("|---|---|---|---|---|")
        lines += [
            f"| {c['label']} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | "
            f"{_fmt(c['f1'])} | {c['support']} |"
            for c in data.per_class
        ]
    for image in images:
        lines += ["", f"![{image}]({image})"]
    return "\n".join(lines) + "\n"


def html_page(data: ReportData, images: list[str]) -> str:
    def row(cells: list[str], tag: str = "td") -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    head = row(["metric", "value", f"{int(data.confidence * 100)}% interval"], "th")
    body = "".join(row([n, _fmt(v[0]), _interval(v)]) for n, v in data.metrics.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation {html.escape(data.evaluation)}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
        f"<h1>Evaluation {html.escape(data.evaluation)}</h1>",
        f"<p>model version <code>{html.escape(data.model_version)}</code>, data "
        f"<code>{html.escape(data.dataset_version)}</code> split {html.escape(data.split)}, "
        f"{data.row_count} rows, task {html.escape(data.task)}</p>",
        f"<h2>Metrics</h2><table>{head}{body}</table>",
    ]
    if data.per_class:
        head = row(["class", "precision", "recall", "f1", "support"], "th")
        body = "".join(
            row([c["label"], _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]),
                 str(c["support"])])
            for c in data.per_class
        )  # fmt: skip
        parts.append(f"<h2>Per class</h2><table>{head}{body}</table>")
    parts += [f"<p><img src='{html.escape(i)}' alt='{html.escape(i)}'></p>" for i in images]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render(data: ReportData) -> dict[str, bytes]:
    """report.md, report.html and the PNG figures, by file name."""
    files = figures(data)
    images = list(files)
    files["report.md"] = markdown(data, images).encode()
    files["report.html"] = html_page(data, images).encode()
    return files
