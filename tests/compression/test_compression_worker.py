"""``aimass worker compression``: a process that only consumes the compression queue runs a
job created while no compression service is up, with the service's runner (Triton check
included: skipped here, and said so)."""

from __future__ import annotations

import asyncio

from aimass.compression import store as st
from aimass.compression.api import create_job
from aimass.compression.v1 import compression_pb2 as pb
from aimass.compression.worker import parse_args, serve
from aimass.core.db.engine import Database
from aimass.core.db.migrate import upgrade
from aimass.data.v1 import data_pb2_grpc
from aimass.registry.v1 import registry_pb2_grpc
from tests.compression.conftest import MLP, Env, digits
from tests.fixtures.stack import serve_stack, stack_settings


async def test_standalone_worker_runs_a_queued_job(tmp_path, nats_url) -> None:
    db_url = f"sqlite:///{tmp_path / 'aimass.db'}"
    upgrade(db_url)
    root = tmp_path / "data"
    root.mkdir()
    settings = stack_settings(tmp_path / "home", db_url, nats_url, data_roots=[root])
    database = Database(db_url)
    stop = asyncio.Event()
    async with serve_stack(settings, ["data", "registry"]) as stack:
        env = Env(stack, root, data_pb2_grpc.DataServiceStub(stack.channel("data")),
                  registry_pb2_grpc.RegistryServiceStub(stack.channel("registry")),
                  None)  # type: ignore[arg-type]  # fmt: skip
        dataset = await digits(env)
        parent = await env.train_and_register("digits-mlp", dataset, MLP, epochs=2, tmp=tmp_path)
        recipe = pb.Recipe(steps=[pb.CompressionStep(quantize_dynamic=pb.QuantizeDynamic())])
        job = create_job(database, pb.CompressionJob(parent_version=parent.name, recipe=recipe),
                         "test", "worker-test", None)  # fmt: skip
        worker = asyncio.create_task(serve(parse_args([]), settings, stop))
        try:
            state = await wait_terminal(database, job.name.removeprefix("compressionJobs/"))
        finally:
            stop.set()
            await worker
        with database.session(read_only=True) as session:
            done = st.job_to_proto(st.get_job(session, job.name.removeprefix("compressionJobs/")))
    database.dispose()
    assert state == "SUCCEEDED", done.status.reason
    assert done.chosen_step == "int8-dynamic"
    assert done.model_version.startswith("models/digits-mlp/versions/")
    assert done.triton_check == "skipped (no Triton configured)"
    # No evaluation service on this stack: the job's own figure, labelled as such.
    assert done.before_after.source.startswith("compression job (onnxruntime on the check rows)")
    assert "UNAVAILABLE" in done.before_after.source
    assert done.before_after.metric == "accuracy"
    assert 0.5 < done.before_after.after <= 1.0


async def wait_terminal(database: Database, job_id: str) -> str:
    for _ in range(1200):
        with database.session(read_only=True) as session:
            state = st.get_job(session, job_id).state
        if state in st.TERMINAL:
            return state
        await asyncio.sleep(0.1)
    return state  # still running after two minutes: the assertion shows it
