"""Tool calling on any GGUF chat model: the tools are described in the system prompt, and the reply is sampled
under a JSON schema made from their ``parameters``, so a call always names a given function and its arguments
always validate. With ``auto`` the schema also allows ``{"content": "..."}``, a plain answer.

``prepare`` turns a chat request with tools into one the engines already serve (messages and a ``json_schema``);
``finish`` turns the JSON the model wrote back into ``tool_calls`` or text. A reply that is a JSON object is not
useful to stream piece by piece, so a request with tools answers in its final result only.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgspec

from model_client.errors import BadRequest
from model_client.protocol import CalledFunction, Message, ToolCall, ToolChoice, ToolFunction
from model_client.results import Completion
from model_manager.worker_protocol import ChatRun, GenerationRun

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def active(args: GenerationRun) -> bool:
    return isinstance(args, ChatRun) and bool(args.tools) and args.tool_choice != "none"


def _chosen(args: ChatRun) -> list[ToolFunction]:
    tools = [tool.function for tool in args.tools or []]
    choice = args.tool_choice
    if isinstance(choice, ToolChoice):
        name = choice.function.name
        picked = [f for f in tools if f.name == name]
        if not picked:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", field="tool_choice")
        return picked
    return tools


def _schema(functions: list[ToolFunction], answer_allowed: bool) -> dict[str, Any]:
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters or ANY_OBJECT},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    if answer_allowed:
        options.append(
            {
                "type": "object",
                "properties": {"content": {"type": "string"}},
                "required": ["content"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def _instructions(functions: list[ToolFunction], answer_allowed: bool) -> str:
    lines = ['You can call functions. Reply with one JSON object: {"name": "<function>", "arguments": {...}}']
    if answer_allowed:
        lines[0] += ', or, when no function is needed, {"content": "<your answer>"}'
    lines.append("Functions:")
    for f in functions:
        parameters = json.dumps(f.parameters or ANY_OBJECT)
        lines.append(f"- {f.name}: {f.description} Arguments: {parameters}")
    return "\n".join(lines)


def _as_text(message: Message) -> Message:
    """History the chat templates know: a call as the JSON the model wrote, a tool's result as a user turn."""
    if message.role == "assistant" and message.tool_calls:
        call = message.tool_calls[0].function
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments
        return Message(role="assistant", content=json.dumps({"name": call.name, "arguments": arguments}))
    if message.role == "tool":
        who = message.name or "the function"
        return Message(role="user", content=f"Result of {who}: {message.content}")
    return Message(role=message.role, content=message.content)


def prepare(args: ChatRun) -> ChatRun:
    """The request as the engines serve it: tool turns as text and, with tools active, their instructions added to
    the system prompt and the reply's schema set."""
    messages = [_as_text(m) for m in args.messages]
    if not active(args):
        return msgspec.structs.replace(args, messages=messages)
    functions = _chosen(args)
    answer_allowed = args.tool_choice in (None, "auto")
    text = _instructions(functions, answer_allowed)
    if messages and messages[0].role == "system":
        messages[0] = Message(role="system", content=f"{messages[0].content}\n\n{text}")
    else:
        messages.insert(0, Message(role="system", content=text))
    schema = _schema(functions, answer_allowed)
    return msgspec.structs.replace(args, messages=messages, json_schema=schema, stream=False)


def finish(args: GenerationRun, result: Completion) -> Completion:
    """A reply written under the tools' schema, as ``tool_calls`` (finish reason ``tool_calls``) or as text."""
    if not active(args):
        return result
    try:
        written = json.loads(result.text)
    except ValueError:  # cut short (max_tokens, a stop): left as the text it is
        return result
    if isinstance(written, dict) and "name" in written:
        call = CalledFunction(str(written["name"]), json.dumps(written.get("arguments", {})))
        result.tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=call)]
        result.text, result.finish_reason = "", "tool_calls"
    elif isinstance(written, dict) and isinstance(written.get("content"), str):
        result.text = written["content"]
    return result
