"""``aimass models import FILE --model NAME [--signature ...]`` for files made outside aimass
(the CLI runs in a worker thread so the registry keeps serving on the test's loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aimass.cli.models import models_app, parse_signature
from tests.byom.factories import make_mlp
from tests.byom.registry_fixture import byom_registry
from tests.registry.test_import_onnx import two_input_onnx

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["byom_registry"]


async def run_cli(registry, *args: str) -> tuple[int, str]:
    address = f"127.0.0.1:{registry.running.port}"
    result = await asyncio.to_thread(CliRunner().invoke, models_app, [*args, "--address", address])
    return result.exit_code, result.output


async def test_import_files_from_the_command_line(byom_registry, tmp_path: Path) -> None:
    onnx_file = tmp_path / "scorer.onnx"
    onnx_file.write_bytes(two_input_onnx())
    code, out = await run_cli(
        byom_registry,
        "import", str(onnx_file), "--model", "cli-onnx", "--tag", "origin=cli",
        "--config", '{"task": "regression"}',
    )  # fmt: skip
    assert code == 0, out
    assert "imported scorer.onnx as models/cli-onnx/versions/1" in out
    assert "tokens:INT64[-1, -1]" in out
    code, out = await run_cli(byom_registry, "versions", "cli-onnx", "--json")
    (listed,) = json.loads(out)
    assert listed["config"]["values"]["task"] == "regression"
    assert listed["tags"] == {"origin": "cli"}

    torch.manual_seed(0)
    script = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(make_mlp(4, 8, 2).eval()), str(script))
    code, out = await run_cli(
        byom_registry,
        "import", str(script), "--model", "cli-script",
        "--signature", "x:FP32:-1x4->logits", "--json",
    )  # fmt: skip
    assert code == 0, out
    version = json.loads(out)
    assert [a["kind"] for a in version["artifacts"]] == ["torchscript", "onnx"]
    assert version["signature"]["outputs"][0]["name"] == "logits"

    weights = tmp_path / "weights.pth"
    torch.save(make_mlp(4, 8, 2).state_dict(), weights)
    code, out = await run_cli(
        byom_registry,
        "import", str(weights), "--model", "cli-weights",
        "--factory", "tests.byom.factories:make_mlp",
        "--factory-kwargs", '{"in_features": 4, "hidden": 8, "out_features": 2}',
        "--signature", "x:FP32:-1x4", "--json",
    )  # fmt: skip
    assert code == 0, out
    assert [a["kind"] for a in json.loads(out)["artifacts"]] == ["state_dict", "onnx"]


async def test_command_line_refusals(byom_registry, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript archive")
    code, out = await run_cli(
        byom_registry, "import", str(broken), "--model", "cli-bad",
        "--format", "torchscript", "--signature", "x:FP32:-1x4",
    )  # fmt: skip
    assert code == 1
    assert "INVALID_ARGUMENT" in out
    assert "broken.pt is not a TorchScript file" in out

    code, out = await run_cli(
        byom_registry, "import", str(broken), "--model", "cli-bad", "--signature", "x:FP32"
    )
    assert code == 2
    assert "name:DATATYPE:DIMS" in out
    code, out = await run_cli(
        byom_registry, "import", str(broken), "--model", "cli-bad", "--format", "keras"
    )
    assert code == 2
    code, out = await run_cli(
        byom_registry, "import", str(broken), "--model", "cli-bad", "--config", "[1, 2]"
    )
    assert code == 2
    assert "--config must be a JSON object" in out
    code, out = await run_cli(byom_registry, "list", "--json")
    assert "cli-bad" not in out


async def test_parse_signature_inline_and_json(tmp_path: Path) -> None:
    parsed = parse_signature("input_ids:INT64:-1x-1, attention_mask:int64:-1x-1->embedding")
    assert [(t.name, t.datatype, list(t.shape)) for t in parsed.inputs] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    assert [t.name for t in parsed.outputs] == ["embedding"]
    path = tmp_path / "sig.json"
    path.write_text(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]}))
    assert parse_signature(str(path)).inputs[0].shape == [-1, 3]
