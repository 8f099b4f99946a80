"""Model control and inference against one Triton server over gRPC (tritonclient's aio client).

:class:`TritonControl` writes an entry into the server's model repository
(:class:`~aimass.core.triton.repository.ModelRepository`, a local folder the
server reads) and asks the server to load it, unload it, say whether it is
ready, or run one inference with numpy arrays. A refusal becomes
:class:`~aimass.core.errors.FailedPrecondition` carrying Triton's own message.

Which Triton a process talks to comes from :class:`TritonTarget`, read from the
``AIMASS_ROUTING_TRITON_*`` variables the embedded stack gives every process
(``GRPC``, ``REPOSITORY``, ``BACKEND``), or given directly.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aimass.core.errors import FailedPrecondition
from aimass.core.triton.repository import (
    ONNX_TYPES,
    Backend,
    ModelRepository,
    ServingOptions,
    Signature,
)

ENV_PREFIX = "AIMASS_ROUTING_TRITON_"


@dataclass(frozen=True)
class TritonTarget:
    """A Triton server aimass may load models into: its gRPC address and repository folder."""

    grpc_address: str
    repository: Path | None
    backend: Backend = Backend.PYTHON

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX
    ) -> TritonTarget | None:
        """The configured Triton, or None when ``{prefix}GRPC`` is unset."""
        env = os.environ if env is None else env
        address = env.get(prefix + "GRPC", "")
        if not address:
            return None
        repository = env.get(prefix + "REPOSITORY", "")
        try:
            backend = Backend(env.get(prefix + "BACKEND", Backend.PYTHON.value))
        except ValueError as err:
            raise FailedPrecondition(f"{prefix}BACKEND: {err}") from err
        return cls(address, Path(repository) if repository else None, backend)

    def control(self) -> TritonControl:
        repository = ModelRepository(self.repository, self.backend) if self.repository else None
        return TritonControl(self.grpc_address, repository)


class TritonControl:
    """One Triton server: write entries, load, unload, readiness, numpy inference."""

    def __init__(self, address: str, repository: ModelRepository | None) -> None:
        import tritonclient.grpc.aio as triton_aio

        self.address = address
        self.repository = repository
        self.control = triton_aio.InferenceServerClient(address)

    async def close(self) -> None:
        await self.control.close()

    async def check(self, timeout_s: float) -> tuple[str, str]:
        """("READY" | "NOT_READY" | "UNREACHABLE", reason) from ServerLive and ServerReady."""
        from tritonclient.utils import InferenceServerException

        try:
            live = await self.control.is_server_live(client_timeout=timeout_s)
            ready = live and await self.control.is_server_ready(client_timeout=timeout_s)
        except InferenceServerException as err:
            return "UNREACHABLE", f"{self.address}: {err.message()}"
        if not live:
            return "UNREACHABLE", f"{self.address}: ServerLive is false"
        if not ready:
            return "NOT_READY", f"{self.address}: ServerReady is false"
        return "READY", ""

    async def load(
        self,
        name: str,
        model_file: Path,
        signature: Signature,
        options: ServingOptions,
        marker: dict[str, Any],
    ) -> int:
        """Writes the repository entry and loads it; returns the bytes of its model files."""
        from tritonclient.utils import InferenceServerException

        if self.repository is None:
            raise FailedPrecondition(
                f"{self.address}: the server has no local model repository aimass can write to"
            )
        size = await asyncio.to_thread(
            self.repository.write, name, model_file, signature, options, marker
        )
        try:
            await self.control.load_model(name)
        except InferenceServerException as err:
            raise FailedPrecondition(
                f"Triton at {self.address} refused to load {name}: {err.message()}"
            ) from err
        return size

    async def unload(self, name: str) -> None:
        """Unloads the model (absent is fine) and removes the entry aimass wrote."""
        from tritonclient.utils import InferenceServerException

        try:
            await self.control.unload_model(name)
        except InferenceServerException as err:
            if "not found" not in (err.message() or ""):
                raise FailedPrecondition(
                    f"Triton at {self.address} refused to unload {name}: {err.message()}"
                ) from err
        if self.repository is not None:
            await asyncio.to_thread(self.repository.remove, name)

    async def model_ready(self, name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self.control.is_model_ready(name))
        except InferenceServerException:
            return False

    async def index(self) -> dict[str, str]:
        """Triton's repository index: model name -> state ("READY", "UNAVAILABLE", ...)."""
        index = await self.control.get_model_repository_index(as_json=True)
        return {m["name"]: m.get("state", "") for m in index.get("models", [])}

    def managed(self) -> dict[str, dict[str, Any]]:
        return self.repository.managed() if self.repository is not None else {}

    async def infer(
        self, name: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One inference with numpy inputs; Triton's error becomes FailedPrecondition."""
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.utils import InferenceServerException

        inputs = []
        for input_name, value in feeds.items():
            tensor = triton_aio.InferInput(input_name, list(value.shape), _datatype(value))
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
            inputs.append(tensor)
        wanted = [triton_aio.InferRequestedOutput(o) for o in outputs]
        try:
            result = await self.control.infer(name, inputs, outputs=wanted)
        except InferenceServerException as err:
            raise FailedPrecondition(
                f"Triton at {self.address} failed an inference of {name}: {err.message()}"
            ) from err
        return {o: result.as_numpy(o) for o in outputs}


def _datatype(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    datatype = np_to_triton_dtype(value.dtype)
    if datatype is None or datatype not in ONNX_TYPES.values():
        raise FailedPrecondition(f"numpy dtype {value.dtype} has no Triton datatype")
    return datatype
