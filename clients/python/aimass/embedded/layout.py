"""Where the embedded stack keeps its files under AIMASS_HOME.

HOME/
├── aimass.db            SQLite metadata (default database_url)
├── artifacts/           file:// artifact store (default artifact_root)
├── nats/                JetStream store of the embedded nats-server
├── logs/<name>.log      stdout and stderr of each component, and supervisor.log
└── run/stack.json       what is running: pids, process groups, ports, start times
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

SUPERVISOR = "supervisor"


@dataclass(frozen=True)
class StackLayout:
    """The paths of one stack's home folder."""

    home: Path

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def nats_dir(self) -> Path:
        return self.home / "nats"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    def log_of(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    def ensure(self) -> None:
        """Creates the home and its folders (idempotent)."""
        for folder in (self.home, self.logs_dir, self.run_dir, self.nats_dir):
            folder.mkdir(parents=True, exist_ok=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a text file, or "" when it does not exist."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines)).rstrip()
    except FileNotFoundError:
        return ""
