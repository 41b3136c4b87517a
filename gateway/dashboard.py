"""The page at ``/ui``: what the manager holds where, live, with load / unload / pin and pulls.

Plain HTML, CSS and JavaScript shipped in ``gateway/ui`` (no build step). Everything it shows comes from the
manager's documented API: ``status`` and the event stream. While a page is open, the gateway holds one SUB socket
to the manager's events for it and forwards them as server-sent events (``/ui/api/events``); the page fetches
``status`` when an event says something changed and on each heartbeat, never on a timer of its own. With no page
open there is no subscription and no request: the page costs the manager nothing when nobody watches.

Behind the same API keys as the rest of the gateway: a browser, which cannot send a bearer header with a page load
or an EventSource, signs in once with the key (``/ui/login``), which sets a cookie valid for ``/ui`` only
(HttpOnly, SameSite=Strict) holding a session token, not the key (gateway/signin.py); ``/ui/logout`` ends it.

The event stream also says when the manager has gone quiet: after two heartbeat intervals without an event it
sends ``event: link`` with ``{"state": "down"}`` (again every two intervals while it lasts, so the page can tell
a silent manager from a dead gateway), and ``{"state": "up"}`` when events come again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from gateway.body import decode
from gateway.config import DEFAULT_HEARTBEAT_S, GatewaySettings
from gateway.errors import HttpError
from gateway.signin import Sessions, Throttle
from model_client import protocol
from model_client.aio import ManagerLink

UI = Path(__file__).with_name("ui")
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
COOKIE = "mm_ui_session"
SIGN_IN_PATHS = ("/ui/login", "/ui/logout", "/ui/static/app.css")  # served without a key: the sign-in form's own
SIGN_OUT = '<form method="post" action="/ui/logout" id="signout"><button type="submit">Sign out</button></form>'
ACTIONS = {
    "load": ("load", {}),
    "unload": ("unload", {}),
    "pin": ("pin", {"pinned": True}),
    "unpin": ("pin", {"pinned": False}),
}
TOPICS = ("model.", "request.", protocol.EVENT_HEARTBEAT)

log = structlog.get_logger("gateway.ui")


def session_token(headers: dict[bytes, bytes]) -> str:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # noqa: BLE001 - a malformed cookie header is simply no session
        return ""
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel else ""


# The page is never framed by another site (its buttons would act for whoever framed it: clickjacking), nor cached.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


def login_page(status: int, message: str = "", headers: dict[str, str] | None = None) -> HTMLResponse:
    text = (UI / "login.html").read_text(encoding="utf-8").replace("{{message}}", message)
    return HTMLResponse(text, status, headers=PAGE_HEADERS | (headers or {}))


def throttled(wait_s: int) -> HttpError:
    return HttpError(
        429,
        f"too many wrong API keys from this address: try again in {wait_s} s",
        code="too_many_failures",
        retry_after_ms=wait_s * 1000,
    )


def events_endpoint(events: str, requests: str) -> str:
    """The manager's events socket as the gateway can reach it (a wildcard bind: the requests socket's host)."""
    parts = urlsplit(events)
    if parts.scheme == "tcp" and parts.hostname in ("*", "0.0.0.0", "::"):
        return f"tcp://{urlsplit(requests).hostname}:{parts.port}"
    return events


class PullRequest(msgspec.Struct):
    ref: str  # hf.co/ORG/REPO:QUANT, hf://ORG/REPO/FILE or an https:// URL


class Dashboard:
    def __init__(self, link: ManagerLink, settings: GatewaySettings, sessions: Sessions, throttle: Throttle) -> None:
        self.link = link
        self.keys = [key.encode() for key in settings.api_keys]
        self.sessions, self.throttle = sessions, throttle
        # The manager's heartbeat interval: two of them without any event and the page hears "down".
        self.heartbeat_s = settings.manager_heartbeat_s or DEFAULT_HEARTBEAT_S
        self.watchers = 0  # open pages, each with its own subscription
        self._pulls: set[asyncio.Task] = set()  # pulls started from a page, drained to their end

    async def page(self, request: Request) -> Response:
        text = (UI / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(text.replace("<!--signout-->", SIGN_OUT if self.keys else ""), headers=PAGE_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise HttpError(404, "not found")
        return FileResponse(UI / name, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    async def login(self, request: Request) -> Response:
        """A key for a session token (throttled per client address like bearer keys)."""
        if not self.keys:
            return RedirectResponse("/ui", status_code=303)  # nothing to sign in to
        client = request.client.host if request.client else "unknown"
        wait_s = self.throttle.retry_after_s(client)
        if wait_s is not None:
            log.info("key_throttled", client=client, retry_after_s=wait_s)
            message = f"Too many wrong keys from this address: try again in {wait_s} s."
            return login_page(429, message, {"Retry-After": str(wait_s)})
        key = str((await request.form()).get("key") or "").encode()
        if not any(hmac.compare_digest(key, k) for k in self.keys):
            self.throttle.failed(client)
            log.info("key_refused", client=client, path="/ui/login")
            return login_page(401, "That key is not one of the gateway's API keys.")
        response = RedirectResponse("/ui", status_code=303)
        token = self.sessions.open()
        max_age = max(1, int(self.sessions.ttl_s))
        response.set_cookie(COOKIE, token, max_age=max_age, path="/ui", httponly=True, samesite="strict")
        log.info("ui_signed_in", client=client, sessions=len(self.sessions))
        return response

    async def logout(self, request: Request) -> Response:
        """The session is forgotten here, so its cookie is worth nothing even if it was copied."""
        self.sessions.close(session_token(dict(request.scope["headers"])))
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    async def status(self, request: Request) -> Response:
        return JSONResponse(await self.link.request("status", {}, timeout_s=5.0))

    async def act(self, request: Request) -> Response:
        action, model = request.path_params["action"], request.path_params["model"]
        if action not in ACTIONS:
            raise HttpError(404, f"no action {action!r}")
        op, extra = ACTIONS[action]
        return JSONResponse(await self.link.request(op, {"model": model, **extra}))

    async def pull(self, request: Request) -> Response:
        """Start a pull; its progress reaches every open page as ``model.pull`` events (and ``status``'s pulls)."""
        ref = (await decode(request, PullRequest)).ref
        replies = self.link.replies("pull", {"ref": ref, "stream": True}, timeout_s=600.0)
        first = await anext(replies)  # a refused reference is an error now, not an event later

        async def drain() -> None:
            try:
                async for _ in replies:
                    pass
            except Exception as exc:  # noqa: BLE001 - the failure is on the event stream already
                log.info("ui_pull_failed", ref=ref, error=str(exc))

        task = asyncio.get_running_loop().create_task(drain())
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)
        return JSONResponse({"started": ref, "model": first.body.get("model")}, status_code=202)

    async def events(self, request: Request) -> Response:
        status = await self.link.request("status", {}, timeout_s=5.0)
        endpoint = events_endpoint(status["manager"]["endpoints"]["events"], self.link.endpoint)
        return StreamingResponse(
            self._forward(endpoint),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _forward(self, endpoint: str) -> AsyncIterator[bytes]:
        """The manager's events as server-sent events, and the link's state: ``down`` after two heartbeat
        intervals of silence (repeated as long as it lasts), ``up`` at the start and when events come again."""
        self.watchers += 1
        log.info("ui_watch_started", watchers=self.watchers)
        quiet_s = 2 * self.heartbeat_s
        arrived: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(maxsize=1000)
        pump = asyncio.get_running_loop().create_task(self._pump(endpoint, arrived))
        try:
            yield b"retry: 2000\n\n" + link_event("up", self.heartbeat_s)
            up, last = True, time.monotonic()
            while True:
                try:
                    topic, body = await asyncio.wait_for(arrived.get(), max(0.0, last + quiet_s - time.monotonic()))
                except TimeoutError:
                    if up:
                        log.info("ui_manager_silent", quiet_s=quiet_s)
                    up, last = False, time.monotonic()
                    yield link_event("down", self.heartbeat_s)
                    if pump.done():  # the subscription itself is gone: the page opens a new stream, which subscribes
                        return  # anew (on the events endpoint the manager's status gives then)
                    continue
                if not up:
                    log.info("ui_manager_back")
                    up = True
                    yield link_event("up", self.heartbeat_s)
                last = time.monotonic()
                yield f"event: {topic}\ndata: {json.dumps(body, default=str)}\n\n".encode()
        finally:
            pump.cancel()
            self.watchers -= 1
            log.info("ui_watch_ended", watchers=self.watchers)

    async def _pump(self, endpoint: str, arrived: asyncio.Queue) -> None:
        """The subscription, read in a task of its own: waiting on the queue with a timeout then cancels nothing
        but the wait (a cancelled read would end the subscription)."""
        try:
            async with aclosing(self.link.events(endpoint, TOPICS)) as events:
                async for item in events:
                    if arrived.full():  # a page that does not read: the oldest is dropped, the newest kept
                        arrived.get_nowait()
                    arrived.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - the page hears "down" and opens a new stream in time
            log.warning("ui_subscription_failed", endpoint=endpoint, error=str(exc))


def link_event(state: str, heartbeat_s: float) -> bytes:
    return f"event: link\ndata: {json.dumps({'state': state, 'heartbeat_s': heartbeat_s})}\n\n".encode()


def ui_authorized(path: str, headers: dict[bytes, bytes], sessions: Sessions) -> bool:
    """A page request carrying a live session's token in its cookie (set by ``/ui/login``)."""
    return path.startswith("/ui") and sessions.valid(session_token(headers))


def refuse_page(path: str) -> Response | None:
    """Without a key, the page itself answers with the sign-in form (401); its API answers 401 JSON."""
    if path in ("/ui", "/ui/"):
        return login_page(401)
    return None
