"""Where the SDK connects and with which credentials (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aimass.core.auth.bootstrap import read_admin_key
from aimass.core.settings import load_settings

API_KEY_ENV = "AIMASS_API_KEY"
CONFIG_ENV = "AIMASS_CLIENT_CONFIG"
DEFAULT_CONFIG = Path("~/.config/aimass/client.yaml")
# Proto package -> the process that serves it.
SERVING_PROCESS = {"access": "registry"}


@dataclass
class ClientConfig:
    """Resolved connection settings of one client."""

    addresses: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 4
    max_message_mb: int = 64

    def address(self, package: str) -> str:
        process = SERVING_PROCESS.get(package, package)
        try:
            return self.addresses[process]
        except KeyError:
            raise KeyError(f"no address for the {process} service") from None

    @classmethod
    def resolve(
        cls,
        *,
        api_key: str | None = None,
        addresses: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> ClientConfig:
        file = _config_file()
        settings = load_settings()
        resolved = {
            name: settings.service_address(name)
            for name in (
                "data",
                "training",
                "evaluation",
                "compression",
                "registry",
                "routing",
                "pipeline",
            )
        }
        resolved.update(file.get("addresses") or {})
        resolved.update(addresses or {})
        key = (
            api_key
            or os.environ.get(API_KEY_ENV)
            or file.get("api_key")
            or read_admin_key(settings.home)
        )
        return cls(
            addresses=resolved,
            api_key=key or None,
            timeout_s=timeout_s if timeout_s is not None else float(file.get("timeout_s", 60.0)),
            retries=retries if retries is not None else int(file.get("retries", 4)),
            max_message_mb=settings.max_message_mb,
        )


def _config_file() -> dict[str, Any]:
    path = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping (api_key, addresses, timeout_s)")
    return data
