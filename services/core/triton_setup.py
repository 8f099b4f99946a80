"""Makes the Triton server of the nvidia-pytriton wheel able to run python-backend models.

The wheel ships the python backend's stub per Python version under
``python_backend_stubs/``; Triton looks for it beside the backend library, so
the stub for this interpreter is copied there once after install.
Run as ``python -m aimass.core.triton_setup``; a no-op where the wheel is absent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def pytriton_root() -> Path | None:
    """The ``pytriton/tritonserver`` folder of the installed wheel, if any."""
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def install_python_backend_stub() -> Path | None:
    """Copies the stub for this Python into backends/python; returns its path."""
    root = pytriton_root()
    if root is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {version}")
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)
    return target


def main() -> None:
    target = install_python_backend_stub()
    print(f"triton python backend stub: {target or 'nvidia-pytriton not installed'}")


if __name__ == "__main__":
    main()
