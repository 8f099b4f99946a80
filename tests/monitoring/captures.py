"""Captured calls built from real PredictRequest/PredictResponse bytes, for the unit tests."""

from __future__ import annotations

import numpy as np

from aimass.common.v1 import common_pb2
from aimass.routing.prediction_log import Captured
from aimass.routing.v1 import routing_pb2 as pb


def request_bytes(batch: np.ndarray) -> bytes:
    return pb.PredictRequest(
        deployment="deployments/d",
        inputs=[common_pb2.InferTensor(name="input", datatype="FP32", shape=list(batch.shape))],
        raw_input_contents=[batch.astype(np.float32).tobytes()],
    ).SerializeToString()


def response_bytes(output: np.ndarray) -> bytes:
    return pb.PredictResponse(
        outputs=[common_pb2.InferTensor(name="logits", datatype="FP32", shape=list(output.shape))],
        raw_output_contents=[output.astype(np.float32).tobytes()],
    ).SerializeToString()


def call(batch: np.ndarray, output: np.ndarray | None, t: float, code: str = "OK") -> Captured:
    return Captured(
        time=t,
        request_id=f"r{t}",
        model_version="models/m/versions/1",
        latency_s=0.002,
        code=code,
        request=request_bytes(batch),
        response=None if output is None else response_bytes(output),
    )
