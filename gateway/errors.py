"""The manager's typed errors as HTTP answers: OpenAI's error object, or Ollama's ``{"error": ...}``."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from model_client.errors import ModelManagerError

# the manager's error code -> (HTTP status, OpenAI's error code); OpenAI's error type follows from the status
STATUS: dict[str, tuple[int, str | None]] = {
    "bad_request": (400, None),
    "invalid_audio": (400, "invalid_audio"),
    "unknown_op": (400, None),
    "unsupported_version": (400, None),
    "context_overflow": (400, "context_length_exceeded"),
    "model_not_found": (404, "model_not_found"),
    "busy": (429, "rate_limit_exceeded"),
    "insufficient_memory": (503, "insufficient_memory"),
    "pull_failed": (400, "pull_failed"),
    "model_load_failed": (503, "model_load_failed"),
    "model_failed": (503, "model_failed"),
    "timeout": (504, "timeout"),
    "internal": (500, None),
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
    if error.code == "bad_request" and "max_message_bytes" in error.details:  # the request was over the limit
        return HttpError(413, error.message, code="body_too_large")
    status, code = STATUS.get(error.code, (500, None))
    retry = error.details.get("retry_after_ms") if error.code == "busy" else None
    return HttpError(status, error.message, code=code or error.code, retry_after_ms=retry)


def _headers(error: HttpError) -> dict[str, str]:
    if error.status == 429:
        return {"Retry-After": str(max(1, math.ceil((error.retry_after_ms or 1000) / 1000)))}
    return {}


def openai_error(error: HttpError) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
    }.get(error.status, "rate_limit_error" if error.status == 429 else "server_error")
    body: dict[str, Any] = {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status, headers=_headers(error))


def ollama_error(error: HttpError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=_headers(error))
