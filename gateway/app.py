"""The gateway's ASGI app: the OpenAI routes under ``/v1``, Ollama's under ``/`` and ``/api``, errors in each
family's own shape, requests from other web pages and rebound host names refused, bearer keys off loopback, and a
cap on request bodies."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway.config import GatewaySettings, no_personas
from gateway.dashboard import SIGN_IN_PATHS, Dashboard, refuse_page, throttled, ui_authorized
from gateway.errors import HttpError, from_manager, ollama_error, openai_error
from gateway.ollama_api import Ollama
from gateway.openai_api import OpenAI
from gateway.openai_audio import OpenAIAudio
from gateway.realtime import realtime_endpoint
from gateway.response_store import ResponseStore
from gateway.responses_api import Responses
from gateway.signin import Sessions, Throttle
from gateway.trust import build_trust, refusal
from gateway.watch import CLIENT_CLOSED
from model_client import protocol
from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from personas.config import AgentsConfig

log = structlog.get_logger("gateway")


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return openai_error(exc) if _is_openai(request) else ollama_error(exc)


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: one line, no traceback; the answer goes nowhere."""
    log.info("client_gone", path=request.url.path, during="body")
    return Response(status_code=CLIENT_CLOSED)


async def on_manager_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelManagerError)
    log.info("request_failed", path=request.url.path, code=exc.code, message=exc.message)
    return await on_http_error(request, from_manager(exc))


