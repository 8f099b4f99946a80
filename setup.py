"""Maps the repository's folders onto one import namespace, ``aimass``.

The layout shows the architecture (one folder per service under services/,
generated code under gen/python/, the SDK and CLI under clients/python/), while
every import reads ``aimass.<part>``. pyproject.toml cannot express a mapping
computed from the tree, so it lives here.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
SERVICES = ["core", "data", "training", "evaluation", "compression", "registry", "routing"]
SERVICES += ["pipeline"]
# One generated package per proto package that has .proto files.
PROTO_PACKAGES = sorted({p.parent.parent.name for p in ROOT.glob("protos/aimass/*/v1/*.proto")})

PACKAGE_ROOTS: dict[str, str] = {
    "aimass": "clients/python/aimass",
    "aimass.gateway": "gateway",
    "aimass.migrations": "migrations",
    **{f"aimass.{name}": f"services/{name}" for name in SERVICES},
}
# Generated code is kept apart (gen/python, never edited), yet imported by the
# name of its proto package: aimass.registry.v1 sits beside aimass.registry.
for proto in PROTO_PACKAGES:
    if proto in SERVICES:
        PACKAGE_ROOTS[f"aimass.{proto}.v1"] = f"gen/python/aimass/{proto}/v1"
    else:
        PACKAGE_ROOTS[f"aimass.{proto}"] = f"gen/python/aimass/{proto}"


def expand(roots: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Lists every package below each root, with the folder it lives in."""
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for name, folder in roots.items():
        if not (ROOT / folder).is_dir():
            raise SystemExit(f"{folder} is missing: run `make protos` before installing")
        packages.append(name)
        package_dir[name] = folder
        for sub in find_packages(str(ROOT / folder)):
            if f"{name}.{sub}" not in roots:
                packages.append(f"{name}.{sub}")
    return packages, package_dir


packages, package_dir = expand(PACKAGE_ROOTS)
setup(
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    package_data={
        "": ["*.pyi", "py.typed", "*.yaml", "*.ini", "*.mako"],
        # Alembic revisions are plain files in a folder that is not a package.
        "aimass.migrations": ["versions/*.py"],
    },
)
