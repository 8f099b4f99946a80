"""report.py draws the PNG plots from the benches' JSON results and embeds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.bench import plots, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Figures of a real --quick run of bench_serving (2 loaded cores), three of its MLP paths.
MEASURED = (
    ("onnxruntime in-process", "ONNX Runtime in-process", 1, 1054, 0.016, 0.018, 10.478),
    ("onnxruntime in-process", "ONNX Runtime in-process", 8, 10761, 0.016, 0.021, 10.590),
    ("onnxruntime in-process", "ONNX Runtime in-process", 32, 36339, 0.016, 0.021, 8.070),
    ("direct", "Triton direct (gRPC)", 1, 886, 0.873, 1.482, 4.899),
    ("direct", "Triton direct (gRPC)", 8, 1924, 2.945, 6.939, 21.061),
    ("direct", "Triton direct (gRPC)", 16, 1813, 7.468, 14.210, 38.372),
    ("direct", "Triton direct (gRPC)", 32, 2146, 12.349, 26.302, 41.943),
    ("mlflow models serve", "mlflow models serve", 1, 446, 1.747, 3.516, 6.491),
    ("mlflow models serve", "mlflow models serve", 8, 173, 32.861, 63.778, 450.244),
    ("mlflow models serve", "mlflow models serve", 32, 229, 114.223, 251.300, 410.728),
)
SERVING = {
    "bench": "serving",
    "paths": ["onnxruntime in-process", "direct", "mlflow models serve"],
    "mlflow": {"version": "3.17.2", "skipped": None},
    "rows": [
        {"model": "mlp", "path": path, "label": label, "concurrency": c, "rounds": 1,
         "rps": rps, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}
        for path, label, c, rps, p50, p90, p99 in MEASURED
    ] + [
        {"model": "transformer", "path": "direct", "label": "Triton direct (gRPC)",
         "concurrency": 16, "rounds": 1, "rps": 705.6, "p50_ms": 12.88, "p90_ms": 45.46,
         "p99_ms": 137.36},
    ],
}  # fmt: skip
COMPRESSION = {
    "bench": "compression",
    "rows": [
        {"model": "mlp", "step": "int8-static", "status": "APPLIED", "file_ratio": 0.26,
         "params_ratio": 1.0, "throughput_ratio": 2.12, "p50_ratio": 0.98,
         "metric_before": 0.982, "metric_after": 0.982},
        {"model": "mlp", "step": "distill", "status": "APPLIED", "file_ratio": 0.10,
         "params_ratio": 0.10, "throughput_ratio": 5.47, "p50_ratio": 0.46,
         "metric_before": 0.982, "metric_after": 0.979},
        {"model": "transformer", "step": "fp16", "status": "FAILED",
         "reason": "onnxruntime crashed loading the model (signal 11)"},
        {"model": "transformer", "step": "int8-dynamic", "status": "APPLIED",
         "file_ratio": 0.37, "params_ratio": 1.01, "throughput_ratio": 1.32,
         "p50_ratio": 0.58, "metric_before": 1.0, "metric_after": 1.0},
    ],
}  # fmt: skip


def write_results(folder: Path) -> None:
    (folder / "serving.md").write_text("# Serving\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (folder / "compression.md").write_text("# Compression\n\n| a |\n|---|\n| 1 |\n")
    (folder / "serving.json").write_text(json.dumps(SERVING))
    (folder / "compression.json").write_text(json.dumps(COMPRESSION))


def assert_png(path: Path, min_width: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()  # a whole, readable PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width
        # A drawn plot, not a blank canvas: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20


def test_report_draws_and_embeds_the_plots(tmp_path: Path) -> None:
    write_results(tmp_path)
    text = report.render(tmp_path)
    for name, min_width in (
        (plots.SERVING_LATENCY, 1000),  # two panels: concurrency 1 and 32
        (plots.SERVING_THROUGHPUT, 600),
        (plots.COMPRESSION_TRADEOFF, 800),  # two panels: mlp, transformer
    ):
        assert_png(tmp_path / name, min_width)
        assert f"(benchmarks/{name})" in text
    # Each plot sits after its own bench's table, the compression one before serving.
    serving = text.index("## Serving")
    assert text.index(plots.SERVING_LATENCY) > serving
    assert serving > text.index(plots.COMPRESSION_TRADEOFF) > text.index("## Compression")
    assert "| mlflow (serving peer, .venv-mlflow) | 3.17.2 |" in text


def test_latency_panels_are_the_lowest_and_highest_shared_concurrency(tmp_path: Path) -> None:
    # Triton direct alone has c=16: the panels are c=1 and c=32, shared by every path.
    one_level = dict(SERVING, rows=[r for r in SERVING["rows"] if r["concurrency"] == 1])
    assert plots.draw_latency(one_level, tmp_path / "one.png")
    assert plots.draw_latency(SERVING, tmp_path / "two.png")
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert two.width == 2 * one.width


def test_without_results_no_plot_is_drawn_or_linked(tmp_path: Path) -> None:
    (tmp_path / "serving.md").write_text("# Serving\n\nno JSON beside this table\n")
    text = report.render(tmp_path)
    assert not list(tmp_path.glob("*.png"))
    assert "![" not in text
    assert "| mlflow (serving peer, .venv-mlflow) | not measured |" in text


def test_a_skipped_mlflow_row_says_why(tmp_path: Path) -> None:
    skipped = dict(SERVING, mlflow={"version": "3.17.2", "skipped": "pip install failed"})
    skipped["rows"] = [r for r in SERVING["rows"] if r["path"] != "mlflow models serve"]
    write_results(tmp_path)
    (tmp_path / "serving.json").write_text(json.dumps(skipped))
    text = report.render(tmp_path)
    assert "| mlflow (serving peer, .venv-mlflow) | skipped: pip install failed |" in text
    assert_png(tmp_path / plots.SERVING_THROUGHPUT, 600)


@pytest.mark.slow  # creates a virtual environment (pip included)
def test_mlflow_peer_reports_a_failed_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No registry: the bench gets PeerUnavailable naming pip's error, and no stamp is left."""
    from tests.bench import mlflow_peer

    missing = tmp_path / "no-such-mlflow-1.0-py3-none-any.whl"  # fails without any network
    monkeypatch.setattr(mlflow_peer, "requirements", lambda: [str(missing)])
    venv = tmp_path / "venv"
    with pytest.raises(mlflow_peer.PeerUnavailable, match=r"pip install into venv failed: .*ERROR"):
        mlflow_peer.ensure_venv(venv)
    assert (venv / "bin" / "python").exists()
    assert not (venv / ".aimass-requirements").exists()
