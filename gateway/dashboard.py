"""The page at ``/ui``: what the manager holds where, live, with load / unload / pin and pulls.

Plain HTML, CSS and JavaScript shipped in ``gateway/ui`` (no build step). Everything it shows comes from the
manager's documented API: ``status`` and the event stream. While a page is open, the gateway holds one SUB socket
to the manager's events for it and forwards them as server-sent events (``/ui/api/events``); the page fetches
``status`` when an event says something changed and on each heartbeat, never on a timer of its own. With no page
open there is no subscription and no request: the page costs the manager nothing when nobody watches.

Behind the same API keys as the rest of the gateway: a browser, which cannot send a bearer header with a page load
or an EventSource, signs in once with the key (``/ui/login``), which sets a cookie valid for ``/ui`` only
(HttpOnly, SameSite=Strict).
"""

from __future__ import annotations

import asyncio
import hmac
import json
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
from gateway.errors import HttpError
from model_client import protocol
from model_client.aio import ManagerLink

UI = Path(__file__).with_name("ui")
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
COOKIE = "mm_ui_key"
ACTIONS = {
    "load": ("load", {}),
    "unload": ("unload", {}),
    "pin": ("pin", {"pinned": True}),
    "unpin": ("pin", {"pinned": False}),
}
TOPICS = ("model.", "request.", protocol.EVENT_HEARTBEAT)

log = structlog.get_logger("gateway.ui")


def cookie_key(headers: dict[bytes, bytes]) -> bytes:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # noqa: BLE001 - a malformed cookie header is simply no key
        return b""
    morsel = cookie.get(COOKIE)
    return morsel.value.encode() if morsel else b""


def login_page(status: int, message: str = "") -> HTMLResponse:
    return HTMLResponse((UI / "login.html").read_text(encoding="utf-8").replace("{{message}}", message), status)


def events_endpoint(events: str, requests: str) -> str:
    """The manager's events socket as the gateway can reach it (a wildcard bind: the requests socket's host)."""
    parts = urlsplit(events)
    if parts.scheme == "tcp" and parts.hostname in ("*", "0.0.0.0", "::"):
        return f"tcp://{urlsplit(requests).hostname}:{parts.port}"
    return events


class PullRequest(msgspec.Struct):
    ref: str  # hf.co/ORG/REPO:QUANT, hf://ORG/REPO/FILE or an https:// URL


class Dashboard:
    def __init__(self, link: ManagerLink, keys: list[str]) -> None:
        self.link = link
        self.keys = [key.encode() for key in keys]
        self.watchers = 0  # open pages, each with its own subscription
        self._pulls: set[asyncio.Task] = set()  # pulls started from a page, drained to their end

    async def page(self, request: Request) -> Response:
        return FileResponse(UI / "index.html", headers={"Cache-Control": "no-store"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise HttpError(404, "not found")
        return FileResponse(UI / name, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    async def login(self, request: Request) -> Response:
        key = str((await request.form()).get("key") or "").encode()
        if not any(hmac.compare_digest(key, k) for k in self.keys):
            return login_page(401, "That key is not one of the gateway's API keys.")
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(COOKIE, key.decode(), path="/ui", httponly=True, samesite="strict")
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
        self.watchers += 1
        log.info("ui_watch_started", watchers=self.watchers)
        try:
            yield b"retry: 2000\n\n"
            async with aclosing(self.link.events(endpoint, TOPICS)) as events:
                async for topic, body in events:
                    yield f"event: {topic}\ndata: {json.dumps(body, default=str)}\n\n".encode()
        finally:
            self.watchers -= 1
            log.info("ui_watch_ended", watchers=self.watchers)


def ui_authorized(path: str, headers: dict[bytes, bytes], keys: list[bytes]) -> bool:
    """A page request carrying the key in its cookie (set by ``/ui/login``)."""
    if not path.startswith("/ui"):
        return False
    key = cookie_key(headers)
    return bool(key) and any(hmac.compare_digest(key, k) for k in keys)


def refuse_page(path: str) -> Response | None:
    """Without a key, the page itself answers with the sign-in form (401); its API answers 401 JSON."""
    if path in ("/ui", "/ui/"):
        return login_page(401)
    return None
