"""An inference server whose model repository is on S3: aimass uploads the entries (to moto's
S3 server), the real tritonserver of the nvidia-pytriton wheel loads them from S3 itself,
Predict goes through; a restarted router reconciles the S3 repository like a folder."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from aimass.core.service import start_service
from aimass.core.triton.s3_repository import PLACEHOLDER
from aimass.core.triton_setup import pytriton_root
from aimass.routing.main import build
from aimass.routing.v1 import routing_pb2 as pb
from tests.fixtures.s3 import S3Server
from tests.fixtures.stack import free_port
from tests.routing.conftest import TritonProcess, output_of, reference

pytestmark = pytest.mark.asyncio(loop_scope="module")
SERVER = "inferenceServers/s3-triton"
PREFIX = "triton/models"


@dataclasses.dataclass
class S3Triton:
    process: TritonProcess
    bucket: str
    # The repository as Triton and aimass both spell it: s3://host:port/bucket/prefix.
    uri: str
    client: object

    def keys(self, entry: str = "") -> list[str]:
        prefix = f"{PREFIX}/{entry}/" if entry else f"{PREFIX}/"
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[attr-defined]
        keys = (item["Key"][len(prefix) :] for item in listed.get("Contents", []))
        return sorted(k for k in keys if k != PLACEHOLDER)


@pytest.fixture(scope="module")
def s3_triton(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Triton]:
    """A tritonserver reading its repository from a bucket of the test S3 server."""
    if pytriton_root() is None:
        pytest.skip("the nvidia-pytriton wheel (tritonserver) is not installed")
    bucket = f"triton-{uuid.uuid4().hex[:12]}"
    s3_server.client.create_bucket(Bucket=bucket)
    # Triton starts only on a prefix that holds an object (aimass keeps this one there).
    s3_server.client.put_object(Bucket=bucket, Key=f"{PREFIX}/{PLACEHOLDER}", Body=b"")
    endpoint = s3_server.endpoint_url.removeprefix("http://")
    uri = f"s3://{endpoint}/{bucket}/{PREFIX}"
    base = tmp_path_factory.mktemp("s3-triton")
    # Triton takes the fake credentials from the AWS_* variables the s3 fixture set.
    process = TritonProcess(base / "unused", base / "triton.log", model_repository=uri)
    process.start()
    try:
        yield S3Triton(process, bucket, uri, s3_server.client)
    finally:
        process.stop()


async def index_of(triton: S3Triton) -> dict[str, str]:
    client = triton_aio.InferenceServerClient(triton.process.grpc_address)
    try:
        index = await client.get_model_repository_index(as_json=True)
    finally:
        await client.close()
    return {m["name"]: m.get("state", "") for m in index.get("models", [])}


async def entry_of(stack, deployment: str) -> str:
    request = pb.GetRouteTableRequest(name=f"{deployment}/routeTable")
    table = await stack.routing.GetRouteTable(request)
    (entry,) = {e.triton_model_name for e in table.entries}
    return entry


async def test_malformed_s3_repository_is_refused(stack):
    for uri in ("s3://127.0.0.1:9000/Bad_Bucket/x", "s3://bucket/a b"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.routing.CreateInferenceServer(
                pb.CreateInferenceServerRequest(
                    inference_server_id="bad-s3",
                    inference_server=pb.InferenceServer(
                        grpc_address="127.0.0.1:1", model_repository_uri=uri
                    ),
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inference_server.model_repository_uri" in caught.value.details()


async def test_deploy_onto_s3_repository_and_predict(stack, models, s3_triton):
    server = await stack.routing.CreateInferenceServer(
        pb.CreateInferenceServerRequest(
            inference_server_id="s3-triton",
            inference_server=pb.InferenceServer(
                grpc_address=s3_triton.process.grpc_address, model_repository_uri=s3_triton.uri
            ),
        )
    )
    assert server.state == pb.SERVER_STATE_READY
    version = await stack.register("digits", models["a"][0])
    await stack.deploy(
        "on-s3",
        [(version, 100)],
        servers=[SERVER],
        serving_config=pb.ServingConfig(
            max_batch_size=16, dynamic_batching=pb.DynamicBatching(max_queue_delay_microseconds=200)
        ),
    )
    entry = await entry_of(stack, "deployments/on-s3")
    # The whole entry is in the bucket, marked as aimass's; Triton loaded it from there.
    assert s3_triton.keys(entry) == ["1/model.onnx", "1/model.py", "aimass.json", "config.pbtxt"]
    marker = json.loads(
        s3_triton.client.get_object(  # type: ignore[attr-defined]
            Bucket=s3_triton.bucket, Key=f"{PREFIX}/{entry}/aimass.json"
        )["Body"].read()
    )
    assert marker["model_version"] == version
    assert (await index_of(s3_triton))[entry] == "READY"

    batch = np.random.default_rng(3).random((4, 8), dtype=np.float32)
    response = await stack.predict("deployments/on-s3", batch)
    assert response.model_version == version
    np.testing.assert_allclose(output_of(response), reference(models["a"][1], batch), atol=1e-5)


async def test_restart_reconciles_the_s3_repository(stack, s3_triton):
    """A new routing process loads what the deployment needs from S3 and removes (and
    unloads) an aimass entry in the bucket that no deployment needs."""
    needed = await entry_of(stack, "deployments/on-s3")
    ghost = "ghost-v1-00000000"
    for key in s3_triton.keys(needed):
        body = s3_triton.client.get_object(  # type: ignore[attr-defined]
            Bucket=s3_triton.bucket, Key=f"{PREFIX}/{needed}/{key}"
        )["Body"].read()
        if key == "config.pbtxt":
            body = body.replace(needed.encode(), ghost.encode())
        s3_triton.client.put_object(  # type: ignore[attr-defined]
            Bucket=s3_triton.bucket, Key=f"{PREFIX}/{ghost}/{key}", Body=body
        )
    client = triton_aio.InferenceServerClient(s3_triton.process.grpc_address)
    try:
        await client.unload_model(needed)
        await client.load_model(ghost)
        assert (await index_of(s3_triton))[ghost] == "READY"
        config = dataclasses.replace(stack.config, metrics_port=0)
        running, ctx = await start_service(
            "routing", functools.partial(build, config=config), stack.settings, port=free_port()
        )
        try:
            await asyncio.wait_for(ctx.resources["router"].ready.wait(), 120)
            index = await index_of(s3_triton)
            assert index[needed] == "READY"
            assert index.get(ghost) != "READY"
            assert s3_triton.keys(ghost) == []
        finally:
            await running.stop(0)
    finally:
        await client.close()


async def test_delete_unloads_and_removes_the_s3_entry(stack, s3_triton):
    entry = await entry_of(stack, "deployments/on-s3")
    await stack.routing.DeleteDeployment(pb.DeleteDeploymentRequest(name="deployments/on-s3"))
    for _ in range(200):
        if not s3_triton.keys(entry):
            break
        await asyncio.sleep(0.05)
    assert s3_triton.keys(entry) == []
    assert (await index_of(s3_triton)).get(entry) != "READY"
