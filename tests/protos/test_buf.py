"""The buf CLI guards the API: lint, the descriptor set Envoy's transcoder reads, and the
TypeScript client generated from buf.gen.yaml.

The tools come from npm (`npm install`, package.json). Without them these tests skip, except
under CI (CI set), where a missing tool is a failure: CI must never pass without linting.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.fixtures.buf_templates import write_template

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "node_modules" / ".bin"
BUF = BIN / "buf"
PROTOC_GEN_ES = BIN / "protoc-gen-es"
TSC = BIN / "tsc"

# The services whose files must document every element (buf's COMMENTS rules).
DOCUMENTED = ["data", "training", "evaluation", "compression", "routing"]


def require(tool: Path) -> Path:
    """The tool's path; skips when it is absent, unless under CI where that fails."""
    if tool.exists():
        return tool
    message = f"{tool.relative_to(ROOT)} is missing: run `npm install`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def aimass_protos() -> list[str]:
    root = ROOT / "protos"
    return sorted(str(p.relative_to(root)) for p in root.glob("aimass/*/v1/*.proto"))


def test_buf_lint_passes() -> None:
    assert_ok(run(require(BUF), "lint"))


def test_buf_build_writes_a_descriptor_set_with_every_service(tmp_path: Path) -> None:
    image = tmp_path / "aimass.binpb"
    assert_ok(run(require(BUF), "build", "-o", image))
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    names = {file.name for file in files}
    assert set(aimass_protos()) <= names
    # Imports travel along, so the set is self-contained for Envoy's transcoder.
    assert {"google/api/annotations.proto", "google/protobuf/empty.proto"} <= names
    services = {f"{file.package}.{s.name}" for file in files for s in file.service}
    assert {
        "aimass.data.v1.DataService",
        "aimass.training.v1.TrainingService",
        "aimass.evaluation.v1.EvaluationService",
        "aimass.compression.v1.CompressionService",
        "aimass.routing.v1.RoutingService",
        "aimass.routing.v1.PredictionService",
        "aimass.registry.v1.RegistryService",
    } <= services


def test_service_protos_document_every_element() -> None:
    """Every service, RPC, message, field, enum and enum value of the service APIs has a
    comment. The same rules find undocumented fields in registry.proto, so they can fail."""
    config = json.dumps(
        {
            "version": "v2",
            "modules": [
                {"path": "protos", "excludes": ["protos/third_party"]},
                {"path": "protos/third_party"},
            ],
            "lint": {"use": ["COMMENTS"], "ignore": ["protos/third_party"]},
        }
    )
    paths = [arg for name in DOCUMENTED for arg in ("--path", f"protos/aimass/{name}")]
    assert_ok(run(require(BUF), "lint", "--config", config, *paths))


def test_typescript_client_generates_and_typechecks(tmp_path: Path) -> None:
    buf, _ = require(BUF), require(PROTOC_GEN_ES)
    # Only the TypeScript plugins: the others need Debian's protoc plugins (tests/clients).
    template = write_template("typescript", tmp_path / "template")
    assert_ok(run(buf, "generate", "--template", str(template), "-o", tmp_path))
    out = tmp_path / "clients" / "typescript" / "gen"
    generated = sorted(str(p.relative_to(out)) for p in out.rglob("*_pb.ts"))
    expected = [p.removesuffix(".proto") + "_pb.ts" for p in aimass_protos()]
    assert set(expected) <= set(generated)
    assert "export const DataService" in (out / "aimass/data/v1/data_pb.ts").read_text()
    # tsc resolves @bufbuild/protobuf by walking up from the files to a node_modules folder.
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    sources = [str(p) for p in out.rglob("*.ts")]
    assert_ok(
        run(
            require(TSC),
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            *sources,
            timeout=300,
        )
    )
