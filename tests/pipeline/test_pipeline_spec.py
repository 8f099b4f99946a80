"""Pipeline files: YAML -> PipelineSpec with short enum names; every error names its key."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from aimass.core.errors import InvalidArgument
from aimass.pipeline import spec as specs
from aimass.pipeline.v1 import pipeline_pb2 as pb
from tests.pipeline.conftest import Env

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pipelines"
MINIMAL = {
    "dataset": {"name": "d", "data_path": "d.csv", "label_column": "y"},
    "model": {"name": "m", "mlp": {"hidden_sizes": [8]}},
}


def with_(**sections: object) -> dict[str, object]:
    return {**MINIMAL, **sections}


@pytest.mark.parametrize("name", ["digits.yaml", "breast_cancer.yaml"])
def test_examples_load(name: str) -> None:
    spec = specs.load_yaml(EXAMPLES / name)
    assert spec.model.spec.WhichOneof("architecture") == "mlp"
    assert spec.model.training.optimizer.type != 0  # "adam" was expanded
    assert spec.HasField("evaluation")
    assert spec.HasField("deploy")
    # The CSV is not beside the file: the path stays relative, for the data folder.
    assert not Path(spec.dataset.config.data_path).is_absolute()


def test_digits_example_runs_every_stage() -> None:
    spec = specs.load_yaml(EXAMPLES / "digits.yaml")
    assert all(runs for _, runs in specs.planned_stages(spec))
    assert spec.compression.recipe.steps[0].WhichOneof("method") == "quantize_dynamic"


def test_short_enum_names_and_splitting() -> None:
    spec = specs.from_dict(
        with_(
            dataset={"name": "d", "data_path": "d.csv", "format": "csv",
                     "splitting": {"train": 60, "valid": 20, "test": 20}},
            training={"optimizer": {"type": "AdamW"}, "schedule": {"type": "cosine"}},
            release={"alias": "staging", "target": "trained"},
        )
    )  # fmt: skip
    assert spec.dataset.config.split.valid_percent == 20
    assert spec.model.training.optimizer.type > 0
    assert spec.release.target == pb.RELEASE_TARGET_TRAINED


def test_data_path_beside_the_file_is_made_absolute(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,y\n1,0\n")
    path = tmp_path / "p.yaml"
    path.write_text("dataset: {name: d, data_path: d.csv}\nmodel: {name: m, mlp: {}}\n")
    assert specs.load_yaml(path).dataset.config.data_path == str(tmp_path / "d.csv")


def test_existing_versions_skip_ingest_and_training() -> None:
    spec = specs.from_dict({
        "dataset": {"name": "d", "version": "datasets/d/versions/2"},
        "model": {"name": "m", "version": "models/m/versions/1"},
        "evaluation": {},
    })  # fmt: skip
    assert [runs for _, runs in specs.planned_stages(spec)][:3] == [False, False, True]


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ([], "spec", "mapping"),
        ({"model": MINIMAL["model"]}, "dataset", "required"),
        (with_(deploi={"deployment": "x"}), "deploi", "unknown section"),
        (with_(dataset={"name": "D_bad", "data_path": "d.csv"}), "spec.dataset.dataset", "lower"),
        (with_(dataset={"name": "d"}), "spec.dataset", "needs a source"),
        (with_(dataset={"name": "d", "version": "v1"}), "spec.dataset.dataset_version", "must be"),
        (with_(model={"name": "m"}), "spec.model.spec", "no architecture"),
        (with_(model={"name": "m", "mlp": {"widths": [3]}}), "model", "widths"),
        (with_(training={"optimizer": {"type": "sgdd"}}), "training", "sgdd"),
        (with_(compression={"steps": []}), "spec.compression.recipe.steps", "at least one"),
        (with_(release={"alias": ""}), "spec.release.alias", "required"),
        (with_(deploy={"deployment": "Bad Name"}), "spec.deploy.deployment", "lower"),
        (with_(dataset={"name": "d", "data_path": "d", "splitting": {"tran": 1}}),
         "dataset.splitting.tran", "unknown split"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_key(data: object, field: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        specs.from_dict(data)
    violation = caught.value.violations[0]
    assert violation.field == field
    assert problem in violation.description


async def test_service_refuses_bad_runs_and_writes_nothing(env: Env) -> None:
    good = env.spec()
    bad_spec = pb.PipelineSpec()
    bad_spec.CopyFrom(good)
    bad_spec.model.ClearField("spec")
    cases = [
        (pb.CreatePipelineRunRequest(), "pipeline_run"),
        (pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=bad_spec)),
         "pipeline_run.spec.model.spec"),
        (pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=good),
                                     pipeline_run_id="Not_An_Id"), "pipeline_run_id"),
    ]  # fmt: skip
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.pipeline.CreatePipelineRun(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()
    for name in ("pipelineRuns/nope", "runs/x"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await env.pipeline.GetPipelineRun(pb.GetPipelineRunRequest(name=name))
        assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.pipeline.ListPipelineRuns(pb.ListPipelineRunsRequest(filter="model=x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # validate_only checks and writes nothing; nothing was written by the refusals either.
    preview = await env.pipeline.CreatePipelineRun(
        pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=good), validate_only=True)
    )
    assert preview.name.startswith("pipelineRuns/cancer-mlp-")
    listed = await env.pipeline.ListPipelineRuns(pb.ListPipelineRunsRequest())
    assert list(listed.pipeline_runs) == []
    # A retried create with the same request id returns the first run.
    first = await env.pipeline.CreatePipelineRun(
        pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=good), request_id="r-1")
    )
    again = await env.pipeline.CreatePipelineRun(
        pb.CreatePipelineRunRequest(pipeline_run=pb.PipelineRun(spec=good), request_id="r-1")
    )
    assert again.name == first.name
    cancelled = await env.pipeline.CancelPipelineRun(pb.CancelPipelineRunRequest(name=first.name))
    assert cancelled.state == pb.RUN_STATE_CANCELLED
