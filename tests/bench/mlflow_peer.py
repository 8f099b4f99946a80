"""The `mlflow models serve` peer of the serving benchmark, in a virtual environment of its own.

mlflow brings its own ranges of SQLAlchemy, alembic, protobuf and numpy, which conflict
with aimass's (numpy<2 is pinned by nvidia-pytriton), so it never enters .venv: the bench
creates .venv-mlflow (git-ignored) on first use with an exact mlflow and the same
onnxruntime and onnx releases as .venv, saves the same ONNX model with mlflow's onnx
flavor into a local folder (no tracking server) and starts ``mlflow models serve -m DIR
--env-manager local`` as a real subprocess. When the environment cannot be built (no
registry access), :class:`PeerUnavailable` says why and the bench skips that row.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-mlflow"
# The newest mlflow whose mlflow-skinny is on the registry mirror; installs on Python 3.11.
MLFLOW_VERSION = "3.17.2"

SAVE_MODEL = """
import sys
import numpy as np
import onnx
import onnxruntime
import mlflow.onnx
from mlflow.models import infer_signature

onnx_path, model_dir = sys.argv[1], sys.argv[2]
model = onnx.load(onnx_path)
session = onnxruntime.InferenceSession(onnx_path)
# A tensor signature, so /invocations parses {"inputs": {"input": [[...]]}} as float32.
example = {i.name: np.zeros((1, *i.shape[1:]), np.float32) for i in session.get_inputs()}
outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, example)))
mlflow.onnx.save_model(model, model_dir, signature=infer_signature(example, outputs))
"""


class PeerUnavailable(RuntimeError):
    """The mlflow environment or server could not be made; the message says why."""


def requirements() -> list[str]:
    """mlflow pinned, and the onnxruntime and onnx of .venv so both sides run the same ORT."""
    return [
        f"mlflow=={MLFLOW_VERSION}",
        f"onnxruntime=={metadata.version('onnxruntime')}",
        f"onnx=={metadata.version('onnx')}",
    ]


def ensure_venv(venv: Path = VENV, timeout_s: float = 1800) -> Path:
    """The mlflow environment's python, created (or brought to ``requirements()``) on demand."""
    python = venv / "bin" / "python"
    stamp = venv / ".aimass-requirements"
    wanted = "\n".join(requirements())
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"mlflow peer: installing {', '.join(requirements())} into {venv}", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        install = subprocess.run(
            # One retry: without a registry the bench should skip the row soon, not hang.
            [str(python), "-m", "pip", "install", "-q", "--retries", "1", *requirements()],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        raise PeerUnavailable(f"could not build {venv.name}: {err}") from err
    if install.returncode != 0:
        errors = [line for line in install.stderr.splitlines() if line.startswith("ERROR")]
        last = (errors or install.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"pip install into {venv.name} failed: {last}")
    stamp.write_text(wanted)
    return python


def save_model(python: Path, onnx_bytes: bytes, folder: Path) -> Path:
    """The ONNX model saved with mlflow's onnx flavor in ``folder``/model."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    onnx_path.write_bytes(onnx_bytes)
    model_dir = folder / "model"
    saved = subprocess.run(
        [str(python), "-c", SAVE_MODEL, str(onnx_path), str(model_dir)],
        capture_output=True, text=True, timeout=300, env=peer_env(python),
    )  # fmt: skip
    if saved.returncode != 0:
        tail = saved.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"mlflow.onnx.save_model failed: {tail[0]}")
    return model_dir


def peer_env(python: Path) -> dict[str, str]:
    """This environment less .venv's traces, the mlflow venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    return env


def start_server(python: Path, model_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``mlflow models serve`` with its defaults, as a user runs it, on 127.0.0.1:``port``."""
    command = [
        str(python.parent / "mlflow"), "models", "serve", "-m", str(model_dir),
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    return GroupProcess(
        command, env=peer_env(python), stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its server child and workers are signalled with it
    )  # fmt: skip


class GroupProcess(subprocess.Popen):
    """A process leading its own group: terminate() and kill() reach the server it spawns."""

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)


def wait_ready(
    process: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 180
) -> None:
    """Until GET /ping answers 200; PeerUnavailable if the server exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise PeerUnavailable(f"mlflow models serve exited ({process.returncode}): {tail[0]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise PeerUnavailable(f"mlflow models serve did not answer /ping within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the server it spawns too), SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def invocation_body(inputs: dict[str, object]) -> bytes:
    """The tensor-input JSON of /invocations: {"inputs": {name: nested lists}}."""
    import numpy as np

    return json.dumps({"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}).encode()


def start(onnx_bytes: bytes, folder: Path, port: int) -> subprocess.Popen[bytes]:
    """Environment, saved model and a serving `mlflow models serve`; else PeerUnavailable."""
    python = ensure_venv()
    model_dir = save_model(python, onnx_bytes, folder)
    log = folder / "mlflow-serve.log"
    process = start_server(python, model_dir, port, log)
    try:
        wait_ready(process, port, log)
    except BaseException:
        stop_server(process)
        raise
    return process
