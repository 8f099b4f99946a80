"""Requests the RPC fuzzer (tests/fuzz) found answered with INTERNAL, now refused cleanly,
and names its boundary strings showed were accepted though malformed."""

from __future__ import annotations

import grpc
import pytest

from aimass.compression import store as st
from aimass.compression.v1 import compression_pb2 as pb
from aimass.core.errors import InvalidArgument
from tests.compression.conftest import MLP, Env, digits


async def test_unknown_calibration_split_is_an_invalid_argument(env: Env, tmp_path) -> None:
    # Proto3 enums are open: an unknown split number reached DatasetSplit.Name and raised.
    dataset = await digits(env)
    parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=1, tmp=tmp_path)
    step = pb.CompressionStep(quantize_static=pb.QuantizeStatic(calibration_split=-7))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.compression.CreateCompressionJob(
            pb.CreateCompressionJobRequest(
                compression_job=pb.CompressionJob(
                    parent_version=parent.name, recipe=pb.Recipe(steps=[step])
                )
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compression_job.recipe.steps[0].quantize_static.calibration_split" in (
        caught.value.details()
    )
    listed = await env.compression.ListCompressionJobs(pb.ListCompressionJobsRequest())
    assert not listed.compression_jobs


@pytest.mark.parametrize(
    ("check", "name"),
    [
        (st.check_version_name, "models/digits-mlp/versions/1\n"),
        (st.check_model_name, "models/digits-mlp\n"),
        (st.check_dataset_version, "datasets/digits/versions/1\n"),
        (st.parse_policy_name, "models/digits-mlp/compressionPolicies/int8\n"),
    ],
)
def test_names_with_a_trailing_newline_are_refused(check, name: str) -> None:
    # re.match with "$" also matched before a final newline: such names were accepted.
    with pytest.raises(InvalidArgument):
        check(name, "field")
