"""The code base stays ruff clean: lint rules and formatting, as `make lint` checks them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = [sys.executable, "-m", "ruff"]


def run_ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUFF, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    result = run_ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = run_ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
