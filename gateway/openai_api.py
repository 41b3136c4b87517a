"""OpenAI's API, the part local clients call: models, chat completions (streamed over SSE in OpenAI's order) and
completions. Requests are validated with msgspec: fields this gateway does not use (``user`` aside, ``n`` of 1,
penalties, ``logit_bias``, ...) are accepted and ignored, a wrong type is a 400 naming the field."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.body import decode, refuse_unserved
from gateway.errors import HttpError
from gateway.watch import CLIENT_CLOSED, unless_gone
from model_client.aio import ManagerLink
from model_client.results import Completion, TextChunk

# ----- requests -----------------------------------------------------------------------------------------------


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    # llama.cpp's sampling knobs, as llama-server and vLLM take them beside OpenAI's fields
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None  # one choice: the only count served
    # Accepted and ignored (docs/gateway.md), but typed: a wrong type is still a 400 naming the field.
    user: str | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # Refused when set (docs/gateway.md): no token probabilities are computed.
    top_logprobs: int | None = None


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ignored: one call a reply at most
    logprobs: bool | None = None  # refused when true
    modalities: list[Literal["text"]] | None = None  # text is the only output served
    audio: dict[str, Any] | None = None  # refused: no audio output from chat (use /v1/audio/speech)

    def unserved(self) -> None:
        refuse_unserved(self, "logprobs", "top_logprobs", "audio")


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None  # refused when above 0
    echo: bool = False  # refused when true
    suffix: str | None = None  # refused when given (no fill-in-the-middle)
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None  # refused above 1

    def unserved(self) -> None:
        refuse_unserved(self, "logprobs", "top_logprobs", "echo", "suffix", "best_of")


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]  # strings; token arrays are refused with a clear error
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None  # refused when given: the model's own size is served
    user: str | None = None


def generation_args(body: Sampling, conversation_id: str | None) -> dict[str, Any]:
    """The manager's arguments for the sampling fields the client set (the rest keep the manager's defaults)."""
    args: dict[str, Any] = {"model": body.model}
    if (limit := body.max_completion_tokens or body.max_tokens) is not None:
        args["max_tokens"] = limit
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
        if (value := getattr(body, name)) is not None:
            args[name] = value
    if body.stop:
        args["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    if conversation_id:
        args["conversation_id"] = conversation_id
    return args


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    pieces = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise HttpError(400, f"only text content parts are served, not {part.type!r}", f"messages[{index}].content")
        pieces.append(part.text)
    return "".join(pieces)


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    turn["content"] = _text(message, index)
    if message.tool_calls:
        turn["tool_calls"] = [
            {"id": c.get("id", ""), "type": "function", "function": c.get("function", {})} for c in message.tool_calls
        ]
    for name in ("tool_call_id", "name"):
        if (value := getattr(message, name)) is not None:
            turn[name] = value
    return turn


def chat_args(body: ChatRequest, conversation_id: str | None) -> dict[str, Any]:
    args = generation_args(body, conversation_id)
    args["messages"] = [_message(m, i) for i, m in enumerate(body.messages)]
    if body.tools:
        args["tools"] = body.tools
    if body.tool_choice is not None:
        args["tool_choice"] = body.tool_choice
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        args["json_schema"] = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise HttpError(400, "response_format json_schema needs json_schema.schema", "response_format")
        args["json_schema"] = fmt.json_schema.schema
    return args


def conversation_of(request: Request, body: Sampling) -> str | None:
    """``X-Conversation-Id``, else the ``user`` field: turn N of the same conversation reuses the KV cache."""
    return request.headers.get("x-conversation-id") or body.user or None


# ----- answers ------------------------------------------------------------------------------------------------


def usage_of(result: Completion) -> dict[str, Any]:
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_reason(result: Completion) -> str:
    reason = result.finish_reason
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_calls_of(result: Completion) -> list[dict[str, Any]]:
    return msgspec.to_builtins(result.tool_calls)


MARK = "\u0000text\u0000"  # where a delta's text goes in its pre-encoded chunk


def sse(data: dict[str, Any] | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else msgspec.json.encode(data)) + b"\n\n"


class OpenAI:
    """The ``/v1`` routes, bound to the manager link."""

    def __init__(self, link: ManagerLink) -> None:
        self.link = link

    async def models(self, request: Request) -> Response:
        catalogue = (await self.link.request("models", {}, timeout_s=5.0))["models"]
        return JSONResponse({"object": "list", "data": [model_object(m) for m in catalogue]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        catalogue = (await self.link.request("models", {}, timeout_s=5.0))["models"]
        for entry in catalogue:
            if entry["name"] == name:
                return JSONResponse(model_object(entry))
        raise HttpError(404, f"the model {name!r} does not exist", "model", "model_not_found")

    async def chat_completions(self, request: Request) -> Response:
        body = await decode(request, ChatRequest)
        body.unserved()
        args = chat_args(body, conversation_of(request, body))
        return await self._generate(request, body, "chat", args, "chat.completion")

    async def completions(self, request: Request) -> Response:
        body = await decode(request, CompletionRequest)
        body.unserved()
        args = generation_args(body, conversation_of(request, body))
        args["prompt"] = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        return await self._generate(request, body, "complete", args, "text_completion")

    async def embeddings(self, request: Request) -> Response:
        body = await decode(request, EmbeddingRequest)
        refuse_unserved(body, "dimensions")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(text, str) for text in texts):
            raise HttpError(400, "input must be a string or a list of strings (token arrays are not served)", "input")
        result = await self.link.request("embed", {"model": body.model, "input": texts})
        data = []
        for index, vector in enumerate(result["embeddings"]):
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI's SDK decodes it
                embedding: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = result["usage"]["prompt_tokens"]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": result["model"], "usage": usage})

    async def _generate(self, request: Request, body: Sampling, op: str, args: dict[str, Any], kind: str) -> Response:
        ident = ("chatcmpl-" if op == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.stream:  # streamed from the manager all the same: a client gone cancels it (gateway/watch.py)
            result = await unless_gone(request, self.link.completion(op, {**args, "stream": True}))
            if result is None:
                return Response(status_code=CLIENT_CLOSED)
            return JSONResponse(_whole(ident, created, kind, result))
        replies = self.link.generation(op, {**args, "stream": True})
        first = await anext(replies)  # an error before the first piece is an HTTP error, not a broken stream
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(ident, created, args["model"], kind, first, replies, usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


T = TypeVar("T")


def model_object(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry["name"], "object": "model", "created": 0, "owned_by": "model-manager", "kind": entry["kind"]}


def _whole(ident: str, created: int, kind: str, result: Completion) -> dict[str, Any]:
    if kind == "chat.completion":
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message.update(content=None, tool_calls=tool_calls_of(result))
        choice: dict[str, Any] = {"index": 0, "message": message}
    else:
        choice = {"index": 0, "text": result.text}
    choice.update(logprobs=None, finish_reason=finish_reason(result))
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": result.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage_of(result),
    }


async def _chunks(
    ident: str,
    created: int,
    model: str,
    kind: str,
    first: TextChunk | Completion,
    rest: AsyncIterator[TextChunk | Completion],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's order: a delta with the role, text deltas, a chunk with the finish reason, the usage chunk when
    asked for, then ``[DONE]``. An error after the stream began ends it with an error event."""
    chat = kind == "chat.completion"
    head = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}

    def piece(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish)
        return sse({**head, "system_fingerprint": None, "choices": [choice], **extra})

    # A text delta is the one chunk sent per token: its JSON around the text is made once, the text encoded alone.
    before, after = piece(MARK).split(msgspec.json.encode(MARK), 1)

    streamed = False
    try:
        if chat:
            yield piece(None, role=True)
        item = first
        while True:
            if isinstance(item, Completion):
                if item.tool_calls:  # a request with tools answers in its result only: its calls as one delta
                    deltas = [{"index": i, **call} for i, call in enumerate(tool_calls_of(item))]
                    choice = {"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}
                    yield sse({**head, "system_fingerprint": None, "choices": [choice], **extra})
                elif not streamed and item.text:
                    yield piece(item.text)
                yield piece(None, finish_reason(item))
                if include_usage:
                    yield sse({**head, "system_fingerprint": None, "choices": [], "usage": usage_of(item)})
                yield sse("[DONE]")
                return
            if item.text:
                streamed = True
                yield before + msgspec.json.encode(item.text) + after
            item = await anext(rest)
    except Exception as exc:  # the manager failed mid-stream: say so in the stream's own terms
        message = getattr(exc, "message", str(exc))
        yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
    finally:
        await rest.aclose()
