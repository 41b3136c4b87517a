"""What Ollama's API accepts: the request bodies (typed, strict) and its names and durations (``:latest`` tags,
``keep_alive`` as seconds or a Go duration)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from gateway.errors import HttpError


class Options(msgspec.Struct):
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    # Accepted, not applied (docs/gateway.md), but typed: a wrong type is still a 400 naming the field.
    num_ctx: int | None = None  # the catalogue decides a model's context
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None  # the catalogue and the memory policy place a model
    num_thread: int | None = None  # the manager hands out CPU threads
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    use_mmap: bool | None = None
    numa: bool | None = None


class OllamaMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # Ollama's: {"function": {"name", "arguments": {...}}}
    tool_name: str | None = None
    images: list[str] | None = None  # refused: no model here sees images
    thinking: str | None = None  # an earlier reply's reasoning: not fed back


class Generation(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None  # refused when set: no reasoning mode is served


class ChatBody(Generation, kw_only=True):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class GenerateBody(Generation, kw_only=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # without a system prompt the prompt goes to the model as it is anyway
    images: list[str] | None = None  # refused: no model here sees images
    suffix: str | None = None  # refused: no fill-in-the-middle
    template: str | None = None  # refused: the catalogue's chat format applies
    context: list[int] | None = None  # refused: Ollama's old token context (use /api/chat)


class ModelBody(msgspec.Struct):
    model: str | None = None
    name: str | None = None  # older clients

    @property
    def chosen(self) -> str:
        if not (self.model or self.name):
            raise HttpError(400, "model is required", "model")
        return name_of(self.model or self.name or "")


class EmbedBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool = True  # accepted; an input over the model's limit is refused
    keep_alive: str | int | float | None = None


class LegacyEmbedBody(msgspec.Struct, kw_only=True):
    """Ollama's older /api/embeddings: one prompt, one vector, not normalized."""

    model: str
    prompt: str
    options: Options | None = None
    keep_alive: str | int | float | None = None


class PullBody(ModelBody):
    stream: bool = True
    insecure: bool = False  # Ollama's flag for registries without TLS; pulls here take http:// URLs as given


class CopyBody(msgspec.Struct):
    source: str
    destination: str


def name_of(model: str) -> str:
    return model.removesuffix(":latest")


DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER = -1.0


def keep_alive_seconds(keep_alive: str | int | float | None) -> float | None:
    """Ollama's ``keep_alive``: a number of seconds or a Go duration ("5m", "1h30m", "0"); any negative value keeps
    the model loaded (-1). None: the catalogue's idle TTL. A malformed one is a 400."""
    if keep_alive is None:
        return None
    if isinstance(keep_alive, int | float):
        return FOREVER if keep_alive < 0 else float(keep_alive)
    text = keep_alive.strip()
    sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    try:
        seconds = float(text)  # a bare number: seconds
    except ValueError:
        parts = DURATION.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            message = f"keep_alive {keep_alive!r} is not a duration (like 5m, 1h30m, 0, -1)"
            raise HttpError(400, message, "keep_alive", "invalid_value") from None
        seconds = sum(float(n) * UNIT_S[u] for n, u in parts)
    return FOREVER if sign < 0 and seconds > 0 else min(seconds, 10 * 365 * 86400.0)


def unloads(keep_alive: str | int | float | None) -> bool:
    """keep_alive 0: unload once answered."""
    return keep_alive_seconds(keep_alive) == 0
