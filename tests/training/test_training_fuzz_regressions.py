"""Requests the RPC fuzzer (tests/fuzz) found answered with INTERNAL, now refused cleanly.

Proto3 enums are open: any int32 arrives in an enum field, and naming an unknown number
raised ValueError inside the servicer.
"""

from __future__ import annotations

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.training.v1 import training_pb2 as tpb

UNKNOWN = -72023165
MLP = {"mlp": {"hidden_sizes": [16]}}
CONFIG = {"epochs": 1, "batch_size": 64}


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value


async def test_unknown_enum_numbers_are_invalid_arguments_naming_the_field(training_stack):
    ts = training_stack
    job = await ts.create(ts.job(MLP, CONFIG))

    err = await refused(
        ts.training.CompleteTrainingJob(
            tpb.CompleteTrainingJobRequest(name=job.name, state=UNKNOWN)
        )
    )
    assert err.details().startswith("state:"), err.details()
    err = await refused(
        ts.training.RegisterWorker(tpb.RegisterWorkerRequest(name="workers/w", state=UNKNOWN))
    )
    assert err.details().startswith("state:"), err.details()
    record = tpb.ProgressRecord(log_entry=tpb.LogEntry(message="x", stream=UNKNOWN))
    err = await refused(
        ts.training.ReportTrainingJobProgress(
            tpb.ReportTrainingJobProgressRequest(name=job.name, records=[record])
        )
    )
    assert "records[0].log_entry.stream" in err.details()

    # Nothing of them was kept: the job is still queued and no worker was registered.
    kept = await ts.training.GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name))
    assert kept.status.state == common_pb2.JOB_STATE_QUEUED
    assert not (await ts.training.ListWorkers(tpb.ListWorkersRequest())).workers
