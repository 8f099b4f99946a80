"""Client side of aimass serving: the fast path that calls Triton directly.

    async with Endpoint("127.0.0.1:7106", "digits") as endpoint:
        prediction = await endpoint.predict({"input": batch})
        prediction.outputs["logits"], prediction.model_version

See :mod:`aimass.serving.endpoint`.
"""

from aimass.serving.endpoint import Endpoint, Prediction, encode_request

__all__ = ["Endpoint", "Prediction", "encode_request"]
