"""Whether Triton accepts a compressed model: the last check before registration.

The Triton is the one the environment names: ``AIMASS_COMPRESSION_TRITON_GRPC``
/ ``_REPOSITORY`` / ``_BACKEND`` when set, else the ``AIMASS_ROUTING_TRITON_*``
variables the embedded stack gives every process (its own Triton). The check
(:func:`aimass.core.triton.acceptance.check_model`) loads the candidate under a
temporary name, runs one inference on a sample, compares with ONNX Runtime,
unloads it and removes the entry. Without a configured Triton there is no
checker and the job report says "skipped (no Triton configured)".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aimass.core.triton.acceptance import Verdict, check_model
from aimass.core.triton.control import TritonControl, TritonTarget

COMPRESSION_PREFIX = "AIMASS_COMPRESSION_TRITON_"
SKIPPED = "skipped (no Triton configured)"


class TritonChecker:
    """Loads candidates into one Triton server and returns its verdict."""

    def __init__(self, target: TritonTarget) -> None:
        self.target = target
        self._control: TritonControl | None = None

    async def check(self, path: Path, sample: Mapping[str, np.ndarray]) -> Verdict:
        if self._control is None:  # made in the event loop that uses it
            self._control = self.target.control()
        return await check_model(self._control, path, sample, prefix="aimass-compression-check")

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None


def triton_checker(env: Mapping[str, str] | None = None) -> TritonChecker | None:
    """The checker for the configured Triton; None when none is configured."""
    target = TritonTarget.from_env(env, COMPRESSION_PREFIX) or TritonTarget.from_env(env)
    return TritonChecker(target) if target is not None else None
