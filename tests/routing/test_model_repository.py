"""The Triton model-repository writer and the python-backend logic, without Triton."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from aimass.core.errors import FailedPrecondition, InvalidArgument
from aimass.core.triton.s3_repository import S3ModelRepository, parse_s3_repository
from aimass.routing.pybackend import OnnxBatchRunner
from aimass.routing.repository import (
    Backend,
    ModelRepository,
    ServingOptions,
    Signature,
    TensorInfo,
    render_config,
    signature_from_onnx,
    triton_model_name,
)
from tests.routing.conftest import reference

SIGNATURE = Signature(
    (TensorInfo("input", "FP32", (-1, 8)),), (TensorInfo("logits", "FP32", (-1, 3)),)
)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, models) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    path.write_bytes(models["a"][0])
    return path


def test_config_carries_signature_batching_and_instances():
    options = ServingOptions(
        max_batch_size=32,
        dynamic_batching=True,
        max_queue_delay_us=250,
        preferred_batch_sizes=(8, 16, 64),
        instance_count=2,
        instance_kind="CPU",
    )
    text = render_config("digits-v3", SIGNATURE, options, Backend.ONNXRUNTIME)
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 32" in text
    # The batch axis is Triton's, not part of dims.
    assert "dims: [ 8 ]" in text
    assert "dims: [ 3 ]" in text
    assert "max_queue_delay_microseconds: 250" in text
    assert "preferred_batch_size: [ 8, 16 ]" in text  # 64 is over max_batch_size
    assert "count: 2" in text
    assert "kind: KIND_CPU" in text
    python = render_config("digits-v3", SIGNATURE, ServingOptions(), Backend.PYTHON)
    assert 'backend: "python"' in python
    assert "max_batch_size: 0" in python
    assert "dims: [ -1, 8 ]" in python
    assert "dynamic_batching" not in python
    assert "aimass_site_packages" in python
    if sys.prefix != sys.base_prefix:
        assert f'"{sys.prefix}"' in python


def test_batching_needs_a_variable_batch_axis():
    fixed = Signature((TensorInfo("input", "FP32", (4, 8)),), SIGNATURE.outputs)
    with pytest.raises(FailedPrecondition, match="variable first"):
        render_config("m-v1", fixed, ServingOptions(max_batch_size=8), Backend.PYTHON)


def test_model_names():
    assert triton_model_name("models/digits/versions/12") == "digits-v12"
    with pytest.raises(InvalidArgument, match="model_version"):
        triton_model_name("digits:12")


def test_entries_are_written_whole_and_only_ours_are_removed(tmp_path, onnx_file):
    repository = ModelRepository(tmp_path / "repo", Backend.PYTHON)
    marker = {"model_version": "models/digits/versions/1"}
    size = repository.write("digits-v1", onnx_file, SIGNATURE, ServingOptions(), marker)
    entry = tmp_path / "repo" / "digits-v1"
    assert size == onnx_file.stat().st_size
    assert sorted(p.name for p in (entry / "1").iterdir()) == ["model.onnx", "model.py"]
    assert json.loads((entry / "aimass.json").read_text()) == marker
    # Rewriting replaces the entry; no staging folder is left behind.
    repository.write("digits-v1", onnx_file, SIGNATURE, ServingOptions(max_batch_size=4), marker)
    assert "max_batch_size: 4" in (entry / "config.pbtxt").read_text()
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["digits-v1"]
    foreign = tmp_path / "repo" / "someone-else"
    foreign.mkdir()
    assert list(repository.managed()) == ["digits-v1"]
    repository.remove("someone-else")
    repository.remove("digits-v1")
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["someone-else"]


@pytest.mark.parametrize(
    ("uri", "endpoint", "bucket", "prefix"),
    [
        ("s3://models/triton/repo", None, "models", "triton/repo"),
        ("s3://models", None, "models", ""),
        ("s3://minio:9000/models/repo", "http://minio:9000", "models", "repo"),
        ("s3://https://s3.example.com:443/models/", "https://s3.example.com:443", "models", ""),
    ],
)
def test_s3_repository_spellings(uri, endpoint, bucket, prefix):
    location = parse_s3_repository(uri)
    assert (location.endpoint_url, location.bucket, location.prefix) == (endpoint, bucket, prefix)


@pytest.mark.parametrize(
    "uri", ["s3://Models/x", "s3://minio:9000/Models/x", "s3://minio:port/models", "s3://b/a%20b"]
)
def test_s3_repository_spellings_triton_cannot_read_are_refused(uri):
    with pytest.raises(InvalidArgument, match="model_repository_uri"):
        parse_s3_repository(uri)


def test_s3_entries_are_uploaded_whole_and_only_ours_are_removed(s3_server, s3_bucket, onnx_file):
    client = s3_server.client
    endpoint = s3_server.endpoint_url.removeprefix("http://")
    repository = S3ModelRepository(f"s3://{endpoint}/{s3_bucket}/repo", Backend.PYTHON)

    def keys() -> list[str]:
        listed = client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        return sorted(item["Key"] for item in listed)

    marker = {"model_version": "models/digits/versions/1"}
    size = repository.write("digits-v1", onnx_file, SIGNATURE, ServingOptions(), marker)
    assert size == onnx_file.stat().st_size
    entry = ["1/model.onnx", "1/model.py", "aimass.json", "config.pbtxt"]
    assert keys() == ["repo/.aimass-repository", *(f"repo/digits-v1/{k}" for k in entry)]
    # The onnxruntime backend has no model.py: replacing the entry drops the stale file.
    onnx_backend = S3ModelRepository(f"s3://{endpoint}/{s3_bucket}/repo", Backend.ONNXRUNTIME)
    onnx_backend.write("digits-v1", onnx_file, SIGNATURE, ServingOptions(max_batch_size=4), marker)
    assert "repo/digits-v1/1/model.py" not in keys()
    config = client.get_object(Bucket=s3_bucket, Key="repo/digits-v1/config.pbtxt")["Body"].read()
    assert b"max_batch_size: 4" in config
    client.put_object(Bucket=s3_bucket, Key="repo/someone-else/config.pbtxt", Body=b"")
    assert repository.managed() == {"digits-v1": marker}
    repository.remove("someone-else")
    repository.remove("digits-v1")
    assert keys() == ["repo/.aimass-repository", "repo/someone-else/config.pbtxt"]


def test_failed_s3_upload_leaves_no_half_entry(s3_server, s3_bucket, onnx_file):
    class FailingOnConfig:
        """The real client, except that the upload of config.pbtxt fails (S3 went away)."""

        def __getattr__(self, name):
            return getattr(s3_server.client, name)

        def upload_file(self, path, bucket, key):
            if key.endswith("config.pbtxt"):
                raise ConnectionError("connection reset")
            return s3_server.client.upload_file(path, bucket, key)

    repository = S3ModelRepository(
        f"s3://{s3_bucket}/repo", Backend.PYTHON, client=FailingOnConfig()
    )
    with pytest.raises(ConnectionError):
        repository.write("digits-v1", onnx_file, SIGNATURE, ServingOptions(), {"a": 1})
    listed = s3_server.client.list_objects_v2(Bucket=s3_bucket, Prefix="repo/digits-v1/")
    assert listed.get("Contents", []) == []
    assert repository.managed() == {}


def test_signature_read_from_onnx(onnx_file):
    assert signature_from_onnx(onnx_file) == SIGNATURE


def test_runner_batches_requests_and_splits_results(onnx_file, models):
    runner = OnnxBatchRunner(onnx_file)
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.random((n, 8), dtype=np.float32)} for n in (1, 3, 2)]
    results = runner.run_batch(feeds)
    for feed, result in zip(feeds, results, strict=True):
        np.testing.assert_allclose(
            result["logits"], reference(models["a"][1], feed["input"]), atol=1e-5
        )


def test_runner_fails_only_the_bad_request(onnx_file):
    runner = OnnxBatchRunner(onnx_file)
    good = {"input": np.ones((1, 8), np.float32)}
    results = runner.run_batch([good, {"input": np.ones((1, 5), np.float32)}, {}, good])
    assert isinstance(results[0], dict)
    assert isinstance(results[3], dict)
    assert isinstance(results[1], Exception)
    assert isinstance(results[2], ValueError)
    assert "missing input" in str(results[2])
