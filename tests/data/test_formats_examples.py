"""The bundled scikit-learn examples (CSV and image folder), NPZ and JSONL, and the torch helper."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from aimass.common.v1 import common_pb2
from aimass.core.splits import read_split, split_dataloader
from aimass.data import config as cfg
from aimass.data import examples
from aimass.data.v1 import data_pb2 as pb
from tests.data.conftest import DataService

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "datasets"


async def ingest_yaml(data: DataService, name: str, yaml_file: str) -> pb.DatasetVersion:
    config = cfg.load_yaml(EXAMPLES / yaml_file)
    await data.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(config=config), dataset_id=name)
    )
    job = await data.ingest(name)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.reason
    return await data.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=job.dataset_version))


async def test_bundled_examples_build_digits_and_breast_cancer(data: DataService) -> None:
    await asyncio.to_thread(examples.materialise, data.root)
    images = await ingest_yaml(data, "digits-images", "digits_images.yaml")
    assert images.total_rows == 1797
    assert images.schema[0].type == "fixed_size_list<item: uint8>[64]"
    assert len(images.label_distribution) == 10
    csv = await ingest_yaml(data, "digits", "digits_csv.yaml")
    assert csv.total_rows == 1797
    assert len(csv.schema) == 65
    cancer = await ingest_yaml(data, "breast-cancer", "breast_cancer.yaml")
    assert cancer.total_rows == 569
    assert {lc.label: lc.count for lc in cancer.label_distribution} == {"0": 212, "1": 357}

    table = await asyncio.to_thread(
        read_split, data.stub_target, images.name, "train", ("image", "label")
    )
    loader = split_dataloader(table, "label", batch_size=32)
    features, labels = next(iter(loader))
    assert tuple(features.shape) == (32, 64)
    assert labels.dtype.is_floating_point is False


async def test_npz_and_jsonl_sources(data: DataService) -> None:
    rng = np.random.default_rng(0)
    np.savez(data.root / "a.npz", x=rng.random((40, 2, 3)), y=np.arange(40) % 2)
    (data.root / "b.jsonl").write_text(
        "".join(f'{{"v": {i}, "k": "{i % 2}"}}\n' for i in range(40))
    )
    await data.create("a", data_path="a.npz")
    await data.create("b", data_path="b.jsonl", label_column="k")
    a, b = await data.ingest("a"), await data.ingest("b")
    assert a.status.state == b.status.state == common_pb2.JOB_STATE_SUCCEEDED
    va = await data.stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=a.dataset_version))
    assert [c.type for c in va.schema] == ["fixed_size_list<item: double>[6]", "int64"]
    assert va.schema[1].role == pb.COLUMN_ROLE_LABEL
    (data.root / "c.jsonl").write_text('{"v": 1}\n{"v": 2\n')
    await data.create("c", data_path="c.jsonl")
    c = await data.ingest("c")
    assert c.status.state == common_pb2.JOB_STATE_FAILED
    assert "line 2" in c.status.reason


def test_converted_split_files_are_plain_parquet(tmp_path: Path) -> None:
    from aimass.data import converters

    source = tmp_path / "s.csv"
    source.write_text("a,b\n1,x\n2,y\n")
    out = tmp_path / "o.parquet"
    done = converters.convert(source, "csv", pb.DatasetConfig(), out, lambda b, r: None)
    assert done.rows == 2
    assert pq.read_table(out).column("b").to_pylist() == ["x", "y"]
