"""The gateway's ASGI app: the OpenAI routes under ``/v1``, Ollama's under ``/`` and ``/api``, errors in each
family's own shape, bearer keys off loopback, and a cap on request bodies."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway.config import GatewaySettings, no_personas
from gateway.dashboard import Dashboard, refuse_page, ui_authorized
from gateway.errors import HttpError, from_manager, ollama_error, openai_error
from gateway.ollama_api import Ollama
from gateway.openai_api import OpenAI
from gateway.openai_audio import OpenAIAudio
from gateway.realtime import realtime_endpoint
from gateway.response_store import ResponseStore
from gateway.responses_api import Responses
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
    """Bearer keys (when configured) and the body cap, before any route reads the request."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the Realtime API: the same keys, checked before the handshake
            if self.keys and not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                await send({"type": "websocket.close", "code": 1008})
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        openai = scope["path"].startswith("/v1/")
        path = scope["path"]
        if (
            self.keys
            and not self._authorized(headers.get(b"authorization", b""))
            and not ui_authorized(path, headers, self.keys)
            and path != "/ui/login"
        ):
            if (page := refuse_page(path)) is not None:
                await page(scope, receive, send)
                return
            error = HttpError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
            await (openai_error(error) if openai else ollama_error(error))(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            error = HttpError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
            await (openai_error(error) if openai else ollama_error(error))(scope, receive, send)
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

    def _authorized(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.keys)


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
    ui = Dashboard(link, settings.api_keys)
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
    app.add_middleware(Guard, settings=settings)
    return app
