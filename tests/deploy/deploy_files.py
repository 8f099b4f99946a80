"""Reading the files under deploy/ for the tests: compose, Kubernetes, Prometheus."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from aimass.core.settings import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
GPU_COMPOSE_FILE = DEPLOY / "docker-compose.gpu.yml"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
# The processes that run from the aimass image (python -m <module>).
AIMASS_MODULES = {name: f"aimass.{name}" for name in SERVICE_NAMES}
WORKER_MODULE = "aimass.training.worker"

_DEFAULTED = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def require_tool(name: str, install_hint: str) -> str:
    """The path of a command; skipped with the reason when missing, failed under CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed ({install_hint})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults (the tests set no variables)."""
    return _DEFAULTED.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def python_module(command: list[str]) -> str | None:
    """The module of `python -m MODULE ...`, else None."""
    if len(command) >= 3 and command[0].startswith("python") and command[1] == "-m":
        return command[2]
    return None


def load_kubernetes() -> list[tuple[str, dict[str, Any]]]:
    """Every manifest under deploy/kubernetes as (file name, document)."""
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload (Deployment, StatefulSet, Job), else None."""
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None
