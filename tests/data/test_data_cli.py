"""``aimass data ...`` end to end against a running data service (the CLI runs in a worker
thread, so the service keeps serving on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aimass.cli.data import data_app
from tests.data.conftest import DataService, write_csv

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


async def run(data: DataService, *args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(
        CliRunner().invoke, data_app, [*args, "--address", data.stub_target]
    )
    return result.exit_code, result.output


async def test_data_cli_ingests_lists_and_shows(data: DataService, tmp_path: Path) -> None:
    write_csv(data.root / "d.csv", 80)
    config = tmp_path / "my_data.yaml"
    config.write_text(
        "data_path: d.csv\nlabel_column: label\nsplitting: {train: 50, valid: 25, test: 25}\n"
    )

    code, out = await run(data, "ingest", str(config))
    assert code == 0, out
    assert "datasets/my-data/versions/1" in out
    code, out = await run(data, "ingest", str(config))
    assert code == 0, out
    assert "unchanged" in out

    code, out = await run(data, "list", "--json")
    assert code == 0, out
    assert [d["name"] for d in json.loads(out)["datasets"]] == ["datasets/my-data"]
    code, out = await run(data, "versions", "my-data", "--json")
    assert [v["version"] for v in json.loads(out)["dataset_versions"]] == ["1"]
    code, out = await run(data, "show", "datasets/my-data/versions/1", "--json")
    assert code == 0, out
    assert [s["row_count"] for s in json.loads(out)["splits"]] == ["40", "20", "20"]
    code, out = await run(data, "show", "datasets/my-data/versions/1")
    assert code == 0, out
    assert "DATASET_SPLIT_TRAIN" in out
    assert "label" in out


async def test_data_cli_reports_failures(data: DataService, tmp_path: Path) -> None:
    (data.root / "bad.csv").write_text("a,b\n1,2\n3\n")
    config = tmp_path / "bad.yaml"
    config.write_text("data_path: bad.csv\n")
    code, out = await run(data, "ingest", str(config))
    assert code == 1
    assert "FAILED" in out
    assert "line 3" in out

    config.write_text("data_path: bad.csv\nsplitting: {train: 50, valid: 10, test: 10}\n")
    code, out = await run(data, "ingest", str(config))
    assert code == 2
    assert "splitting" in out
    assert "sum to 100" in out

    code, out = await run(data, "show", "datasets/nope/versions/1")
    assert code == 1
    assert "NOT_FOUND" in out
