"""A Triton server SIGKILLed under Predict load while a second one serves the same version.

Real processes: the registry, the router (``python -m aimass.routing``) and two Triton
servers of the nvidia-pytriton wheel. Client threads call Predict through the router
without pause; one Triton is killed. Every request is answered with the right output
(the router retries an UNAVAILABLE server on the other entry), the dead server leaves the
deployment's route table, and the figures are printed: time until it left, requests
answered across the crash, slowest answer while it happened.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from aimass.common.v1 import common_pb2
from aimass.core.db.migrate import upgrade
from aimass.core.triton_setup import pytriton_root
from aimass.registry.v1 import registry_pb2, registry_pb2_grpc
from aimass.routing.v1 import routing_pb2 as pb
from aimass.routing.v1 import routing_pb2_grpc
from tests.faults.procs import ServiceProcess, report, running, wait_until
from tests.fixtures.nats import NatsServer
from tests.fixtures.stack import free_port, stack_settings
from tests.routing.conftest import TritonProcess, make_onnx, output_of, predict_request, reference

pytestmark = pytest.mark.slow

CLIENTS = 4
LOCAL = "inferenceServers/local-triton"
SECOND = "inferenceServers/second"
DEPLOYMENT = "deployments/spread"


def register_version(stub: registry_pb2_grpc.RegistryServiceStub, data: bytes) -> str:
    stub.CreateRegisteredModel(
        registry_pb2.CreateRegisteredModelRequest(
            registered_model=registry_pb2.RegisteredModel(), registered_model_id="mlp"
        ),
        timeout=10,
    )
    header = registry_pb2.UploadArtifactHeader(
        kind="onnx",
        file_name="model.onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    artifact = stub.UploadArtifact(
        iter(
            [
                registry_pb2.UploadArtifactRequest(header=header),
                registry_pb2.UploadArtifactRequest(chunk=common_pb2.ByteChunk(data=data)),
            ]
        ),
        timeout=30,
    )
    version = stub.CreateModelVersion(
        registry_pb2.CreateModelVersionRequest(
            parent="models/mlp",
            model_version=registry_pb2.ModelVersion(artifacts=[artifact], framework="onnx"),
        ),
        timeout=10,
    )
    return version.name


def deploy_on_both(
    routing: routing_pb2_grpc.RoutingServiceStub, second: TritonProcess, version: str
) -> None:
    routing.CreateInferenceServer(
        pb.CreateInferenceServerRequest(
            inference_server_id="second",
            inference_server=pb.InferenceServer(
                grpc_address=second.grpc_address, model_repository_uri=str(second.repository)
            ),
        ),
        timeout=10,
    )
    config = pb.ServingConfig(
        max_batch_size=16,
        dynamic_batching=pb.DynamicBatching(max_queue_delay_microseconds=200),
        instance_kind=pb.INSTANCE_KIND_CPU,
        max_retries=1,
    )
    routing.CreateDeployment(
        pb.CreateDeploymentRequest(
            deployment_id="spread",
            deployment=pb.Deployment(
                routes=[pb.Route(model=version, weight_percent=100)],
                servers=[LOCAL, SECOND],
                serving_config=config,
            ),
        ),
        timeout=30,
    )
    wait_until(
        "the deployment READY on both servers",
        lambda: (
            routing.GetDeployment(pb.GetDeploymentRequest(name=DEPLOYMENT)).state
            == pb.DEPLOYMENT_STATE_READY
            and len(route_servers(routing)) == 2
        ),
        120,
    )


def inferences(server: TritonProcess) -> int:
    """Successful inference requests the Triton server has executed, over all models."""
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    return sum(
        int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
        for m in stats.get("model_stats", [])
    )


def route_servers(routing: routing_pb2_grpc.RoutingServiceStub) -> list[str]:
    table = routing.GetRouteTable(pb.GetRouteTableRequest(name=f"{DEPLOYMENT}/routeTable"))
    return sorted(entry.server for entry in table.entries)


class PredictLoad:
    """Client threads calling Predict through the router, checking every answer."""

    def __init__(self, address: str, batch: np.ndarray, want: np.ndarray) -> None:
        self.address, self.batch, self.want = address, batch, want
        self.stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []
        self.slowest_s = 0.0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def __enter__(self) -> PredictLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self) -> None:
        request = predict_request(DEPLOYMENT, self.batch)
        with grpc.insecure_channel(self.address) as channel:
            stub = routing_pb2_grpc.PredictionServiceStub(channel)
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    reply = stub.Predict(request, timeout=30)
                    np.testing.assert_allclose(output_of(reply), self.want, atol=1e-5)
                    failure = None
                except grpc.RpcError as err:
                    failure = f"{err.code().name}: {err.details()}"
                except AssertionError as err:
                    failure = f"wrong output: {err}"
                with self.lock:
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                    if failure is None:
                        self.answered += 1
                    else:
                        self.failures.append(failure)


def test_killed_triton_is_ejected_and_every_request_answered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    if pytriton_root() is None:
        pytest.skip("the nvidia-pytriton wheel (tritonserver) is not installed")
    home = tmp_path / "home"
    db_url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(db_url)
    settings = stack_settings(home, db_url, nats_server.url, max_message_mb=4)
    local = TritonProcess(tmp_path / "local" / "models", tmp_path / "local.log")
    second = TritonProcess(tmp_path / "second" / "models", tmp_path / "second.log")
    registry = ServiceProcess.service("registry", settings)
    router = ServiceProcess.service(
        "routing",
        settings,
        AIMASS_ROUTING_TRITON_GRPC=local.grpc_address,
        AIMASS_ROUTING_TRITON_REPOSITORY=str(local.repository),
        AIMASS_ROUTING_METRICS_PORT=str(free_port()),
        AIMASS_ROUTING_HEALTH_INTERVAL_S="0.3",
    )
    data, model = make_onnx(0)
    batch = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    try:
        local.start()
        second.start()
        with running(registry.start(wait=False), router.start(wait=False)):
            registry.wait_serving()
            router.wait_serving()
            with (
                grpc.insecure_channel(settings.service_address("registry")) as registry_channel,
                grpc.insecure_channel(settings.service_address("routing")) as routing_channel,
            ):
                version = register_version(
                    registry_pb2_grpc.RegistryServiceStub(registry_channel), data
                )
                routing = routing_pb2_grpc.RoutingServiceStub(routing_channel)
                deploy_on_both(routing, second, version)
                with PredictLoad(router.address, batch, reference(model, batch)) as load:  # type: ignore[arg-type]
                    wait_until("the load running", lambda: load.answered >= 50)
                    # Both servers take traffic, so the kill hits requests in flight.
                    wait_until("the second server answering", lambda: inferences(second) > 0)
                    answered_before = load.answered
                    assert second.process is not None
                    second.process.kill()  # SIGKILL
                    killed = time.monotonic()
                    ejected_s = wait_until(
                        "the dead server out of the route table",
                        lambda: route_servers(routing) == [LOCAL],
                        30,
                        interval_s=0.01,
                    )
                    # Keep the load on for a while after the ejection: still all answered.
                    answered_at_ejection = load.answered
                    wait_until(
                        "more answers after the ejection",
                        lambda: load.answered >= answered_at_ejection + 50,
                    )
                # The health loop (every 0.3 s) records the state the ejection acted on.
                wait_until(
                    "the dead server marked UNREACHABLE",
                    lambda: (
                        routing.GetInferenceServer(pb.GetInferenceServerRequest(name=SECOND)).state
                        == pb.SERVER_STATE_UNREACHABLE
                    ),
                    30,
                )
                unreachable_s = time.monotonic() - killed
                after = routing_pb2_grpc.PredictionServiceStub(routing_channel).Predict(
                    predict_request(DEPLOYMENT, batch), timeout=10
                )
                recovered_s = time.monotonic() - killed
    finally:
        second.stop()
        local.stop()

    assert load.failures == [], load.failures[:5]
    assert after.model_version == version
    report(
        f"Triton SIGKILLed under Predict load ({CLIENTS} clients, 2 servers)",
        left_route_table_after=ejected_s,
        marked_unreachable_after=unreachable_s,
        answered_across_crash=load.answered - answered_before,
        failed=len(load.failures),
        slowest_answer=load.slowest_s,
        serving_checked_after=recovered_s,
    )
