"""The Node.js client (clients/typescript/test/stack.test.ts over the code buf.gen.yaml
generates, compiled by tsc, run by Node 20) calls the secured services over gRPC with an API
key: lists datasets, reads a model version, runs a Predict against a deployment on the
routing service's in-process ONNX Runtime backend (compared with the Python SDK's answer
to 1e-6), and is refused without a key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2, data_pb2_grpc
from aimass.registry.v1 import registry_pb2 as rpb
from aimass.routing.v1 import routing_pb2_grpc
from aimass.serving.endpoint import Endpoint
from tests.fixtures.buf_templates import write_template
from tests.fixtures.stack import serve_service
from tests.gateway.conftest import key_metadata
from tests.gateway.onnx_mlp import IN_FEATURES, deploy_ready, mlp_onnx, register_onnx

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "node_modules" / ".bin"
TS_ROOT = ROOT / "clients" / "typescript"
COPIED = ("test/stack.test.ts", "examples/subscribe_events.ts")


async def _run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    return process.returncode or 0, output.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def compiled(tmp_path_factory) -> Path:
    """The generated client, the test and the example compiled by tsc (strict) into one
    folder; returns it."""
    if not (BIN / "tsc").exists() or shutil.which("node") is None:
        pytest.fail("Node 20 and `npm ci` are needed (make test runs npm ci)")
    work = tmp_path_factory.mktemp("typescript")
    # Only the TypeScript plugins: the others need Debian's protoc plugins (tests/clients).
    template = write_template("typescript", work / "template")
    code, output = await _run(
        str(BIN / "buf"), "generate", "--template", str(template), "-o", str(work)
    )
    assert code == 0, output
    sources = work / "clients" / "typescript"
    for relative in COPIED:
        (sources / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TS_ROOT / relative, sources / relative)
    # Node resolves packages by walking up from the compiled files; ESM by "type".
    (work / "node_modules").symlink_to(ROOT / "node_modules")
    (work / "package.json").write_text('{"type": "module"}')
    out = work / "out"
    code, output = await _run(
        str(BIN / "tsc"), "--strict", "--skipLibCheck", "--target", "es2022",
        "--module", "nodenext", "--moduleResolution", "nodenext", "--types", "node",
        "--rootDir", str(sources), "--outDir", str(out),
        *(str(p) for p in sources.rglob("*.ts")),
    )  # fmt: skip
    assert code == 0, output
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(secured) -> tuple[str, str]:
    """The routing service on the secured stack (no Triton: the in-process ONNX Runtime
    backend) with a small MLP deployed; returns its address and the deployment's name."""
    async with serve_service("routing", secured.settings) as (running, ctx):
        await ctx.resources["router"].ready.wait()
        metadata = key_metadata(secured.admin_key)
        version = await register_onnx(secured.registry(), "node-mlp", mlp_onnx(), metadata)
        address = f"127.0.0.1:{running.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            routing = routing_pb2_grpc.RoutingServiceStub(channel)
            name = await deploy_ready(routing, "node-mlp", version, metadata)
        yield address, name


async def python_sdk_predict(secured, address: str, deployment: str, batch: np.ndarray):
    """The Python SDK's Endpoint with the admin key (no Triton here: it goes through the
    router, which checks the key)."""
    async with Endpoint(address, deployment, api_key=secured.admin_key) as endpoint:
        prediction = await endpoint.predict({"input": batch})
    assert endpoint.router_calls == 1
    return prediction.model_version, prediction.outputs


