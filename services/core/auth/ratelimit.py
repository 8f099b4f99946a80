"""Token buckets per caller: a sustained rate with a burst, refused with a wait time.

Buckets live in each service process (no shared store): a key limited to
``r`` requests/s may reach ``r`` in each process it calls. The bucket starts
full; a call takes one token; tokens come back at ``rate`` per second up to
``burst``. An empty bucket answers how long until a token is back, which the
interceptor returns as RESOURCE_EXHAUSTED with RetryInfo (HTTP 429 with
Retry-After through the gateway).
"""

from __future__ import annotations

import time
from collections import OrderedDict

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
