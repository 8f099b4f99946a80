"""Checks, before anything starts, that every port the stack needs can be bound."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from aimass.embedded.components import ComponentSpec
from aimass.embedded.errors import PortConflict, PortsInUse


def port_problem(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None when it can.

    SO_REUSEADDR as the servers themselves set it: a port left in TIME_WAIT by a
    stack that just stopped is free for them, so it must count as free here too.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return "already in use"
            if err.errno == errno.EACCES:
                return "permission denied (ports below 1024 need privileges)"
            return err.strerror or str(err)
    return None


def find_conflicts(host: str, specs: Iterable[ComponentSpec]) -> list[PortConflict]:
    """Every needed port that is taken, or listed twice by the settings."""
    conflicts: list[PortConflict] = []
    owner_of: dict[int, str] = {}
    for spec in specs:
        for purpose, port in spec.ports:
            address = f"{host}:{port}"
            if port in owner_of:
                conflicts.append(
                    PortConflict(purpose, address, f"also configured for {owner_of[port]}")
                )
                continue
            owner_of[port] = purpose
            problem = port_problem(host, port)
            if problem:
                conflicts.append(PortConflict(purpose, address, problem))
    return conflicts


def ensure_ports_free(host: str, specs: Iterable[ComponentSpec]) -> None:
    """Raises PortsInUse naming every taken port and its component."""
    conflicts = find_conflicts(host, specs)
    if conflicts:
        raise PortsInUse(conflicts)
