"""Prometheus metrics of a real service: RPC counts by code, latency histogram, queue depth."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aimass.core.events import EventBus
from aimass.core.events.envelope import build_envelope
from aimass.core.events.jobs import subqueue_topic
from aimass.core.metrics import record_job_finished
from aimass.events.v1 import events_pb2
from aimass.registry.v1 import registry_pb2 as pb
from aimass.registry.v1 import registry_pb2_grpc
from tests.fixtures.stack import free_port, serve_stack, stack_settings


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(page: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` whose labels include ``labels`` (0 when absent)."""
    values = [
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(values) <= 1, values
    return values[0] if values else 0.0


async def test_rpc_counts_by_code_and_latency_are_exposed(
    tmp_path: Path, migrated_db_url: str, nats_url: str
) -> None:
    settings = stack_settings(tmp_path / "home", migrated_db_url, nats_url)
    port = free_port()
    method = {
        "grpc_service": "aimass.registry.v1.RegistryService",
        "grpc_method": "GetRegisteredModel",
    }
    async with serve_stack(settings, ["registry"]) as stack:
        stack.contexts["registry"].serve_metrics(port)
        before = await asyncio.to_thread(scrape, port)
        stub = registry_pb2_grpc.RegistryServiceStub(stack.channel("registry"))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        await stub.ListRegisteredModels(pb.ListRegisteredModelsRequest())
        page = await asyncio.to_thread(scrape, port)

    handled = "grpc_server_handled_total"
    gained = sample(page, handled, **method, grpc_code="NOT_FOUND") - sample(
        before, handled, **method, grpc_code="NOT_FOUND"
    )
    assert gained == 3
    assert sample(page, handled, grpc_method="ListRegisteredModels", grpc_code="OK") >= 1
    timed = sample(page, "grpc_server_handling_seconds_count", **method)
    assert timed - sample(before, "grpc_server_handling_seconds_count", **method) == 3


def test_finished_jobs_are_counted_by_kind_and_state() -> None:
    labels = {"kind": "metrics-test", "state": "FAILED"}
    before = sample(generate_latest(REGISTRY).decode(), "aimass_jobs_total", **labels)
    record_job_finished("metrics-test", "FAILED", 12.5)
    page = generate_latest(REGISTRY).decode()
    assert sample(page, "aimass_jobs_total", **labels) == before + 1
    assert sample(page, "aimass_job_duration_seconds_sum", **labels) >= 12.5


async def test_pending_jobs_counts_what_waits_before_and_after_a_worker_pulls(
    nats_url: str,
) -> None:
    bus = await EventBus.connect(nats_url, "metrics-test")
    try:
        await bus.ensure_streams()
        kind = "pendingtest"
        for n in range(3):
            payload = events_pb2.JobStateChanged(job=f"jobs/{n}")
            await bus.enqueue_job(kind, f"jobs/{n}", payload)
        assert await bus.pending_jobs(kind) == 3  # no worker has bound the queue yet
        queue = await bus.job_queue(kind)
        job = await queue.pull(timeout_s=5)
        assert job is not None
        assert await bus.pending_jobs(kind) == 2
        await job.ack()
        # Sub-queues (a resource class of workers) count too, bound or not.
        for n in range(2):
            topic = subqueue_topic(kind, "gpu")
            envelope = build_envelope(
                topic, events_pb2.JobStateChanged(), subject=f"jobs/g{n}", source="t"
            )
            await bus.publish_raw(topic, envelope.SerializeToString(), envelope.id)
        assert await bus.pending_jobs(kind) == 4
        gpu = await bus.job_queue(kind, subqueue="gpu")
        assert await bus.pending_jobs(kind) == 4  # bound, nothing pulled yet
        taken = await gpu.pull(timeout_s=5)
        assert taken is not None
        assert await bus.pending_jobs(kind) == 3
        await taken.ack()
    finally:
        await bus.close()
