"""The one error hierarchy of the product: each class maps to one protocol error code.

The manager raises these, the wire carries ``{code, message, details}``, and the client raises the same class
again, so an agent can ``except ModelNotFound`` whatever side of the socket the problem was found on.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ModelManagerError(Exception):
    """Base of every typed error; ``code`` is the protocol error code."""

    code: ClassVar[str] = "internal"
    request_id: str | None = None  # set when the error answers a request whose envelope named its id

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class BadRequest(ModelManagerError):
    """The envelope or the op's arguments are malformed or out of range."""

    code = "bad_request"


class InvalidAudio(BadRequest):
    """The audio cannot be decoded, is empty, or is longer than the configured maximum."""

    code = "invalid_audio"


class UnknownOp(ModelManagerError):
    code = "unknown_op"


class UnsupportedVersion(ModelManagerError):
    code = "unsupported_version"


class ModelNotFound(ModelManagerError):
    """The name is not in the catalogue (models resolve only through it)."""

    code = "model_not_found"


class ModelLoadFailed(ModelManagerError):
    """The model's file is missing or unreadable, or the engine refused it."""

    code = "model_load_failed"


class ModelFailed(ModelManagerError):
    """The model's worker died while serving this request; the next request starts a fresh one."""

    code = "model_failed"


class ContextOverflow(ModelManagerError):
    code = "context_overflow"


class InsufficientMemory(ModelManagerError):
    """No device can hold the model, even after evicting what may be evicted; details say what is free where."""

    code = "insufficient_memory"


class Busy(ModelManagerError):
    """The model's queue is full: retry later."""

    code = "busy"


class PullFailed(ModelManagerError):
    """A model could not be pulled; ``details.reason`` says why: ``not_found``, ``ambiguous``, ``unsupported``,
    ``unsafe_path``, ``bad_listing``, ``network``, ``server_error``, ``rate_limited``, ``stalled``, ``gated``,
    ``unauthorized``, ``no_ranges``, ``disk``, ``hash_mismatch``, ``invalid_model``, ``exists`` or ``cancelled``
    (docs/protocol.md)."""

    code = "pull_failed"


class Timeout(ModelManagerError):
    """The manager did not answer in time (client side) or the request ran past its limit (manager side)."""

    code = "timeout"


class InternalError(ModelManagerError):
    code = "internal"


ERRORS_BY_CODE: dict[str, type[ModelManagerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        InvalidAudio,
        UnknownOp,
        UnsupportedVersion,
        ModelNotFound,
        ModelLoadFailed,
        ModelFailed,
        ContextOverflow,
        InsufficientMemory,
        Busy,
        PullFailed,
        Timeout,
        InternalError,
    )
}
ERROR_CODES: tuple[str, ...] = tuple(ERRORS_BY_CODE)


def error_from_wire(error: dict[str, Any]) -> ModelManagerError:
    """Rebuild the typed error from a reply's ``error`` map; an unknown code becomes ``InternalError``."""
    cls = ERRORS_BY_CODE.get(str(error.get("code")), InternalError)
    details = error.get("details") or {}
    exc = cls(str(error.get("message", "")), **(details if isinstance(details, dict) else {}))
    if cls is InternalError and error.get("code") != "internal":
        exc.details["code"] = error.get("code")
    return exc
