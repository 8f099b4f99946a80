"""The descriptor set both gateways read: built from protos/ or from the installed code.

:func:`build_descriptor_set` runs protoc (grpcio-tools) over every .proto of
protos/ with ``--include_imports`` (what Envoy's grpc_json_transcoder needs,
the same as ``buf build -o``); :func:`descriptor_set_from_modules` collects
the same files from the generated Python modules, for installs without the
protos/ tree. :class:`Descriptors` turns a set into a pool and message classes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from aimass.core.auth.roles import file_descriptors


def build_descriptor_set(protos_root: Path, out: Path | None = None) -> bytes:
    """A FileDescriptorSet (serialized) of every aimass .proto under protos_root and imports."""
    files = sorted(str(p.relative_to(protos_root)) for p in protos_root.glob("aimass/**/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        target = out or Path(tmp) / "aimass.pb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{protos_root}",
            f"-I{protos_root / 'third_party'}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={target}",
            *files,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed: {done.stderr.strip()}")
        return target.read_bytes()


def descriptor_set_from_modules() -> bytes:
    """The same set from the installed generated modules (dependencies first)."""
    ordered: list[descriptor.FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: descriptor.FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for file in file_descriptors():
        visit(file)
    fds = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        file.CopyToProto(fds.file.add())
    return fds.SerializeToString()


class Descriptors:
    """A pool over one descriptor set, with message classes looked up by full name."""

    def __init__(self, serialized: bytes) -> None:
        self.file_set = descriptor_pb2.FileDescriptorSet.FromString(serialized)
        self.pool = descriptor_pool.DescriptorPool()
        for file in self.file_set.file:
            self.pool.Add(file)
        self._classes: dict[str, type[Message]] = {}

    def message_class(self, full_name: str) -> type[Message]:
        if full_name not in self._classes:
            found = self.pool.FindMessageTypeByName(full_name)
            self._classes[full_name] = message_factory.GetMessageClass(found)
        return self._classes[full_name]

    def services(self) -> list[descriptor.ServiceDescriptor]:
        """Every aimass service of the set."""
        found = []
        for file in self.file_set.file:
            if not file.package.startswith("aimass."):
                continue
            for service in file.service:
                found.append(self.pool.FindServiceByName(f"{file.package}.{service.name}"))
        return found


def main() -> None:
    """``python -m aimass.gateway.descriptors OUT [PROTOS]``: writes the descriptor set."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m aimass.gateway.descriptors OUT.pb [PROTOS_DIR]")
    out = Path(sys.argv[1])
    if len(sys.argv) > 2:
        build_descriptor_set(Path(sys.argv[2]), out)
    else:
        out.write_bytes(descriptor_set_from_modules())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
