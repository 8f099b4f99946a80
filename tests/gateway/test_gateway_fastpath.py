"""The gateway's direct dict <-> protobuf conversion gives what json_format gives, or declines.

Whatever the fast path answers must equal json_format's result on the same input; where it
declines (None), build_request / response_json run json_format, so errors are unchanged.
"""

from __future__ import annotations

import base64

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from aimass.common.v1 import common_pb2
from aimass.gateway import fastpath
from aimass.gateway.fastpath import dict_from_message, message_from_dict
from aimass.routing.v1 import routing_pb2

names = st.text(max_size=12)
shapes = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4)
tensors = st.builds(common_pb2.InferTensor, name=names, datatype=names, shape=shapes)
raw = st.lists(st.binary(max_size=40), max_size=3)


@st.composite
def predict_requests(draw: st.DrawFn) -> routing_pb2.PredictRequest:
    return routing_pb2.PredictRequest(
        deployment=draw(names),
        model_version=draw(names),
        id=draw(names),
        inputs=draw(st.lists(tensors, max_size=3)),
        raw_input_contents=draw(raw),
        routing_key=draw(names),
    )


@st.composite
def predict_responses(draw: st.DrawFn) -> routing_pb2.PredictResponse:
    return routing_pb2.PredictResponse(
        deployment=draw(names),
        model_version=draw(names),
        outputs=draw(st.lists(tensors, max_size=3)),
        raw_output_contents=draw(raw),
    )


@settings(max_examples=200, deadline=None)
@given(predict_requests())
def test_request_from_dict_equals_parse_dict(message: routing_pb2.PredictRequest) -> None:
    document = json_format.MessageToDict(message)
    built = message_from_dict(routing_pb2.PredictRequest, document)
    assert built == json_format.ParseDict(document, routing_pb2.PredictRequest())
    assert built == message


@settings(max_examples=200, deadline=None)
@given(predict_responses())
def test_dict_from_response_equals_message_to_dict(message: routing_pb2.PredictResponse) -> None:
    document = dict_from_message(message)
    expected = json_format.MessageToDict(message)
    assert document == expected
    # Same keys in the same order: the JSON text is the same too.
    assert list(document) == list(expected)


@pytest.mark.parametrize(
    "document",
    [
        {"rawInputContents": ["AAE"]},  # unpadded
        {"rawInputContents": ["-_8="]},  # URL-safe alphabet
        {"rawInputContents": ["AA==AA=="]},  # data after padding
        {"rawInputContents": [None]},
        {"inputs": [{"shape": ["+4"]}]},  # int() takes these, json_format decides
        {"inputs": [{"shape": ["4 "]}]},
        {"inputs": [{"shape": ["4_0"]}]},
        {"inputs": [{"shape": ["99999999999999999999"]}]},
        {"inputs": [{"shape": [2**64]}]},  # out of range
        {"inputs": [{"shape": [1.0]}]},
        {"inputs": [{"shape": [True]}]},
        {"inputs": [{"contents": {"fp32Contents": [1.5]}}]},  # floats: json_format's
        {"parameters": {"k": {"boolParam": True}}},  # maps
        {"routing_key": "a", "routingKey": "b"},  # both spellings
        {"deployment": None},
        {"deployment": 3},
        {"unknown": 1},
        {"inputs": {"name": "x"}},
        {"id": "\ud800"},  # a lone surrogate protobuf refuses
    ],
)
def test_request_declines_what_json_format_must_decide(document: dict) -> None:
    assert message_from_dict(routing_pb2.PredictRequest, document) is None


def test_request_accepts_proto_and_json_names() -> None:
    data = bytes(range(7))
    document = {
        "deployment": "deployments/d",
        "routing_key": "user",
        "raw_input_contents": [base64.b64encode(data).decode()],
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, "7"]}],
    }
    built = message_from_dict(routing_pb2.PredictRequest, document)
    assert built == json_format.ParseDict(document, routing_pb2.PredictRequest())
    assert built.raw_input_contents == [data]


def test_oneof_with_two_members_is_left_to_json_format() -> None:
    both = {"response": {}, "error": {}}
    assert message_from_dict(routing_pb2.PredictResult, both) is None
    one = {"error": {}}
    built = message_from_dict(routing_pb2.PredictResult, one)
    assert built == json_format.ParseDict(one, routing_pb2.PredictResult())
    assert built.WhichOneof("result") == "error"


def test_response_with_a_map_or_floats_is_left_to_json_format() -> None:
    with_map = routing_pb2.PredictResponse(deployment="deployments/d")
    with_map.parameters["k"].bool_param = True
    assert dict_from_message(with_map) is None
    with_floats = routing_pb2.PredictResponse(
        outputs=[common_pb2.InferTensor(contents=common_pb2.InferTensorContents(fp32_contents=[1]))]
    )
    assert dict_from_message(with_floats) is None


def test_nesting_past_the_depth_limit_is_left_to_json_format(monkeypatch) -> None:
    document = {"inputs": [{"name": "x"}]}
    assert message_from_dict(routing_pb2.PredictRequest, document) is not None
    monkeypatch.setattr(fastpath, "_MAX_DEPTH", 0)
    assert message_from_dict(routing_pb2.PredictRequest, document) is None
