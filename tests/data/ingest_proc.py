"""A data-service process for the crash test: ``python ingest_proc.py [hang MARKER]``.

Runs the real service (``run_service`` with the data service's ``build``, as
``python -m aimass.data`` does) with a short ack_wait so a dead worker's job comes back
quickly. With ``hang MARKER``, the conversion step writes MARKER and then never ends, so
the test can SIGKILL the process while the job is RUNNING with its version allocated.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from aimass.core.service import run_service
from aimass.data import ingest, worker
from aimass.data.main import SERVICE_NAME, build

ACK_WAIT_S = 2.0


def hang_in_prepare(marker: Path) -> None:
    def prepare(*_args: Any) -> None:
        marker.write_text("converting")
        while True:
            time.sleep(1)

    ingest._prepare = prepare  # type: ignore[assignment]


if __name__ == "__main__":
    worker.ACK_WAIT_S = ACK_WAIT_S
    if sys.argv[1:2] == ["hang"]:
        hang_in_prepare(Path(sys.argv[2]))
    run_service(SERVICE_NAME, build)
