"""How a pull lives through a flaky server, and names what a hostile one did.

- Every request has a stall limit: no byte for ``STALL_S`` seconds (``MM_PULL_STALL_S``, 30 by default) and the
  connection is dropped and the request made again; a download resumes from its part with a range request. Without
  it a server gone silent, or a half-open connection, would hold the pull for ever (the hub's HTTP session has no
  timeout of its own).
- A failure that may pass is tried again (the Retry pattern, with capped exponential backoff): a 5xx or a 408 after
  ``BACKOFF_S`` (``MM_PULL_BACKOFF_S``, 1 s by default), then twice as long each time, at most ``MAX_WAIT_S`` a
  wait; a 429 after its ``Retry-After`` (seconds or a date). A ``Retry-After`` longer than ``MAX_WAIT_S`` is not
  waited: the pull fails at once and says how long the server asked for.
- ``TRIES`` tries a request, then the failure's own reason: ``server_error``, ``rate_limited``, ``stalled`` or
  ``network`` (the connection could not be made or was cut).
- What no retry mends is said at once: 401 and 403 are ``gated`` when the hub says so (``X-Error-Code:
  GatedRepo``) and ``unauthorized`` otherwise, both naming ``HF_TOKEN`` and whether one is set; 404 ``not_found``.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from model_client.errors import PullFailed

if TYPE_CHECKING:
    from model_manager.pulls.remote import RemoteFile


def _seconds(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable, ""))
    except ValueError:
        return default
    return value if value > 0 else default


STALL_S = _seconds("MM_PULL_STALL_S", 30.0)
BACKOFF_S = _seconds("MM_PULL_BACKOFF_S", 1.0)
MAX_WAIT_S = 30.0
TRIES = 6

T = TypeVar("T")

# Told of each try about to be made again (the failure, the try that failed, the wait): the pull process says it on
# its standard output, so that a client waiting on the pull hears from it during a long wait.
_on_retry: list[Callable[[Transient, int, float], None]] = []


def on_retry(listener: Callable[[Transient, int, float], None]) -> None:
    _on_retry.append(listener)


def session() -> Any:
    from huggingface_hub.utils import get_session

    return get_session()


class Transient(Exception):
    """A failure that may pass: the request is made again; if it never passes, ``final`` is the pull's error."""

    def __init__(
        self, message: str, reason: str, wait_s: float | None = None, progressed: bool = False, **details: Any
    ) -> None:
        super().__init__(message)
        self.message, self.reason, self.wait_s, self.details = message, reason, wait_s, details
        self.progressed = progressed  # the try moved the work on: the count of tries starts again

    def final(self, tries: int) -> PullFailed:
        if self.wait_s is not None and self.wait_s > MAX_WAIT_S:
            message = f"{self.message}: longer than a pull waits ({MAX_WAIT_S:g} s); pull again later"
        else:
            message = f"{self.message} ({tries} tries)"
        return PullFailed(message, reason=self.reason, tries=tries, **self.details)


def retried(attempt: Callable[[], T]) -> T:
    """``attempt()``, made again after each ``Transient`` failure as the module says; its result."""
    failures = 0
    while True:
        try:
            return attempt()
        except Transient as failure:
            failures = 1 if failure.progressed else failures + 1
            wait = failure.wait_s
            if wait is None:
                wait = min(MAX_WAIT_S, BACKOFF_S * 2 ** (failures - 1))
            if failures >= TRIES or wait > MAX_WAIT_S:
                raise failure.final(failures) from None
            for listener in _on_retry:
                listener(failure, failures, wait)
            time.sleep(wait)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (given as seconds or as an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes '²', which float() does not
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def token_set() -> bool:
    from huggingface_hub.utils import get_token

    return get_token() is not None


def denied(status: int, hub_code: str | None, where: str, hub: bool, file: str | None = None) -> PullFailed:
    """A 401 or 403: a gated repo (the hub's ``GatedRepo``) or one the token may not read, said with ``HF_TOKEN``."""
    token = hub and token_set()
    details = {"status": status, "token_set": token, **({"file": file} if file else {})}
    if hub_code == "GatedRepo":
        note = (
            "HF_TOKEN is set, but its account has no access yet: ask for it on the repo's page"
            if token
            else "no HF_TOKEN is set in the manager's environment"
        )
        return PullFailed(
            f"{where} is a gated repository (the hub answered {status}): accept its terms on the hub, then set "
            f"HF_TOKEN in the manager's environment to a token of that account; {note}",
            reason="gated",
            **details,
        )
    if not hub:
        return PullFailed(
            f"{where} answered {status}: the server refuses access (a URL is fetched without credentials; "
            "HF_TOKEN goes to the hub only)",
            reason="unauthorized",
            **details,
        )
    note = "HF_TOKEN is set, but may not read it" if token else "no HF_TOKEN is set in the manager's environment"
    return PullFailed(
        f"{where}: the hub refused access ({status}): a private repo needs HF_TOKEN in the manager's environment, "
        f"set to a token that may read it; {note}",
        reason="unauthorized",
        **details,
    )


def refusal(
    status: int, headers: Any, url: str, hub: bool, file: str | None = None, repo: str | None = None
) -> PullFailed | Transient:
    """What an answer other than the one asked for means: an error to raise (a ``Transient`` one to try again)."""
    named = {"file": file} if file else {}
    hub_says = headers.get("X-Error-Message")
    said = f": {hub_says}" if hub_says else ""
    if status in (401, 403):
        return denied(status, headers.get("X-Error-Code"), repo or url, hub, file)
    if status == 404:
        return PullFailed(f"{url} does not exist (404)", reason="not_found", **named)
    if status == 429:
        wait = _retry_after(headers.get("Retry-After"))
        asked = f", asking to wait {wait:g} s" if wait is not None else ""
        return Transient(
            f"{url} answered 429 (too many requests{asked})",
            reason="rate_limited",
            wait_s=wait,
            status=status,
            **({"retry_after_s": wait} if wait is not None else {}),
            **named,
        )
    if status >= 500 or status == 408:
        return Transient(f"{url} answered {status}{said}", reason="server_error", status=status, **named)
    return PullFailed(f"{url} answered {status}{said}", reason="network", status=status, **named)


def dropped(exc: Exception, url: str, file: str | None = None) -> Transient:
    """A connection that failed, was cut or went silent."""
    import httpx2

    named = {"file": file} if file else {}
    if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
        return Transient(f"{url}: no byte came for {STALL_S:g} s", reason="stalled", **named)
    return Transient(f"{url}: the connection failed ({type(exc).__name__}: {exc})", reason="network", **named)


def transport_errors() -> tuple[type[Exception], ...]:
    import httpx2

    return (httpx2.TransportError,)


@contextmanager
def streamed(file: RemoteFile, headers: dict[str, str], expected: tuple[int, ...]) -> Iterator[Any]:
    """A streamed GET of ``file`` whose status is one of ``expected``; any other answer, a failed connection or a
    stall (also while the body is read inside the ``with``) raised as ``PullFailed`` or ``Transient``."""
    try:
        with session().stream("GET", file.url, headers=headers, follow_redirects=True, timeout=STALL_S) as response:
            if response.status_code not in expected:
                raise refusal(response.status_code, response.headers, file.url, file.hub, file.name or None, file.repo)
            yield response
    except transport_errors() as exc:
        raise dropped(exc, file.url, file.name or None) from None
