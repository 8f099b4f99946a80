"""Writes docs/benchmarks.md: the machine, the versions, and every benchmark table.

`make bench` runs each tests/bench/bench_*.py into docs/benchmarks/<name>.md, then this
script gathers them under one page with what they were measured on, so a figure is never
read without its machine. The PNG plots (tests/bench/plots.py) are drawn from the JSON
results some benches write beside their table, and embedded after that table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import plots  # noqa: E402 (needs the repository root on the path)

PACKAGES = ("torch", "onnxruntime", "grpcio", "nats-py", "tritonclient", "nvidia-pytriton",
            "pyarrow", "numpy", "SQLAlchemy", "aiohttp")  # fmt: skip
ORDER = ("data", "training", "evaluation", "compression", "serving", "gateway",
         "prediction_log", "soak")  # fmt: skip


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def mlflow_peer_version(folder: Path) -> str:
    """The mlflow of the serving bench's peer: it lives in .venv-mlflow, not in this venv."""
    path = folder / "serving.json"
    peer = json.loads(path.read_text()).get("mlflow", {}) if path.exists() else {}
    if not peer:
        return "not measured"
    return f"skipped: {peer['skipped']}" if peer.get("skipped") else f"{peer['version']}"


def machine_section(folder: Path) -> list[str]:
    rows = [
        ("CPU", f"{cpu_model()}, {os.cpu_count()} logical cores"),
        ("memory", f"{memory_gib():.0f} GiB"),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", platform.python_version()),
        *((name, version_of(name)) for name in PACKAGES),
        ("mlflow (serving peer, .venv-mlflow)", mlflow_peer_version(folder)),
        ("aimass revision", git_revision()),
        ("written", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def tables(folder: Path) -> list[Path]:
    found = {path.stem: path for path in folder.glob("*.md")}
    ordered = [found.pop(name) for name in ORDER if name in found]
    return ordered + [found[name] for name in sorted(found)]


def render(folder: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench`. Every figure is a ratio against a baseline measured in the",
        "same run, in interleaved rounds where the script says so: this machine is small and",
        "noisy, so absolute numbers move between runs while the ratios hold better.",
        "",
        "## Machine and versions",
        "",
        *machine_section(folder),
    ]
    drawn = plots.draw_all(folder)
    for path in tables(folder):
        body = path.read_text().strip()
        if body.startswith("# "):  # each table file has its own title: demote it
            body = "#" + body
        else:
            body = f"## {path.stem.replace('_', ' ')}\n\n{body}"
        lines += ["", body, "", f"(from [benchmarks/{path.name}](benchmarks/{path.name}))"]
        for caption, name in drawn.get(path.stem, []):
            lines += ["", f"![{caption}](benchmarks/{name})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.out.write_text(render(args.tables))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
