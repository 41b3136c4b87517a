"""A non-streamed answer while its client may hang up: the work is cancelled the moment the client is gone.

A generation runs in the manager as a stream even when the HTTP client asked for one whole answer: the gateway
gathers the pieces, and when the client hangs up, closing the manager socket makes the manager's next piece
undeliverable, which cancels the generation within one step (a whole answer gives the manager nothing to send
until the end, so it could not notice).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from starlette.requests import Request

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection: logged, never seen

log = structlog.get_logger("gateway")


async def _disconnected(request: Request) -> None:
    """Returns when the client has hung up (its body is read by then: what comes next is only the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result; None if the client hung up first, ``work`` then cancelled (its manager socket closed)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the gateway itself is stopping: neither goes on
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client_gone", path=request.url.path, during="generation")
    return None
