"""Requests per second per client connection: a token bucket per ROUTER identity, answered with ``busy``."""

from __future__ import annotations

from collections import OrderedDict

MAX_CLIENTS = 10_000  # buckets kept; the least recently seen client is forgotten first (it starts full again)


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # identity -> (tokens, at)

    def allow(self, identity: bytes, now: float) -> bool:
        tokens, at = self._buckets.pop(identity, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[identity] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed
