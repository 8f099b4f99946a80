"""Ingest through the gRPC API: versions, splits, determinism, stratification, dedupe, events."""

from __future__ import annotations

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2 as pb
from aimass.events.v1 import events_pb2
from tests.data.conftest import DataService, EventLog, write_csv

TRAIN, VALID, TEST = (
    common_pb2.DATASET_SPLIT_TRAIN,
    common_pb2.DATASET_SPLIT_VALID,
    common_pb2.DATASET_SPLIT_TEST,
)


async def test_csv_ingest_makes_a_ready_version_with_exact_splits(data: DataService) -> None:
    write_csv(data.root / "d.csv", 103)
    await data.create("d", data_path=str(data.root / "d.csv"), label_column="label",
                      splitting={"train": 70, "valid": 15, "test": 15}, seed=3)  # fmt: skip
    job = await data.ingest("d")
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    version = await data.stub.GetDatasetVersion(
        pb.GetDatasetVersionRequest(name=job.dataset_version)
    )
    assert version.state == pb.DATASET_VERSION_STATE_READY
    # 103 * (.70, .15, .15) = 72.1, 15.45, 15.45 -> 72, 15, 15 and the one left goes to
    # the largest remainder, ties in train, valid, test order: valid.
    assert [s.row_count for s in version.splits] == [72, 16, 15]
    assert version.total_rows == 103
    assert [c.name for c in version.schema] == ["x", "y", "label"]
    assert version.schema[2].role == pb.COLUMN_ROLE_LABEL
    assert {lc.label: lc.count for lc in version.label_distribution} == {
        "c0": 35,
        "c1": 34,
        "c2": 34,
    }
    stats = {s.column: s for s in version.column_statistics}
    assert stats["x"].min == 0
    assert stats["x"].max == 102
    assert stats["x"].distinct_count == 103
    rows = 0
    for split in (TRAIN, VALID, TEST):
        rows += (await data.read(job.dataset_version, split)).num_rows
    assert rows == 103
    train_x = set((await data.read(job.dataset_version, TRAIN)).column("x").to_pylist())
    test_x = set((await data.read(job.dataset_version, TEST)).column("x").to_pylist())
    assert not train_x & test_x


async def test_same_input_and_seed_give_byte_identical_splits(data: DataService) -> None:
    write_csv(data.root / "a.csv", 200)
    (data.root / "b.csv").write_bytes((data.root / "a.csv").read_bytes())
    await data.create("a", data_path="a.csv", label_column="label", seed=11)
    await data.create("b", data_path=str(data.root / "b.csv"), label_column="label", seed=11)
    await data.create("c", data_path="a.csv", label_column="label", seed=12)
    a, b, c = [await data.ingest(n) for n in ("a", "b", "c")]
    va, vb, vc = [
        await data.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=j.dataset_version))
        for j in (a, b, c)
    ]
    assert va.fingerprint == vb.fingerprint != vc.fingerprint
    assert [s.artifact.sha256 for s in va.splits] == [s.artifact.sha256 for s in vb.splits]
    assert [s.artifact.sha256 for s in va.splits] != [s.artifact.sha256 for s in vc.splits]


async def test_stratified_splits_keep_the_label_distribution(data: DataService) -> None:
    lines = ["v,label"] + [f"{i},{'rare' if i % 10 == 0 else 'common'}" for i in range(200)]
    (data.root / "s.csv").write_text("\n".join(lines) + "\n")
    await data.create("s", data_path="s.csv", label_column="label", stratify=True,
                      splitting={"train": 50, "valid": 25, "test": 25})  # fmt: skip
    job = await data.ingest("s")
    version = await data.stub.GetDatasetVersion(
        pb.GetDatasetVersionRequest(name=job.dataset_version)
    )
    per_split = [{lc.label: lc.count for lc in s.label_distribution} for s in version.splits]
    assert per_split == [
        {"common": 90, "rare": 10},
        {"common": 45, "rare": 5},
        {"common": 45, "rare": 5},
    ]


async def test_unchanged_data_is_a_cache_hit_without_new_storage(
    data: DataService, data_events: EventLog
) -> None:
    write_csv(data.root / "d.csv", 50)
    await data.create("d", data_path="d.csv", label_column="label")
    first = await data.ingest("d")
    files = data.stored_files()
    second = await data.ingest("d")
    assert second.cache_hit
    assert second.dataset_version == first.dataset_version
    assert data.stored_files() == files
    listed = await data.stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(parent="datasets/d"))
    assert [v.version for v in listed.dataset_versions] == [1]
    forced = await data.ingest("d", force=True)
    assert forced.dataset_version == "datasets/d/versions/2"
    assert data.stored_files() == files
    await data_events.wait_for(
        lambda es: len([e for e in es if e.topic == "aimass.data.version.ready"]) == 2
    )
    ready = events_pb2.DatasetVersionReady()
    next(e for e in data_events.envelopes if e.topic == "aimass.data.version.ready").payload.Unpack(
        ready
    )
    assert ready.dataset_version == first.dataset_version
    assert sum(ready.split_rows.values()) == 50


async def test_watch_streams_progress_until_the_end(data: DataService) -> None:
    write_csv(data.root / "d.csv", 30)
    await data.create("d", data_path="d.csv", label_column="label")
    job = await data.stub.IngestDataset(pb.IngestDatasetRequest(name="datasets/d"))
    events = [e async for e in data.stub.WatchIngestJob(pb.WatchIngestJobRequest(name=job.name))]
    states = [e.status.state for e in events]
    assert states[0] == common_pb2.JOB_STATE_QUEUED
    assert states[-1] == common_pb2.JOB_STATE_SUCCEEDED
    assert events[-1].status.progress.completed == 30
    assert events[-1].status.progress.unit == "rows"
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})


async def test_read_split_projects_columns_and_pages(data: DataService) -> None:
    write_csv(data.root / "d.csv", 100)
    await data.create("d", data_path="d.csv", label_column="label", splitting={"train": 100})
    job = await data.ingest("d")
    table = await data.read(job.dataset_version, columns=["label", "x"], batch_size=7)
    assert table.column_names == ["label", "x"]
    assert table.num_rows == 100
    part = await data.read(job.dataset_version, start_row=10, row_limit=5, batch_size=3)
    assert part.column("x").to_pylist() == table.column("x").to_pylist()[10:15]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await data.read(job.dataset_version, columns=["nope"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in err.value.details()