async def test_node_client_lists_datasets_reads_a_model_version_and_predicts(
    secured, compiled, deployment, tmp_path
):
    metadata = key_metadata(secured.admin_key)
    # Float32 values, so the JSON handed to Node holds them exactly.
    batch = np.random.default_rng(7).normal(size=(4, IN_FEATURES)).astype(np.float32)
    data = data_pb2_grpc.DataServiceStub(secured.stack.channel("data"))
    csv = secured.settings.home / "data" / "node.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("x,label\n1,0\n2,1\n")
    await data.CreateDataset(
        data_pb2.CreateDatasetRequest(
            dataset_id="for-node",
            dataset=data_pb2.Dataset(
                config=data_pb2.DatasetConfig(data_path=str(csv), label_column="label")
            ),
        ),
        metadata=metadata,
    )
    registry = secured.registry()
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="for-node"), metadata=metadata
    )
    payload = b"onnx bytes for node"
    digest = hashlib.sha256(payload).hexdigest()

    async def parts():
        header = rpb.UploadArtifactHeader(kind="onnx", sha256=digest, size_bytes=len(payload))
        yield rpb.UploadArtifactRequest(header=header)
        yield rpb.UploadArtifactRequest(chunk=common_pb2.ByteChunk(offset=0, data=payload))

    artifact = await registry.UploadArtifact(parts(), metadata=metadata)
    version = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(
            parent="models/for-node", model_version=rpb.ModelVersion(artifacts=[artifact])
        ),
        metadata=metadata,
    )
    env = {
        **os.environ,
        "AIMASS_API_KEY": secured.admin_key,
        "AIMASS_DATA_ADDRESS": secured.stack.address("data"),
        "AIMASS_REGISTRY_ADDRESS": secured.stack.address("registry"),
        "AIMASS_EXPECT_DATASET": "datasets/for-node",
        "AIMASS_EXPECT_VERSION": version.name,
        "AIMASS_EXPECT_SHA256": digest,
        "AIMASS_ROUTING_ADDRESS": deployment[0],
        "AIMASS_PREDICT_DEPLOYMENT": deployment[1],
        "AIMASS_PREDICT_INPUT": json.dumps(batch.tolist()),
        "AIMASS_PREDICT_OUT": str(tmp_path / "node-predict.json"),
    }
    code, output = await _run("node", "--test", str(compiled / "test" / "stack.test.js"), env=env)
    assert code == 0, output
    assert "# pass 5" in output, output
    node = json.loads((tmp_path / "node-predict.json").read_text())
    python_version, python_outputs = await python_sdk_predict(
        secured, deployment[0], deployment[1], batch
    )
    assert node["modelVersion"] == python_version == "models/node-mlp/versions/1"
    assert node["name"] == "logits"
    node_logits = np.asarray(node["values"], np.float32).reshape(node["shape"])
    assert node_logits.shape == python_outputs["logits"].shape == (len(batch), 3)
    np.testing.assert_allclose(node_logits, python_outputs["logits"], rtol=0, atol=1e-6)


async def test_node_event_subscriber_replays_from_a_point_in_time(secured, compiled):
    metadata = key_metadata(secured.admin_key)
    registry = secured.registry()
    since = datetime.now(UTC).isoformat()
    await registry.CreateRegisteredModel(
        rpb.CreateRegisteredModelRequest(registered_model_id="node-events"), metadata=metadata
    )
    version = await registry.CreateModelVersion(
        rpb.CreateModelVersionRequest(
            parent="models/node-events", model_version=rpb.ModelVersion()
        ),
        metadata=metadata,
    )
    env = {
        **os.environ,
        "AIMASS_NATS_URL": secured.settings.nats_url,
        "AIMASS_TOPIC": "aimass.registry.version.*",
        "AIMASS_SINCE": since,
        "AIMASS_IDLE_MS": "3000",
    }
    example = compiled / "examples" / "subscribe_events.js"
    seen: list[dict] = []
    deadline = asyncio.get_running_loop().time() + 30
    while not any(e["subject"] == version.name for e in seen):
        # The outbox relay publishes after the commit: run again until the event is there.
        assert asyncio.get_running_loop().time() < deadline, seen
        code, output = await _run("node", str(example), env=env)
        assert code == 0, output
        seen = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    event = next(e for e in seen if e["subject"] == version.name)
    assert event["topic"] == "aimass.registry.version.created"
    assert event["type"] == "aimass.events.v1.ModelVersionCreated"
    assert all(e["topic"].startswith("aimass.registry.version.") for e in seen)
