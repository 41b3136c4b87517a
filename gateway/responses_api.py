"""OpenAI's Responses API: ``POST /v1/responses`` (streamed as its typed events too), ``GET`` and ``DELETE
/v1/responses/{id}``.

A response is a chat turn on the manager. With ``previous_response_id`` the request continues that response's
conversation: its messages (stored, see ``response_store``) and its manager ``conversation_id``, so the model's KV
cache holds the history and only the new input is evaluated (``usage.input_tokens_details.cached_tokens``). Function
tools work as in chat completions (a call is an output item; its result comes back as a ``function_call_output``
item). What is not served (hosted tools, images, files, background mode, server-side conversations) is a 400
naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.body import decode, refuse_unserved
from gateway.errors import HttpError
from gateway.response_store import ResponseStore, StoredResponse
from gateway.watch import CLIENT_CLOSED, unless_gone
from model_client.aio import ManagerLink
from model_client.results import Completion, TextChunk


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None
    description: str | None = None


class TextOptions(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted, ignored


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextOptions | None = None
    metadata: dict[str, str] | None = None
    # Accepted and ignored: one call a reply at most, no reasoning models, no truncation beyond the model's policy.
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    user: str | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    # Refused when set.
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    max_tool_calls: int | None = None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HttpError(400, f"{where} must be a string or a list of text parts", where)
    pieces = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise HttpError(400, f"only text parts are served, not {kind!r}", f"{where}[{index}]")
        pieces.append(str(part.get("text") or ""))
    return "".join(pieces)


def input_messages(items: str | list[dict[str, Any]], tool_names: dict[str, str]) -> list[dict[str, Any]]:
    """The request's input as the manager's chat messages: text messages, replayed function calls, and function
    results (named from the calls they answer)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise HttpError(400, f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            text = _content_text(item.get("content"), f"{where}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call_id, name = str(item.get("call_id") or ""), str(item.get("name") or "")
            tool_names[call_id] = name
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": item.get("arguments")}}
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = str(item.get("call_id") or "")
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            turn = {"role": "tool", "content": text, "tool_call_id": call_id}
            if call_id in tool_names:
                turn["name"] = tool_names[call_id]
            messages.append(turn)
        else:
            raise HttpError(400, f"input items of type {kind!r} are not served", f"{where}.type")
    return messages


def _tools(body: ResponsesRequest) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if body.tools:
        tools = []
        for index, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise HttpError(400, f"only function tools are served, not {tool.get('type')!r}", f"tools[{index}]")
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
            tools.append({"type": "function", "function": function})
        args["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise HttpError(400, "tool_choice must be auto, none, required or a function by name", "tool_choice")
        args["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        args["tool_choice"] = choice
    return args


def _output(result: Completion) -> list[dict[str, Any]]:
    if result.tool_calls:
        return [
            {
                "type": "function_call",
                "id": _new_id("fc"),
                "call_id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
                "status": "completed",
            }
            for call in result.tool_calls
        ]
    return [_message_item(_new_id("msg"), result.text, "completed")]


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


class Responses:
    """The ``/v1/responses`` routes, bound to the manager link and the store."""

    def __init__(self, link: ManagerLink, store: ResponseStore) -> None:
        self.link, self.store = link, store

    async def create(self, request: Request) -> Response:
        body = await decode(request, ResponsesRequest)
        refuse_unserved(body, "background", "conversation", "prompt")
        previous = None
        if body.previous_response_id is not None:
            previous = self.store.get(body.previous_response_id)
            if previous is None:
                message = f"no stored response {body.previous_response_id!r}"
                raise HttpError(404, message, "previous_response_id", "response_not_found")
        tool_names = dict(previous.tool_names) if previous else {}
        history = [*(previous.messages if previous else []), *input_messages(body.input, tool_names)]
        if not history:
            raise HttpError(400, "input is empty", "input")
        response_id = _new_id("resp")
        conversation_id = previous.conversation_id if previous else f"responses:{response_id}"
        args = self._args(body, history, conversation_id)
        turn = _Turn(self, body, response_id, conversation_id, history, tool_names)
        if not body.stream:  # streamed from the manager all the same: a client gone cancels it
            result = await unless_gone(request, self.link.completion("chat", args))
            if result is None:
                return Response(status_code=CLIENT_CLOSED)
            return JSONResponse(turn.finish(result, _output(result)))
        items = self.link.generation("chat", args)
        first = await anext(items)  # an error before the first piece is an HTTP error, not a broken stream
        return StreamingResponse(
            turn.events(first, items), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def retrieve(self, request: Request) -> Response:
        stored = self.store.get(request.path_params["response_id"])
        if stored is None:
            raise HttpError(404, f"no stored response {request.path_params['response_id']!r}", None, "not_found")
        return JSONResponse(stored.response)

    async def delete(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if not self.store.delete(response_id):
            raise HttpError(404, f"no stored response {response_id!r}", None, "not_found")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    @staticmethod
    def _args(body: ResponsesRequest, history: list[dict[str, Any]], conversation_id: str) -> dict[str, Any]:
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + history
        args: dict[str, Any] = {"model": body.model, "messages": messages, "conversation_id": conversation_id}
        args["stream"] = True
        if body.max_output_tokens is not None:
            args["max_tokens"] = body.max_output_tokens
        for name in ("temperature", "top_p"):
            if (value := getattr(body, name)) is not None:
                args[name] = value
        fmt = body.text.format if body.text else None
        if fmt is not None and fmt.type == "json_object":
            args["json_schema"] = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema is None:
                raise HttpError(400, "text.format json_schema needs a schema", "text.format.schema")
            args["json_schema"] = fmt.schema
        return {**args, **_tools(body)}


class _Turn:
    """One response in the making: its object, its events when streamed, and what is stored at its end."""

    def __init__(
        self,
        api: Responses,
        body: ResponsesRequest,
        response_id: str,
        conversation_id: str,
        history: list[dict[str, Any]],
        tool_names: dict[str, str],
    ) -> None:
        self.api, self.body, self.id = api, body, response_id
        self.conversation_id, self.history, self.tool_names = conversation_id, history, tool_names
        self.created = int(time.time())
        self.sequence = 0

    def snapshot(self, status: str, output: list[dict[str, Any]], result: Completion | None = None) -> dict[str, Any]:
        body = self.body
        response: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": body.previous_response_id,
            "store": body.store,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "text": {"format": {"type": "text"}},
            "metadata": body.metadata or {},
            "usage": None,
        }
        if result is not None:
            usage = result.usage
            response["usage"] = {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            }
            response["completed_at"] = int(time.time())
            if result.finish_reason == "length":
                response["status"] = "incomplete"
                response["incomplete_details"] = {"reason": "max_output_tokens"}
        return response

    def finish(self, result: Completion, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The finished response; stored (with the conversation, the reply included) unless ``store`` is false."""
        response = self.snapshot("completed", output, result)
        if self.body.store:
            reply: dict[str, Any] = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                reply["tool_calls"] = msgspec.to_builtins(result.tool_calls)
                self.tool_names.update({call.id: call.function.name for call in result.tool_calls})
            stored = StoredResponse(
                response=response,
                conversation_id=self.conversation_id,
                messages=[*self.history, reply],
                tool_names=self.tool_names,
            )
            self.api.store.put(self.id, stored)
        return response

    def event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    async def events(
        self, first: TextChunk | Completion, rest: AsyncIterator[TextChunk | Completion]
    ) -> AsyncIterator[bytes]:
        """OpenAI's order: created, in progress; for text an output item, its content part, text deltas, then each
        of them done; for a function call its item with the arguments; then completed."""
        yield self.event("response.created", response=self.snapshot("in_progress", []))
        yield self.event("response.in_progress", response=self.snapshot("in_progress", []))
        message_id = _new_id("msg")
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}
        opened = False
        try:
            item = first
            while isinstance(item, TextChunk):
                if item.text:
                    if not opened:
                        opened = True
                        yield self.event(
                            "response.output_item.added",
                            output_index=0,
                            item=_message_item(message_id, None, "in_progress"),
                        )
                        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        yield self.event("response.content_part.added", **where, part=part)
                    yield self.event("response.output_text.delta", **where, delta=item.text, logprobs=[])
                item = await anext(rest)
        except Exception as exc:  # the manager failed mid-stream: say so in the stream's own terms
            message = getattr(exc, "message", str(exc))
            yield self.event("error", code=getattr(exc, "code", None), message=message, param=None)
            await rest.aclose()
            return
        result = item
        if result.tool_calls:
            output = _output(result)
            for index, call in enumerate(output):
                yield self.event("response.output_item.added", output_index=index, item={**call, "arguments": ""})
                common = {"item_id": call["id"], "output_index": index}
                yield self.event("response.function_call_arguments.delta", **common, delta=call["arguments"])
                yield self.event(
                    "response.function_call_arguments.done", **common, name=call["name"], arguments=call["arguments"]
                )
                yield self.event("response.output_item.done", output_index=index, item=call)
        else:
            full = result.text  # the whole text, as the streamed deltas added up
            if not opened:
                yield self.event(
                    "response.output_item.added", output_index=0, item=_message_item(message_id, None, "in_progress")
                )
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self.event("response.content_part.added", **where, part=part)
                if full:
                    yield self.event("response.output_text.delta", **where, delta=full, logprobs=[])
            yield self.event("response.output_text.done", **where, text=full, logprobs=[])
            part = {"type": "output_text", "text": full, "annotations": [], "logprobs": []}
            yield self.event("response.content_part.done", **where, part=part)
            output = [_message_item(message_id, full, "completed")]
            yield self.event("response.output_item.done", output_index=0, item=output[0])
        response = self.finish(result, output)
        done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield self.event(done, response=response)
