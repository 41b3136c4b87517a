"""What a generation gives back, typed once for every layer: the engine builds a ``Completion``, the worker sends
it, the manager adds its own figures (the model's name, the queue wait), and the client, the gateway and the
Wyoming service decode it at their boundary; a streamed generation's pieces are ``TextChunk``s.

On the wire they are the maps docs/protocol.md shows. Decoding ignores fields it does not know, so a newer
manager's additions do not break an older client; a field left at its default is not sent (``tool_calls`` and
``stopped`` appear only when they say something).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from model_client.errors import InternalError
from model_client.protocol import ToolCall

T = TypeVar("T")
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens already in the model's context, not evaluated again


class Timings(msgspec.Struct, kw_only=True, omit_defaults=True):
    ttft_ms: float  # from the request's start on its sequence to its first token
    total_ms: float
    tokens_per_s: float  # after the first token (0 for a reply of one token)
    queue_ms: float | None = None  # from the manager's receiving it to its start (the manager's figure)


class ContextReport(msgspec.Struct, kw_only=True):
    """How an overlong conversation was handled: the model's overflow policy and how many old turns it dropped."""

    policy: str = "error"
    dropped_messages: int = 0


class Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A finished generation: text plus usage, timings and context handling as the manager reported them."""

    text: str
    finish_reason: FinishReason
    model: str = ""  # the catalogue name; set by the manager
    usage: Usage
    timings: Timings
    context: ContextReport = msgspec.field(default_factory=ContextReport)
    tool_calls: list[ToolCall] = []  # with `tools`: the calls (finish reason tool_calls)
    stopped: str | None = None  # why a cancelled generation stopped: deadline, client_gone, cancelled


class TextChunk(msgspec.Struct, kw_only=True):
    """A streamed generation's next text; ``tokens``: how many tokens it carries (a piece may hold several)."""

    text: str
    tokens: int = 1


def completion_from(body: Any) -> Completion:
    """A reply's result map as a ``Completion``; a malformed one is an ``InternalError`` naming the field."""
    return _typed(body, Completion)


def chunk_from(body: Any) -> TextChunk:
    return _typed(body, TextChunk)


def _typed(body: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise InternalError(f"malformed {kind.__name__} from the manager: {exc}") from None
