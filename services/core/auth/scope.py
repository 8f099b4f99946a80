"""Per-project scoping of resources, shared by every service.

A principal may be scoped to a project (an API key's ``project``, a JWT's ``project``
claim). A scoped caller:

- creates resources in its own project only: :func:`stamp_project` gives the project
  to store and refuses another with PERMISSION_DENIED naming the field;
- sees its own project's resources only: :func:`check_visible` answers NOT_FOUND for
  another project's resource, the same answer as a missing one, so nothing about other
  projects leaks, and :func:`project_filter` narrows lists and searches;
- cannot reference another project's resources: services look references up with the
  caller's credential (:func:`aimass.core.auth.outgoing_credentials`), so the owning
  service answers NOT_FOUND.

An unscoped principal (no project: admins, the stack's internal token, callers when
auth is off) sees and may reference everything. A resource's project is set at
creation and never changes (proto fields marked OUTPUT_ONLY or IMMUTABLE).

The principal is a context variable: it follows a call into ``asyncio.to_thread``, so
store code running in a worker thread may call these too. Background work with no call
(workers, relays) runs as the anonymous admin: unscoped.
"""

from __future__ import annotations

from typing import Any

from aimass.core.errors import NotFound, PermissionDenied
from aimass.core.interceptors import current_principal


def caller_project() -> str:
    """The project the caller is scoped to; "" for unscoped callers (they see everything)."""
    return current_principal().project


def visible(resource_project: str) -> bool:
    """Whether the caller may see a resource of ``resource_project``."""
    project = caller_project()
    return not project or project == resource_project


def check_visible(resource_project: str, name: str) -> None:
    """NotFound (as for a missing resource) when ``name`` belongs to another project."""
    if not visible(resource_project):
        raise NotFound(f"{name} not found")


def stamp_project(requested: str, field: str) -> str:
    """The project a new resource gets: the scoped caller's own (refusing another one with
    PermissionDenied naming ``field``), or what an unscoped caller asked for."""
    project = caller_project()
    if not project:
        return requested
    if requested and requested != project:
        raise PermissionDenied(
            f"{field}: a caller scoped to project {project!r} cannot use project {requested!r}"
        )
    return project


def project_filter(column: Any) -> list[Any]:
    """SQL conditions restricting a query to the caller's project ([] when unscoped)."""
    project = caller_project()
    return [column == project] if project else []