class Guard:
    """Before any route reads a request: who may send it (the ``Host`` and ``Origin`` rules of gateway/trust.py,
    for every route and the Realtime WebSocket's handshake), the API keys when configured (a bearer key, or the
    page's session cookie; wrong keys throttled per client address), and the body cap."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings, sessions: Sessions, throttle: Throttle) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.max_body = settings.max_body_bytes
        self.trust = build_trust(settings.host, settings.allowed_hosts, settings.allowed_origins)
        self.sessions, self.throttle = sessions, throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        refused = refusal(self.trust, scope.get("method", "GET"), headers)
        if refused is not None:
            log.info("request_refused", path=path[:200], code=refused.code, client=_client(scope))
            await self._refuse(scope, receive, send, refused)
            return
        preflight = scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers
        if self.keys and not preflight and not self._signed_in(path, headers) and path not in SIGN_IN_PATHS:
            error = self._check_key(scope, headers)
            if error is not None:
                if scope["type"] == "http" and error.status == 401 and (page := refuse_page(path)) is not None:
                    await page(scope, receive, send)
                else:
                    await self._refuse(scope, receive, send, error)
                return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            error = HttpError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
            await self._refuse(scope, receive, send, error)
            return
        seen = 0

        async def capped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HttpError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
            return message

        await self.app(scope, capped, send)

    def _signed_in(self, path: str, headers: dict[bytes, bytes]) -> bool:
        return ui_authorized(path, headers, self.sessions)

    def _check_key(self, scope: Scope, headers: dict[bytes, bytes]) -> HttpError | None:
        """None for a valid bearer key; else the refusal: 429 while the client is throttled, whatever key it
        sends, 401 for a wrong key (counted) or none (not counted: a client without a key is not guessing)."""
        header = headers.get(b"authorization")
        if header is None:
            return HttpError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
        client = _client(scope)
        wait_s = self.throttle.retry_after_s(client)
        if wait_s is not None:
            log.info("key_throttled", client=client, retry_after_s=wait_s)
            return throttled(wait_s)
        if self._authorized(header):
            return None
        self.throttle.failed(client)
        log.info("key_refused", client=client, path=scope["path"][:200])
        return HttpError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    def _authorized(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.keys)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: HttpError) -> None:
        """An HTTP refusal in the route family's own shape; a WebSocket is closed before its handshake (1008, which
        the server answers with HTTP 403)."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
            return
        response = openai_error(error) if scope["path"].startswith("/v1/") else ollama_error(error)
        await response(scope, receive, send)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def build_app(settings: GatewaySettings, manager_endpoint: str, agents: AgentsConfig | None = None) -> Starlette:
    link = ManagerLink(manager_endpoint, settings.request_timeout_s, max_message_bytes=settings.max_body_bytes)
    # A Realtime session is a voice turn: its requests go ahead of chat and batch work.
    voice_link = ManagerLink(
        manager_endpoint,
        settings.request_timeout_s,
        max_message_bytes=settings.max_body_bytes,
        priority=protocol.PRIORITY_INTERACTIVE,
    )
    agents = agents or no_personas()

    async def realtime(ws: WebSocket) -> None:
        await realtime_endpoint(ws, voice_link, agents)

    openai, audio, ollama = OpenAI(link), OpenAIAudio(link), Ollama(link)
    sessions = Sessions(settings.ui_session_ttl_s)
    throttle = Throttle(settings.auth_max_failures, settings.auth_window_s)
    ui = Dashboard(link, settings, sessions, throttle)
    directory = Path(settings.responses_dir) if settings.responses_dir else None
    responses = Responses(link, ResponseStore(directory, settings.max_stored_responses))
    routes = [
        Route("/v1/audio/speech", audio.speech, methods=["POST"]),
        Route("/v1/audio/transcriptions", audio.transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", audio.translations, methods=["POST"]),
        Route("/v1/audio/models", audio.models, methods=["GET"]),
        Route("/v1/audio/voices", audio.voices, methods=["GET"]),
        Route("/v1/models", openai.models, methods=["GET"]),
        Route("/v1/models/{model:path}", openai.model, methods=["GET"]),
        Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai.completions, methods=["POST"]),
        Route("/v1/embeddings", openai.embeddings, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime),
        Route("/v1/responses", responses.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
        Route("/ui", ui.page, methods=["GET"]),
        Route("/ui/", ui.page, methods=["GET"]),
        Route("/ui/static/{name}", ui.static, methods=["GET"]),
        Route("/ui/login", ui.login, methods=["POST"]),
        Route("/ui/logout", ui.logout, methods=["POST"]),
        Route("/ui/api/status", ui.status, methods=["GET"]),
        Route("/ui/api/events", ui.events, methods=["GET"]),
        Route("/ui/api/pull", ui.pull, methods=["POST"]),
        Route("/ui/api/models/{action}/{model:path}", ui.act, methods=["POST"]),
        Route("/", ollama.root, methods=["GET", "HEAD"]),
        Route("/api/version", ollama.version, methods=["GET"]),
        Route("/api/tags", ollama.tags, methods=["GET"]),
        Route("/api/ps", ollama.ps, methods=["GET"]),
        Route("/api/show", ollama.show, methods=["POST"]),
        Route("/api/pull", ollama.pull, methods=["POST"]),
        Route("/api/delete", ollama.delete, methods=["DELETE"]),
        Route("/api/copy", ollama.copy, methods=["POST"]),
        Route("/api/chat", ollama.chat, methods=["POST"]),
        Route("/api/generate", ollama.generate, methods=["POST"]),
        Route("/api/embed", ollama.embed, methods=["POST"]),
        Route("/api/embeddings", ollama.embeddings, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        link.close()
        voice_link.close()

    app = Starlette(
        routes=routes,
        exception_handlers={
            HttpError: on_http_error,
            ModelManagerError: on_manager_error,
            ClientDisconnect: on_client_gone,
        },
        lifespan=lifespan,
    )
    # CORS for the pages of gateway.allowed_origins (a browser sends no key with a preflight): any origin that gets
    # past the Guard, which is outside it and refuses every other, may read the answers. No credentials: the page's
    # cookie is for /ui on the gateway's own origin.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], max_age=600)
    app.add_middleware(Guard, settings=settings, sessions=sessions, throttle=throttle)
    return app
