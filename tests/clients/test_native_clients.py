"""The Go, Java and C++ clients: buf.gen.yaml generates each one from protos/, its example
(clients/<lang>/examples) is compiled against Debian's gRPC packages and run against a live
registry + routing stack (in-process ONNX Runtime backend): it lists the registered models
and its Predict returns the values the model computes; a deployment that does not exist
makes it fail with NOT_FOUND."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from tests.clients.conftest import ROOT, generate, require, run
from tests.routing.conftest import IN_FEATURES, models, reference, stack  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL_ID = "native-clients"
DEPLOYMENT = "deployments/native-clients"
JAVA_LIBS = Path("/usr/share/java")
# Compile time: the API, stubs and protobuf runtime.
JAVA_COMPILE = (
    "grpc-api",
    "grpc-stub",
    "grpc-protobuf",
    "grpc-protobuf-lite",
    "grpc-context",
    "protobuf",
    "guava",
    "geronimo-annotation-1.3-spec",
)
# Run time: the Netty transport too.
JAVA_RUNTIME = (
    *JAVA_COMPILE,
    "grpc-core",
    "grpc-netty",
    "perfmark-api",
    "netty-buffer",
    "netty-codec",
    "netty-codec-http",
    "netty-codec-http2",
    "netty-codec-socks",
    "netty-common",
    "netty-handler",
    "netty-handler-proxy",
    "netty-resolver",
    "netty-transport",
    "netty-transport-native-unix-common",
)


def java_classpath(names: tuple[str, ...]) -> str:
    return os.pathsep.join(str(JAVA_LIBS / f"{name}.jar") for name in names)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployed(stack, models) -> dict[str, object]:  # noqa: F811
    """A model version served by the in-process backend, and what its first row predicts."""
    version = await stack.register(MODEL_ID, models["a"][0])
    await stack.deploy(MODEL_ID, [(version, 100)])
    row = (np.arange(1, IN_FEATURES + 1, dtype=np.float32) * np.float32(0.1)).reshape(1, -1)
    return {
        "version": version,
        "expected": reference(models["a"][1], row).ravel(),
        "env": {
            **os.environ,
            "AIMASS_REGISTRY_ADDRESS": stack.settings.service_address("registry"),
            "AIMASS_ROUTING_ADDRESS": stack.routing_address,
        },
    }


async def check_example(command: list[str], deployed: dict[str, object]) -> None:
    """``command`` lists the model and predicts what the model computes; an unknown
    deployment fails with NOT_FOUND and a non-zero exit."""
    env = deployed["env"]
    code, output = await run(*command, DEPLOYMENT, "input", str(IN_FEATURES), env=env)
    assert code == 0, output
    assert f"model models/{MODEL_ID}" in output.splitlines(), output
    assert f"version={deployed['version']} output=logits shape=[1,3]" in output, output
    values = re.search(r"^values((?: \S+)+)$", output, re.MULTILINE)
    assert values, output
    got = np.array([float(v) for v in values.group(1).split()], np.float32)
    np.testing.assert_allclose(got, deployed["expected"], rtol=1e-4, atol=1e-4)

    code, output = await run(*command, "deployments/nowhere", env=env)
    assert code == 1, output
    # Each language names the status its own way: NOT_FOUND (Java), NotFound (Go), 5 (C++).
    assert re.search(r"NOT_FOUND|NotFound|code 5:", output), output


async def test_cpp_example_lists_models_and_predicts(deployed, tmp_path):
    require("cpp", "protoc", "grpc_cpp_plugin", "g++", "pkg-config")
    gen = await generate("cpp", tmp_path)
    sources = cpp_sources(gen, ["aimass/registry/v1", "aimass/routing/v1"])
    code, flags = await run("pkg-config", "--cflags", "--libs", "grpc++", "protobuf")
    assert code == 0, flags
    objects = await compile_cpp(
        [ROOT / "clients/cpp/examples/list_and_predict.cc", *sources], gen, tmp_path / "obj"
    )
    binary = tmp_path / "list_and_predict"
    code, output = await run("g++", "-o", binary, *objects, *flags.split())
    assert code == 0, output
    await check_example([str(binary)], deployed)


def cpp_sources(gen: Path, packages: list[str]) -> list[Path]:
    """The .pb.cc / .grpc.pb.cc of ``packages`` and of every generated file they include."""
    wanted: set[Path] = set()
    pending = [h for package in packages for h in (gen / package).glob("*.pb.h")]
    while pending:
        header = pending.pop()
        source = header.with_suffix(".cc")
        if source in wanted or not source.exists():
            continue
        wanted.add(source)
        for included in re.findall(r'#include "([^"]+\.pb\.h)"', header.read_text()):
            if (gen / included).exists():
                pending.append(gen / included)
    return sorted(wanted)


async def compile_cpp(sources: list[Path], gen: Path, out: Path) -> list[Path]:
    """Each source compiled to an object, as many at a time as there are cores."""
    await asyncio.to_thread(out.mkdir)
    slots = asyncio.Semaphore(os.cpu_count() or 1)

    async def one(index: int, source: Path) -> Path:
        target = out / f"{index}.o"
        async with slots:
            code, output = await run(
                "g++", "-std=c++17", "-O0", "-w", "-I", gen, "-c", source, "-o", target
            )
        assert code == 0, output
        return target

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sources))))


async def test_go_example_lists_models_and_predicts(deployed, tmp_path):
    require("go", "protoc", "go", "protoc-gen-go", "protoc-gen-go-grpc")
    # GOPATH mode against Debian's Go packages (/usr/share/gocode): offline, no go.sum.
    module = tmp_path / "gopath" / "src" / "github.com" / "aimass" / "aimass" / "clients" / "go"
    await generate("go", tmp_path / "buf")
    module.parent.mkdir(parents=True)
    shutil.copytree(tmp_path / "buf" / "clients" / "go", module)
    shutil.copytree(ROOT / "clients" / "go" / "examples", module / "examples")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOPATH": f"{tmp_path / 'gopath'}{os.pathsep}/usr/share/gocode",
        "GOCACHE": str(tmp_path / "gocache"),
    }
    binary = tmp_path / "list_and_predict"
    package = "github.com/aimass/aimass/clients/go/examples/list_and_predict"
    code, output = await run("go", "build", "-o", binary, package, env=env)
    assert code == 0, output
    await check_example([str(binary)], deployed)


async def test_java_example_lists_models_and_predicts(deployed, tmp_path):
    jars = tuple(JAVA_LIBS / f"{name}.jar" for name in JAVA_RUNTIME)
    require("java", "protoc", "grpc_java_plugin", "javac", "java", files=jars)
    gen = await generate("java", tmp_path)
    examples = ROOT / "clients" / "java" / "examples"
    classes = tmp_path / "classes"
    # -sourcepath: javac compiles only the generated classes the example reaches.
    code, output = await run(
        "javac", "-nowarn", "-d", classes, "-cp", java_classpath(JAVA_COMPILE),
        "-sourcepath", f"{gen}{os.pathsep}{examples}",
        examples / "io" / "aimass" / "examples" / "ListAndPredict.java",
    )  # fmt: skip
    assert code == 0, output
    classpath = f"{classes}{os.pathsep}{java_classpath(JAVA_RUNTIME)}"
    await check_example(["java", "-cp", classpath, "io.aimass.examples.ListAndPredict"], deployed)
