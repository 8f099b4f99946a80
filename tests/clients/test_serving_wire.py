"""The SDK's tensor encoding (aimass.serving.encode_request / decode_response): KServe
datatypes, little-endian raw bytes whatever the array's byte order or layout."""

from __future__ import annotations

import numpy as np
import pytest

from aimass.routing.v1 import routing_pb2 as pb
from aimass.serving import encode_request
from aimass.serving.endpoint import decode_response


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        ("<f4", "FP32"),
        (">f4", "FP32"),
        ("<f8", "FP64"),
        (">i8", "INT64"),
        ("<i4", "INT32"),
        ("<u2", "UINT16"),
        ("u1", "UINT8"),
        ("?", "BOOL"),
        ("<f2", "FP16"),
    ],
)
def test_every_datatype_round_trips_as_little_endian_bytes(dtype: str, datatype: str):
    values = (np.arange(12) % 7).reshape(3, 4).astype(dtype)
    request = encode_request({"x": values}, request_id="r1", outputs=["y"])
    assert request.id == "r1"
    assert [o.name for o in request.outputs] == ["y"]
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [3, 4])
    little = values.astype(values.dtype.newbyteorder("<"))
    assert request.raw_input_contents[0] == little.tobytes()

    answer = pb.PredictResponse(
        outputs=request.inputs, raw_output_contents=request.raw_input_contents
    )
    decoded = decode_response(answer)["x"]
    assert decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, values)


def test_a_non_contiguous_array_is_sent_in_row_major_order():
    values = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view
    request = encode_request({"x": values})
    assert list(request.inputs[0].shape) == [4, 3]
    assert request.raw_input_contents[0] == np.ascontiguousarray(values).tobytes()


def test_a_dtype_without_a_kserve_datatype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"inputs\['text'\]: dtype <U1 has no KServe datatype"):
        encode_request({"text": np.array(["a", "b"])})
