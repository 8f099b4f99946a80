"""Every bad input of the issue: a status or FAILED job naming the problem, nothing half-made."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from aimass.common.v1 import common_pb2
from aimass.core.db import models as m
from aimass.core.errors import InvalidArgument
from aimass.data import config as cfg
from aimass.data.v1 import data_pb2 as pb
from tests.data.conftest import DataService, EventLog, write_csv


async def assert_failed_cleanly(data: DataService, dataset_id: str, *needles: str) -> None:
    job = await data.ingest(dataset_id)
    assert job.status.state == common_pb2.JOB_STATE_FAILED
    for needle in needles:
        assert needle in job.status.reason, job.status.reason
    assert data.count(m.DatasetVersion) == 0
    assert data.stored_files() == []


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("a,b,c\n1,2,3\n4,5,6\n7,8\n9,1,2\n", "line 4"),
        ('a,b\n1,2\n3,"unterminated\n5,6\n', "line 3"),
    ],
    ids=["ragged", "bad-quote"],
)
async def test_malformed_csv_names_the_line(data: DataService, content: str, line: str) -> None:
    (data.root / "bad.csv").write_text(content)
    await data.create("bad", data_path="bad.csv")
    await assert_failed_cleanly(data, "bad", "bad.csv", line)


async def test_missing_label_column_is_named(data: DataService, data_events: EventLog) -> None:
    write_csv(data.root / "d.csv", 20)
    await data.create("d", data_path="d.csv", label_column="target")
    await assert_failed_cleanly(data, "d", "label_column", "'target'", "x, y, label")
    await data_events.wait_for(lambda es: any(e.topic == "aimass.data.version.failed" for e in es))


async def test_empty_file_is_refused(data: DataService) -> None:
    (data.root / "empty.csv").write_bytes(b"")
    await data.create("e", data_path="empty.csv")
    await assert_failed_cleanly(data, "e", "empty")


async def test_a_split_left_empty_is_refused(data: DataService) -> None:
    write_csv(data.root / "tiny.csv", 5)
    await data.create("t", data_path="tiny.csv", splitting={"train": 90, "valid": 5, "test": 5})
    await assert_failed_cleanly(data, "t", "splitting.", "empty")


@pytest.mark.parametrize("path", ["../outside.csv", "sub/../../outside.csv", "/etc/passwd"])
async def test_paths_outside_the_data_roots_are_refused(data: DataService, path: str) -> None:
    (data.root.parent / "outside.csv").write_text("a\n1\n")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await data.create("o", data_path=path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.config.data_path" in err.value.details()
    assert data.count(m.Dataset) == 0


async def test_a_duplicate_name_is_refused(data: DataService) -> None:
    write_csv(data.root / "d.csv", 20)
    await data.create("d", data_path="d.csv")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await data.create("d", data_path="d.csv")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert data.count(m.Dataset) == 1


async def test_bad_config_is_refused_before_anything_is_stored(data: DataService) -> None:
    write_csv(data.root / "d.csv", 20)
    bad = pb.DatasetConfig(
        data_path="d.csv", split=pb.SplitRatios(train_percent=80, valid_percent=30)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await data.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset=pb.Dataset(config=bad), dataset_id="d")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset.config.splitting" in err.value.details()
    assert "100" in err.value.details()
    assert data.count(m.Dataset) == 0


@pytest.mark.parametrize(
    ("yaml_like", "key"),
    [
        ({"data_path": "d.csv", "splitting": {"train": 50, "valid": 10, "test": 10}}, "splitting"),
        ({"data_path": "d.csv", "format": "xlsx"}, "format"),
        ({"data_path": "d.csv", "stratify": True}, "stratify"),
        ({"data_path": "d.csv", "spliting": {}}, "spliting"),
        ({"label_column": "y"}, "data_path"),
        ({"data_path": "d.csv", "seed": "x"}, "seed"),
        ({"data_path": "d.csv", "splitting": {"train": 80, "dev": 20}}, "splitting.dev"),
    ],
)
def test_config_errors_name_the_key(yaml_like: dict, key: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        cfg.from_dict(yaml_like)
    assert key in err.value.message


def test_yaml_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "data_path: d.csv\nlabel_column: y\nsplitting: {train: 60, valid: 20, test: 20}\n"
        "seed: 4\nstratify: true\nshuffle: false\ncsv: {delimiter: ';'}\n"
    )
    config = cfg.load_yaml(path)
    assert cfg.split_percents(config) == (60, 20, 20)
    assert config.csv.delimiter == ";"
    assert not config.shuffle
    assert config.stratify
