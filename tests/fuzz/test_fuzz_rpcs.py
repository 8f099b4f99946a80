"""Every RPC of every finished service, called with random and boundary requests.

For each method found in the service descriptors (harness.FUZZED_SERVICES), hypothesis
draws requests from the method's input descriptor (tests/fuzz/protogen.py), aimed at the
seeded rows, and calls the real running service. Properties:

- the status is never INTERNAL or UNKNOWN (and a unary call never runs into the deadline);
- every status but OK carries a message;
- a rejected call changes nothing: the database rows and the artifact files are the same
  before and after it.

Client streams get a few random messages; server streams are read to the first response.
Jobs that accepted requests started are let finish (or cancelled) before the next example,
so that the before/after comparison only sees what the call itself did.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FuzzStack
from tests.fuzz.harness import (
    FUZZED_SERVICES,
    Rpc,
    State,
    fuzz_examples,
    invoke,
    proto_files,
    rpcs_of,
)
from tests.fuzz.protogen import MessageStrategies

pytestmark = pytest.mark.asyncio(loop_scope="module")

RPCS = rpcs_of(FUZZED_SERVICES)
FILES = proto_files(FUZZED_SERVICES)
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
UNARY_TIMEOUT_S = 20.0
# A server stream may rightly wait (Watch of a job that ended long ago does not): its
# first response, or its end, comes within this or the deadline is fine.
STREAM_TIMEOUT_S = 2.0
MAX_STREAM_MESSAGES = 4


def requests(rpc: Rpc, fuzz: FuzzStack) -> st.SearchStrategy[object]:
    """One request message, or a short list of them for a client-streaming RPC; half of
    the requests of a type the seeds sent are one of those with a field or two changed."""
    strategies = MessageStrategies(fuzz.names, files=FILES, examples=fuzz.examples)
    single = strategies.messages(rpc.method.input_type)
    if rpc.client_streaming:
        return st.lists(single, max_size=MAX_STREAM_MESSAGES)
    return single


class Before:
    """The state before the next call, re-read only after a call that was accepted.

    Not a dataclass: hypothesis prints a failing example's arguments field by field, and
    the running stack's fields would fill pages.
    """

    def __init__(self, fuzz: FuzzStack) -> None:
        self.fuzz = fuzz
        self.state: State | None = None

    def __repr__(self) -> str:
        return f"Before(seeds={self.fuzz.seeds})"


@pytest_asyncio.fixture(loop_scope="module")
async def before(fuzz_stack: FuzzStack) -> Before:
    """Per RPC (not per example): the seeds are all there, the state is to be read."""
    await fuzz_stack.ensure()
    return Before(fuzz_stack)


@pytest.mark.parametrize("rpc", RPCS, ids=[f"{r.service}.{r.name}" for r in RPCS])
@settings(
    max_examples=fuzz_examples(15),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # `before` is per RPC on purpose
    ],
)
@given(data=st.data())
async def test_bad_requests_get_a_clean_status_and_change_nothing(
    before: Before, rpc: Rpc, data: st.DataObject
) -> None:
    fuzz = before.fuzz
    request = data.draw(requests(rpc, fuzz), label="request")
    if before.state is None:
        await fuzz.quiet()
        before.state = await fuzz.probe.stable()
    timeout_s = STREAM_TIMEOUT_S if rpc.server_streaming else UNARY_TIMEOUT_S
    outcome = await invoke(fuzz.stack.channel(rpc.service), rpc, request, timeout_s)
    event(outcome.code.name)
    assert outcome.code not in FORBIDDEN, f"{rpc.path}: {outcome.code}: {outcome.details}"
    if outcome.ok:
        before.state = None  # an accepted call may change state and start jobs
        return
    if not rpc.server_streaming:
        assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc.path} hung"
    assert outcome.details.strip(), f"{rpc.path}: {outcome.code} without a message"
    after = await asyncio.to_thread(fuzz.probe.read)
    if after != before.state:  # a second look, after whatever was in flight settled
        after = await fuzz.probe.stable()
    changes = before.state.difference(after)
    assert not changes, f"{rpc.path} refused ({outcome.code}: {outcome.details}) " + (
        f"but changed: {changes}"
    )
