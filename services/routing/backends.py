"""Where inferences run: a Triton server over gRPC, or ONNX Runtime inside the router.

Both answer the same calls: ``check`` (health), ``load``/``unload`` (an entry
per model version), ``index`` (what is loaded) and ``call`` (one
ModelInferRequest as bytes in, ModelInferResponse bytes out), so the router
treats them alike.

- :class:`TritonBackend`: model control (load, unload, repository index,
  ServerLive/ServerReady) from :class:`aimass.core.triton.control.TritonControl`
  (tritonclient's gRPC aio client, shared with compression's Triton check), and
  inference through a raw ``ModelInfer`` call on one pooled channel per server,
  passing the request bytes through without parsing them.
- :class:`InProcessBackend`: ONNX Runtime sessions in this process, for
  stacks without Triton; requests are parsed here, inference runs in a thread.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from aimass.common.v1 import common_pb2
from aimass.core.errors import AimassError, FailedPrecondition, NotFound
from aimass.core.settings import S3Settings
from aimass.core.triton.control import TritonControl
from aimass.core.triton.pybackend import OnnxBatchRunner
from aimass.core.triton.repository import (
    TRITON_VERSION,
    Backend,
    ModelRepository,
    ServingOptions,
    Signature,
)
from aimass.core.triton.s3_repository import S3ModelRepository, open_model_repository
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.wire import datatype_of, numpy_to_raw, tensor_to_numpy

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Server label choosing the repository backend: "python" (nvidia-pytriton) or "onnxruntime".
BACKEND_LABEL = "aimass.io/backend"
# Connections to each Triton for inference (requests are spread round-robin).
CHANNELS = 2


class UpstreamError(AimassError):
    """A server's own error status, passed on with its code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect fast after a server comes back: ejection lasts about a second.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


class TritonBackend(TritonControl):
    """One Triton server: model control (shared, :class:`TritonControl`), inference as bytes."""

    def __init__(
        self,
        address: str,
        repository: ModelRepository | S3ModelRepository | None,
        max_message_bytes: int,
        channels: int = CHANNELS,
    ) -> None:
        super().__init__(address, repository)
        # Several connections, not one: a local subchannel pool per channel keeps
        # gRPC from folding them onto one shared HTTP/2 connection.
        self.channels = [
            grpc.aio.insecure_channel(
                address,
                options=[
                    *channel_options(max_message_bytes),
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            for _ in range(max(channels, 1))
        ]
        self._infers = [c.unary_unary(INFER_METHOD) for c in self.channels]
        self._next = 0

    async def close(self) -> None:
        await super().close()
        for channel in self.channels:
            await channel.close()

    async def call(
        self,
        model: str,
        request: bytes,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> bytes:
        """One inference; ``request`` already names the model (fields 1 and 2 appended)."""
        self._next = (self._next + 1) % len(self._infers)
        try:
            return await self._infers[self._next](request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise UpstreamError(err.code(), f"{model}: {err.details()}") from err


class InProcessBackend:
    """ONNX Runtime sessions inside the routing service (no Triton on this stack)."""

    address = ""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self.runners: dict[str, OnnxBatchRunner] = {}

    async def close(self) -> None:
        self.runners.clear()

    async def check(self, timeout_s: float) -> tuple[str, str]:
        return "READY", ""

    async def load(
        self,
        name: str,
        model_file: Path,
        signature: Signature,
        options: ServingOptions,
        marker: dict[str, Any],
    ) -> int:
        try:
            runner = await asyncio.to_thread(OnnxBatchRunner, model_file, threads=self.threads)
        except Exception as err:
            raise FailedPrecondition(f"ONNX Runtime could not load {name}: {err}") from err
        self.runners[name] = runner
        return runner_size(model_file)

    async def unload(self, name: str) -> None:
        self.runners.pop(name, None)

    async def index(self) -> dict[str, str]:
        return dict.fromkeys(self.runners, "READY")

    def managed(self) -> dict[str, dict[str, Any]]:
        return {}

    async def call(
        self,
        model: str,
        request: bytes,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> bytes:
        runner = self.runners.get(model)
        if runner is None:
            raise NotFound(f"model {model} is not loaded")
        parsed = pb.PredictRequest.FromString(request)
        raw = list(parsed.raw_input_contents)
        feed = {
            tensor.name: tensor_to_numpy(tensor, raw[i] if raw else None)
            for i, tensor in enumerate(parsed.inputs)
        }
        started = time.monotonic()
        try:
            outputs = await asyncio.wait_for(asyncio.to_thread(runner.run, feed), timeout_s)
        except TimeoutError as err:
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{model}: no answer within {time.monotonic() - started:.3f} s",
            ) from err
        except Exception as err:
            raise UpstreamError(grpc.StatusCode.INTERNAL, f"{model}: {err}") from err
        wanted = [o.name for o in parsed.outputs] or list(outputs)
        response = pb.PredictResponse(deployment=model, model_version=TRITON_VERSION, id=parsed.id)
        for name in wanted:
            if name not in outputs:
                raise UpstreamError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"outputs: {model} has no output {name!r}"
                )
            value = outputs[name]
            response.outputs.append(
                common_pb2.InferTensor(name=name, datatype=datatype_of(value), shape=value.shape)
            )
            response.raw_output_contents.append(numpy_to_raw(value))
        return response.SerializeToString()


def make_backend(
    server: pb.InferenceServer,
    backend: Backend,
    max_message_bytes: int,
    s3: S3Settings | None = None,
) -> TritonBackend | InProcessBackend:
    """The backend of a server; an ``s3://`` repository is written with ``s3`` settings."""
    if server.kind == pb.SERVER_KIND_ONNXRUNTIME_IN_PROCESS:
        return InProcessBackend()
    backend = Backend(server.labels.get(BACKEND_LABEL, backend.value))
    repository = open_model_repository(server.model_repository_uri, backend, s3)
    return TritonBackend(server.grpc_address, repository, max_message_bytes)


def runner_size(model_file: Path) -> int:
    """Bytes of a model file, counted against a server's memory budget."""
    return model_file.stat().st_size
