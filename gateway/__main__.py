"""``python -m aimass.gateway``: the built-in REST gateway on ports.gateway (8080)."""

from __future__ import annotations

from aimass.gateway.server import main

main()
