"""Does Triton accept an ONNX model? Load it under a temporary name, infer once, compare.

:func:`check_model` writes a repository entry for the file (signature read
from the file, no batching), asks Triton to load it, runs one inference on a
sample, compares the answer with ONNX Runtime run in this process on the same
file, then unloads the model and removes the entry whatever happened. The
verdict carries Triton's own message when it refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aimass.core.errors import AimassError
from aimass.core.triton.control import TritonControl
from aimass.core.triton.pybackend import OnnxBatchRunner
from aimass.core.triton.repository import ServingOptions, signature_from_onnx

# Triton's python backend runs the same ONNX Runtime: answers should match almost exactly.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    # "loaded ... answered within ..." when accepted, Triton's message when not.
    message: str


async def check_model(
    control: TritonControl,
    model_file: Path,
    sample: Mapping[str, np.ndarray],
    *,
    prefix: str = "aimass-check",
    tolerance: float = TOLERANCE,
    timeout_s: float = 120.0,
) -> Verdict:
    """Loads ``model_file`` into the Triton of ``control``, infers ``sample``, compares."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    try:
        signature = await asyncio.to_thread(signature_from_onnx, model_file)
        marker = {"purpose": "acceptance check", "file": model_file.name}
        await asyncio.wait_for(
            control.load(name, model_file, signature, ServingOptions(), marker), timeout_s
        )
        outputs = [t.name for t in signature.outputs]
        served = await asyncio.wait_for(control.infer(name, sample, outputs), timeout_s)
    except AimassError as err:
        return Verdict(False, str(err))
    except TimeoutError:
        return Verdict(False, f"Triton at {control.address} did not answer within {timeout_s} s")
    finally:
        await _remove(control, name)
    expected = await asyncio.to_thread(_onnxruntime_outputs, model_file, sample)
    return _compare(served, expected, tolerance, control.address)


async def _remove(control: TritonControl, name: str) -> None:
    with contextlib.suppress(Exception):  # a failed unload must not hide the verdict
        await control.unload(name)
    if control.repository is not None:
        await asyncio.to_thread(control.repository.remove, name)


def _onnxruntime_outputs(
    model_file: Path, sample: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    return OnnxBatchRunner(model_file).run(sample)


def _compare(
    served: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance: float,
    address: str,
) -> Verdict:
    worst = 0.0
    for name, reference in expected.items():
        answer = served.get(name)
        if answer is None or answer.shape != reference.shape:
            shape = None if answer is None else list(answer.shape)
            return Verdict(
                False,
                f"Triton at {address} answered {name!r} with shape {shape},"
                f" ONNX Runtime with {list(reference.shape)}",
            )
        if reference.dtype.kind not in "fc":
            if not np.array_equal(answer, reference):
                return Verdict(False, f"Triton at {address}: {name!r} differs from ONNX Runtime")
            continue
        scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
        difference = float(np.abs(answer.astype(np.float64) - reference).max(initial=0.0))
        if not difference <= tolerance * scale:
            return Verdict(
                False,
                f"Triton at {address}: {name!r} differs from ONNX Runtime by {difference:.3g}"
                f" (allowed {tolerance * scale:.3g})",
            )
        worst = max(worst, difference)
    return Verdict(
        True, f"Triton at {address} loaded it and answered within {worst:.2g} of ONNX Runtime"
    )
