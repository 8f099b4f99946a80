"""The REST gateway under random requests: paths built from the real route templates with
hostile segments, random JSON bodies and random headers, against the seeded services.

Properties: never a 500 (the gateway's INTERNAL), every error has a JSON body with a
message, and a rejected request (4xx) changes no database row and no artifact file.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aimass.gateway.app import Gateway
from aimass.gateway.descriptors import Descriptors, descriptor_set_from_modules
from aimass.gateway.server import start_gateway
from tests.fuzz.conftest import FuzzStack
from tests.fuzz.harness import FUZZED_SERVICES, State, fuzz_examples

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Path segments that try to escape their resource or break parsers.
HOSTILE = ["..", "%2e%2e", "%2F", "a%2Fb", "%00", "~", "ü", "x" * 300, "*", "", "%", "%zz"]
METHODS = ["GET", "POST", "PATCH", "DELETE", "PUT"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@dataclass
class RestStack:
    fuzz: FuzzStack
    url: str
    http: aiohttp.ClientSession
    templates: list[tuple[str, str]]
    before: State | None = None


def route_templates(gateway: Gateway) -> list[tuple[str, str]]:
    """(HTTP method, path template) of every route of the fuzzed services."""
    packages = {f"aimass.{name}." for name in FUZZED_SERVICES}
    return [
        (route.http_method.upper(), route.template)
        for route in gateway.router.routes
        if any(route.grpc_method.lstrip("/").startswith(p) for p in packages)
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rest(fuzz_stack: FuzzStack) -> AsyncIterator[RestStack]:
    settings_ = fuzz_stack.stack.settings
    addresses = {name: fuzz_stack.stack.address(name) for name in fuzz_stack.stack.servers}
    gateway = Gateway(
        settings_, Descriptors(descriptor_set_from_modules()), addresses=addresses,
        max_body_bytes=64 * 1024, unary_timeout_s=20.0,
    )  # fmt: skip
    runner, port = await start_gateway(settings_, gateway, port=0)
    try:
        async with aiohttp.ClientSession() as http:
            yield RestStack(fuzz_stack, f"http://127.0.0.1:{port}", http, route_templates(gateway))
    finally:
        await runner.cleanup()


def fill(template: str, draw: st.DrawFn, names: list[str]) -> str:
    """A path from ``template``: each {variable} becomes a real name, a hostile segment or
    random text."""

    def segment(_match: re.Match[str]) -> str:
        # Mostly real names, so most requests reach a handler rather than a 404.
        choice = draw(st.sampled_from(["name"] * 6 + ["hostile"] * 3 + ["text"]))
        if choice == "name" and names:
            return draw(st.sampled_from(names))
        if choice == "hostile":
            return draw(st.sampled_from(HOSTILE))
        return draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=16))

    return re.sub(r"\{[^}]*\}", segment, template)


@st.composite
def requests(draw: st.DrawFn, templates: list[tuple[str, str]], names: list[str]) -> tuple:
    method, template = draw(st.sampled_from(templates))
    if draw(st.integers(0, 4)) == 0:
        method = draw(st.sampled_from(METHODS))  # the wrong verb for the path
    path = fill(template, draw, names)
    query = draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3))
    kind = draw(st.sampled_from(["json", "bytes", "none"]))
    body: bytes | None = None
    if kind == "json":
        body = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=256))
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain", ""]))}
    return method, path, query, body, headers


async def send(rest: RestStack, method: str, path: str, query, body, headers) -> tuple[int, bytes]:
    url = rest.url + (path if path.startswith("/") else "/" + path)
    try:
        async with rest.http.request(
            method, url, params=query, data=body, headers={k: v for k, v in headers.items() if v},
            timeout=aiohttp.ClientTimeout(total=25), allow_redirects=False,
        ) as response:  # fmt: skip
            # Streams (NDJSON) are read to their first line only.
            content = await response.content.readline()
            return response.status, content
    except aiohttp.InvalidURL:
        return 400, b'{"message": "the client refused the URL"}'


@settings(
    max_examples=fuzz_examples(150),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
async def test_random_rest_requests_never_500_and_rejected_ones_change_nothing(
    rest: RestStack, data: st.DataObject
) -> None:
    fuzz = rest.fuzz
    method, path, query, body, headers = data.draw(
        requests(rest.templates, fuzz.names), label="request"
    )
    if rest.before is None:
        await fuzz.ensure()
        await fuzz.quiet()
        rest.before = await fuzz.probe.stable()
    status, content = await send(rest, method, path, query, body, headers)
    event(str(status))
    assert status != 500, f"{method} {path}: 500 {content[:300]!r}"
    if status < 400:
        rest.before = None  # accepted: state may change
        return
    assert content.strip(), f"{method} {path}: {status} with an empty body"
    after = await asyncio.to_thread(fuzz.probe.read)
    if after != rest.before:
        after = await fuzz.probe.stable()
    changes = rest.before.difference(after)
    assert not changes, f"{method} {path} refused with {status} but changed: {changes}"
