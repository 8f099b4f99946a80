"""``aimass models ...`` against a running registry (the CLI runs in a worker thread,
so the registry keeps serving on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aimass.cli.models import models_app
from aimass.common.v1 import common_pb2
from tests.registry.conftest import Registry


async def _run(registry: Registry, *args: str) -> tuple[int, str]:
    address = f"127.0.0.1:{registry.running.port}"
    result = await asyncio.to_thread(CliRunner().invoke, models_app, [*args, "--address", address])
    return result.exit_code, result.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_models_cli(registry: Registry, tmp_path: Path) -> None:
    await registry.create_model("digits", tags={"team": "vision"})
    artifact = await registry.upload(b"onnx bytes" * 1000, "onnx", "model.onnx")
    for accuracy in (0.9, 0.97):
        await registry.create_version(
            "digits",
            artifacts=[common_pb2.Artifact(kind="onnx", uri=artifact.uri, file_name="model.onnx")],
            metrics=[common_pb2.Metric(name="accuracy", value=accuracy)],
        )

    code, out = await _run(registry, "list", "--json")
    assert code == 0
    assert [m["name"] for m in json.loads(out)] == ["models/digits"]
    code, out = await _run(registry, "alias", "digits", "production", "2")
    assert code == 0
    assert "version 2" in out
    code, out = await _run(registry, "show", "digits", "--json")
    assert json.loads(out)["aliases"][0]["version"] == "2"
    code, out = await _run(
        registry, "versions", "digits", "--filter", "metrics.accuracy >= 0.95", "--json"
    )
    assert code == 0
    assert [v["version"] for v in json.loads(out)] == ["2"]
    code, out = await _run(registry, "versions", "digits")
    assert code == 0
    assert "accuracy=0.97" in out

    bundle = tmp_path / "digits-2.tar.gz"
    code, out = await _run(
        registry, "export", "digits", "2", "--release", "r1", "--out", str(bundle)
    )
    assert code == 0, out
    assert bundle.is_file()
    code, out = await _run(registry, "import", str(bundle), "--model", "digits-copy", "--json")
    assert code == 0, out
    imported = json.loads(out)
    assert imported["name"] == "models/digits-copy/versions/1"
    assert imported["source"]["imported_lineage"]["model_version"] == "models/digits/versions/2"

    code, out = await _run(registry, "alias", "digits", "production", "9")
    assert code == 1
    assert "NOT_FOUND" in out
    assert "versions/9" in out
    code, out = await _run(registry, "show", "Bad_Name")
    assert code == 1
    assert "INVALID_ARGUMENT" in out
