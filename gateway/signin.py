"""The page's sign-in: random session tokens in place of the API key, and a throttle on wrong keys.

A browser cannot send a bearer header with a page load or an EventSource, so the page signs in once with a key and
gets a cookie. The cookie holds a random token the gateway remembers for a while (``gateway.ui_session_ttl_s``),
never the key itself: a cookie that leaks (a shared profile, a backup) ends with its session, and signing out
forgets it here. Wrong keys, from the sign-in form or a bearer header, are counted per client address: after
``gateway.auth_max_failures`` in ``gateway.auth_window_s`` that address gets 429 for every key it sends, the right
one too (else a guesser would learn its hit from the answer), until the window has passed. A valid session token
is still honoured: it cannot be guessed, so it tells a guesser nothing.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_SESSIONS = 1000  # signed-in pages remembered; the oldest is forgotten first
MAX_CLIENTS = 10_000  # addresses whose recent failures are remembered; the least recent is forgotten first


def _digest(token: str) -> bytes:
    """Tokens are kept hashed, so a lookup's timing says nothing about a stored token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Sessions:
    def __init__(self, ttl_s: float, limit: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.limit, self.clock = ttl_s, limit, clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # in the order opened, so in the order they expire

    def open(self) -> str:
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token)] = self.clock() + self.ttl_s
        while len(self._expiry) > self.limit:
            self._expiry.popitem(last=False)
        return token

    def valid(self, token: str) -> bool:
        if not token:
            return False
        self._forget_expired()
        return _digest(token) in self._expiry

    def close(self, token: str) -> None:
        self._expiry.pop(_digest(token), None)

    def __len__(self) -> int:
        self._forget_expired()
        return len(self._expiry)

    def _forget_expired(self) -> None:
        now = self.clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)


class Throttle:
    def __init__(
        self,
        max_failures: int,
        window_s: float,
        limit: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures, self.window_s, self.limit, self.clock = max_failures, window_s, limit, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # least recently failed first

    def retry_after_s(self, client: str) -> int | None:
        """None if ``client`` may try a key now; else the whole seconds until it may."""
        times = self._recent(client)
        if times is None or len(times) < self.max_failures:
            return None
        return max(1, math.ceil(times[-self.max_failures] + self.window_s - self.clock()))

    def failed(self, client: str) -> None:
        times = self._recent(client) or deque(maxlen=self.max_failures)
        times.append(self.clock())
        self._failures[client] = times
        self._failures.move_to_end(client)
        while len(self._failures) > self.limit:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, client: str) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        cutoff = self.clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times
