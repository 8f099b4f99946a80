"""Spec checks the RPC fuzzer's boundary strings showed too lenient.

``re.match`` with a trailing ``$`` also matches before a final newline, so ids such as
``"digits\\n"`` were accepted and stored as part of resource names.
"""

from __future__ import annotations

import pytest

from aimass.core.errors import InvalidArgument
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb


def spec(**changes: str) -> pb.PipelineSpec:
    values = {"dataset": "digits", "dataset_version": "datasets/digits/versions/1",
              "model": "digits-mlp", "model_version": "models/digits-mlp/versions/1"}  # fmt: skip
    values.update(changes)
    return pb.PipelineSpec(
        dataset=pb.DatasetSection(
            dataset=values["dataset"], dataset_version=values["dataset_version"]
        ),
        model=pb.ModelSection(model=values["model"], model_version=values["model_version"]),
    )


def test_the_valid_spec_passes() -> None:
    specs.validate(spec())


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("dataset", "spec.dataset.dataset"),
        ("dataset_version", "spec.dataset.dataset_version"),
        ("model", "spec.model.model"),
        ("model_version", "spec.model.model_version"),
    ],
)
def test_a_trailing_newline_is_refused(key: str, field: str) -> None:
    good = getattr(spec(), "dataset" if key.startswith("dataset") else "model")
    with pytest.raises(InvalidArgument) as caught:
        specs.validate(spec(**{key: getattr(good, key) + "\n"}))
    assert caught.value.violations[0].field == field
