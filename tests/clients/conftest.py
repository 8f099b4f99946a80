"""Toolchains and generated code for the native clients (Go, Java, C++).

- ``require(tool, ...)``: the tools a language needs, found on PATH; missing ones
  skip the test with the reason (and the Debian packages to install), except
  under CI, where they fail: .ci/run installs them, so a CI run must not pass
  by skipping a language.
- ``generate(language, into)``: runs buf with the plugins of buf.gen.yaml that
  write clients/<language>/gen, into a scratch folder; returns that gen folder.
- ``run(*command)``: a subprocess awaited without blocking the event loop, so
  the in-process services of the test keep answering the client it runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures.buf_templates import write_template

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
# What .ci/run installs (apt-get), named in skip messages.
DEBIAN_PACKAGES = {
    "cpp": "protobuf-compiler protobuf-compiler-grpc libgrpc++-dev libprotobuf-dev pkg-config g++",
    "go": "protobuf-compiler golang-go golang-google-grpc-dev golang-google-protobuf-dev "
    "golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc",
    "java": "protobuf-compiler protobuf-compiler-grpc-java-plugin default-jdk-headless "
    "libgrpc-java libprotobuf-java libnetty-java libperfmark-java "
    "libgeronimo-annotation-1.3-spec-java",
}


def require(language: str, *tools: str, files: tuple[Path, ...] = ()) -> None:
    """Skip (locally) or fail (CI=true) unless every tool and file is there."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    missing += [str(path) for path in files if not path.exists()]
    if not BUF.exists():
        missing.append(f"{BUF} (npm ci)")
    if not missing:
        return
    reason = (
        f"{language} client toolchain missing: {', '.join(missing)} "
        f"(apt-get install {DEBIAN_PACKAGES[language]})"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


async def run(
    *command: str | Path,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> tuple[int, str]:
    """Exit status and combined output of ``command``."""
    process = await asyncio.create_subprocess_exec(
        *(str(part) for part in command),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


async def generate(language: str, into: Path) -> Path:
    """The client of ``language`` generated from protos/ under ``into``; its gen folder."""
    template = await asyncio.to_thread(write_template, language, into)
    code, output = await run(BUF, "generate", "--template", template, "-o", into)
    assert code == 0, output
    gen = into / "clients" / language / "gen"
    assert gen.is_dir(), output
    return gen
