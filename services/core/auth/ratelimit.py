"""Token buckets per caller: a sustained rate with a burst, refused with a wait time.

A key limited to ``r`` requests/s gets ``r`` across the whole stack: its bucket
lives in the NATS JetStream key-value bucket ``AIMASS_RATELIMITS``
(:class:`ClusterRateLimiter`), one entry per caller holding the tokens left and when
they were counted, changed only by compare-and-set on the entry's revision, so two
processes never spend the same token. A process does not pay a NATS round trip per
call: it leases a batch of tokens (about ``lease_s`` seconds of the rate, at most a
quarter of the burst) and spends them locally; a lease unused after ``lease_ttl_s``
is dropped (those tokens are lost, never minted twice), so the cluster admits at most
the rate and a caller sees at worst a lease per process held idle elsewhere.

The bucket starts full; a call takes one token; tokens come back at ``rate`` per
second up to ``burst``. An empty bucket answers how long until a token is back, which
the interceptor returns as RESOURCE_EXHAUSTED with RetryInfo (HTTP 429 with
Retry-After through the gateway). While NATS cannot be reached the limiter falls back
to :class:`RateLimiter`, the per-process buckets (a key may then reach ``r`` in each
process). Shared buckets count time with each process's wall clock: hosts must keep
their clocks in sync (NTP), a skew only shifts when tokens come back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

# Buckets kept at most; the least recently used is dropped (it refills anyway).
MAX_BUCKETS = 10_000


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.last = time.monotonic()

    def take(self, now: float | None = None) -> float:
        """Takes a token: 0.0 when granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per caller; a rate of 0 or less means unlimited."""

    def __init__(self, default_rate: float, burst_s: float) -> None:
        self.default_rate = default_rate
        self.burst_s = burst_s
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, caller: str, rate: float = 0.0) -> float:
        """0.0 when the call may go ahead, else seconds to wait."""
        rate = rate if rate > 0 else self.default_rate
        if rate <= 0:
            return 0.0
        bucket = self._buckets.get(caller)
        if bucket is None or bucket.rate != rate:
            bucket = TokenBucket(rate, rate * self.burst_s)
            self._buckets[caller] = bucket
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
        return bucket.take()


class _Lease:
    """Tokens this process took from a shared bucket, spendable until ``expires_at``; an
    empty bucket leaves a lease of none, refusing locally until ``expires_at``."""

    __slots__ = ("expires_at", "tokens")

    def __init__(self, tokens: float, expires_at: float) -> None:
        self.tokens = tokens
        self.expires_at = expires_at


# Compare-and-set attempts before a contended call falls back to the local bucket.
_CAS_ATTEMPTS = 8


class ClusterRateLimiter:
    """Token buckets shared by every process through a JetStream key-value bucket.

    ``bucket()`` returns the key-value bucket while NATS is reachable, else None (then
    the per-process :class:`RateLimiter` answers). The hot path is a local lease; a
    call that finds its lease spent leases again (one get and one compare-and-set);
    concurrent calls of one caller share that round trip.
    """

    def __init__(
        self,
        default_rate: float,
        burst_s: float,
        bucket: Callable[[], KeyValue | None],
        *,
        lease_s: float = 0.25,
        lease_ttl_s: float = 1.0,
    ) -> None:
        self.local = RateLimiter(default_rate, burst_s)
        self.burst_s = burst_s
        self.lease_s = lease_s
        self.lease_ttl_s = lease_ttl_s
        self._bucket = bucket
        self._leases: dict[str, _Lease] = {}
        self._renewing: dict[str, asyncio.Future[float]] = {}

    @property
    def default_rate(self) -> float:
        return self.local.default_rate

    @default_rate.setter
    def default_rate(self, value: float) -> None:
        self.local.default_rate = value

    async def check(self, caller: str, rate: float = 0.0) -> float:
        """0.0 when the call may go ahead, else seconds to wait."""
        rate = rate if rate > 0 else self.local.default_rate
        if rate <= 0:
            return 0.0
        lease = self._leases.get(caller)
        if lease is not None:
            now = time.monotonic()
            if lease.expires_at > now:
                if lease.tokens >= 1.0:
                    lease.tokens -= 1.0
                    return 0.0
                if lease.tokens < 0.0:
                    # Refused a moment ago: a flood of refused calls costs no round trips.
                    return lease.expires_at - now
        kv = self._bucket()
        if kv is None:
            return self.local.check(caller, rate)
        return await self._renew(kv, caller, rate)

    async def _renew(self, kv: KeyValue, caller: str, rate: float) -> float:
        pending = self._renewing.get(caller)
        if pending is not None:
            # Another call of this caller is leasing: wait for it, then try its lease.
            wait_s = await asyncio.shield(pending)
            if wait_s > 0:
                return wait_s
            return await self.check(caller, rate)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._renewing[caller] = future
        try:
            wait_s = await self._lease(kv, caller, rate)
            future.set_result(wait_s)
        except BaseException:
            future.set_result(0.0)  # this call was cancelled: its waiters lease themselves
            raise
        finally:
            del self._renewing[caller]
        return wait_s

    async def _lease(self, kv: KeyValue, caller: str, rate: float) -> float:
        burst = max(rate * self.burst_s, 1.0)
        wanted = max(1.0, min(math.ceil(rate * self.lease_s), math.floor(burst / 4)))
        try:
            granted, wait_s = await take_shared(kv, bucket_key(caller), rate, burst, wanted)
        except (nats.errors.Error, OSError, TimeoutError, _Contended) as err:
            log.debug("shared rate limit of %s unavailable (%s): local bucket", caller, err)
            return self.local.check(caller, rate)
        now = time.monotonic()
        if granted > 0:
            # The call that leased spends the lease's first token.
            self._leases[caller] = _Lease(granted - 1.0, now + self.lease_ttl_s)
        else:
            self._leases[caller] = _Lease(-1.0, now + wait_s)
        if len(self._leases) > MAX_BUCKETS:
            self._leases.pop(next(iter(self._leases)))
        return wait_s


class _Contended(Exception):
    """Every compare-and-set attempt lost to another process."""


def bucket_key(caller: str) -> str:
    """A key-value key for a caller (subjects hold characters keys may not, like '@')."""
    return "c" + hashlib.sha256(caller.encode()).hexdigest()[:40]


async def take_shared(
    kv: KeyValue, key: str, rate: float, burst: float, wanted: float
) -> tuple[float, float]:
    """Takes up to ``wanted`` whole tokens from the shared bucket ``key``.

    Returns (tokens granted, 0.0), or (0, seconds until a token is back) when it is
    empty. Read, refill by the time elapsed, write back with the revision read: a
    concurrent taker makes the write fail and the loop reads again.
    """
    for _ in range(_CAS_ATTEMPTS):
        try:
            entry = await kv.get(key)
            state, revision = json.loads(entry.value or b"{}"), entry.revision
        except KeyNotFoundError:
            state, revision = {}, 0
        now = time.time()
        tokens = float(state.get("tokens", burst))
        elapsed = max(0.0, now - float(state.get("time", now)))
        tokens = min(burst, tokens + elapsed * rate)
        if tokens < 1.0:
            return 0.0, (1.0 - tokens) / rate
        granted = min(wanted, math.floor(tokens))
        value = json.dumps({"tokens": tokens - granted, "time": now}).encode()
        try:
            if revision:
                await kv.update(key, value, last=revision)
            else:
                await kv.create(key, value)
        except KeyWrongLastSequenceError:
            continue
        return granted, 0.0
    raise _Contended(f"{_CAS_ATTEMPTS} compare-and-set attempts lost")
