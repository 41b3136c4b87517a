"""The manager's typed errors as HTTP answers: OpenAI's error object, or Ollama's ``{"error": ...}``."""

from __future__ import annotations

import math
from typing import Any

import msgspec
from starlette.responses import JSONResponse

from model_client.errors import ModelManagerError

# code -> (HTTP status, OpenAI error type, OpenAI error code)
STATUS: dict[str, tuple[int, str, str | None]] = {
    "bad_request": (400, "invalid_request_error", None),
    "invalid_audio": (400, "invalid_request_error", "invalid_audio"),
    "unknown_op": (400, "invalid_request_error", None),
    "unsupported_version": (400, "invalid_request_error", None),
    "context_overflow": (400, "invalid_request_error", "context_length_exceeded"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "busy": (429, "rate_limit_error", "rate_limit_exceeded"),
    "insufficient_memory": (503, "server_error", "insufficient_memory"),
    "model_load_failed": (503, "server_error", "model_load_failed"),
    "model_failed": (503, "server_error", "model_failed"),
    "timeout": (504, "server_error", "timeout"),
    "internal": (500, "server_error", None),
}


class HttpError(Exception):
    """A request the gateway refuses itself (before the manager sees it)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_ms: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_ms = retry_after_ms


def from_manager(error: ModelManagerError) -> HttpError:
    status, _type, code = STATUS.get(error.code, (500, "server_error", None))
    retry = error.details.get("retry_after_ms") if error.code == "busy" else None
    return HttpError(status, error.message, code=code or error.code, retry_after_ms=retry)


def from_validation(error: msgspec.ValidationError | msgspec.DecodeError) -> HttpError:
    message = str(error)
    param = message.rsplit("`$.", 1)[1].rstrip("`") if "`$." in message else None
    return HttpError(400, message, param=param, code="invalid_request" if param is None else "invalid_value")


def _headers(error: HttpError) -> dict[str, str]:
    if error.status == 429:
        return {"Retry-After": str(max(1, math.ceil((error.retry_after_ms or 1000) / 1000)))}
    return {}


def openai_error(error: HttpError) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}.get(
        error.status, "rate_limit_error" if error.status == 429 else "server_error"
    )
    body: dict[str, Any] = {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status, headers=_headers(error))


def ollama_error(error: HttpError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=_headers(error))
