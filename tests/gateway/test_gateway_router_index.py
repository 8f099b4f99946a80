"""The router's (method, second segment) index finds what trying every route in order finds."""

from __future__ import annotations

import re

import pytest

from aimass.gateway.routes import Route, Router, routes_of
from aimass.gateway.server import load_descriptors

_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=([^}]*))?\}")


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(routes_of(load_descriptors().services()))


def _linear(router: Router, method: str, path: str) -> Route | None:
    for route in router.routes:
        if route.http_method == method and route.regex.match(path):
            return route
    return None


def _paths(router: Router) -> list[str]:
    """Every template filled with several segment values, and paths no route has."""
    found = ["/", "", "/v1", "/v1/", "/v1/models", "/v2/models", "/v1/nothing/x", "/healthz"]
    for route in router.routes:
        pattern = _VARIABLE.sub(lambda m: m.group(2) or "*", route.template)
        for value in ("x", "models", "a.b", "deployments"):
            found.append(pattern.replace("**", f"{value}/{value}").replace("*", value))
    return found


def test_index_matches_the_linear_scan(router: Router) -> None:
    checked = 0
    for path in _paths(router):
        for method in ("GET", "POST", "PATCH", "DELETE", "PUT"):
            expected = _linear(router, method, path)
            found = router.match(method, path)
            assert (found[0] if found else None) is expected, (method, path)
            checked += expected is not None
    # Every route is reached by at least its own filled template.
    assert checked >= len(router.routes)


def test_predict_route_and_binding(router: Router) -> None:
    found = router.match("POST", "/v1/deployments/d1:predict")
    assert found is not None
    route, bound = found
    assert route.grpc_method == "/aimass.routing.v1.PredictionService/Predict"
    assert bound == {"deployment": "deployments/d1"}
