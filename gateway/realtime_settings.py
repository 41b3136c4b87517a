"""What ``session.update`` may change in a Realtime session, checked whole before any of it applies: a refused update
leaves the session exactly as it was (as OpenAI's does), and the refusal names the field, so a client never runs on
settings it did not ask for (a negative silence, a threshold of 7, audio at a rate this server does not take)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.audio_codecs import OPENAI_PCM_RATE

DEFAULT_VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    "interrupt_response": True,
}
MAX_VAD_MS = 10_000
MAX_INSTRUCTIONS = 256 * 1024
MAX_TOOLS = 128  # the manager's limit on a chat's tools
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# OpenAI's session fields this server takes without acting on them, at their off (or only served) values.
IGNORED = {
    "include": (None, []),
    "tracing": (None, "auto"),
    "truncation": (None, "auto"),
    "prompt": (None,),
}


class RealtimeError(Exception):
    """A client event refused: answered with an ``error`` event, and the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class Settings:
    """What a session's client chose (None: the persona's own)."""

    instructions: str | None = None
    voice: str | None = None
    speed: float = 1.0
    modalities: tuple[str, ...] = ("audio",)
    vad: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_VAD))
    tools: list[dict[str, Any]] = field(default_factory=list)  # as the Realtime API writes them (flat)
    tool_choice: str | dict[str, Any] = "auto"
    max_output_tokens: int | None = None


def _refuse(param: str, message: str, code: str = "invalid_value") -> RealtimeError:
    return RealtimeError(code, message, f"session.{param}")


def _object(value: Any, param: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``value`` if it is an object of ``keys`` only (``param``: its path under ``session``, "" for the session)."""
    if not isinstance(value, dict):
        raise _refuse(param, f"session.{param} must be an object")
    for key in value:
        if key not in keys:
            where = f"{param}.{key}" if param else str(key)
            raise _refuse(where, f"unknown parameter session.{where}", "unknown_parameter")
    return value


def _number(value: Any, param: str, low: float, high: float, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise _refuse(param, f"session.{param} must be {kind} from {low:g} to {high:g}, not {value!r}")
    return value


def _format(value: Any, param: str) -> None:
    """Audio is pcm16 at 24 kHz both ways: another encoding or rate would be misread, so it is refused."""
    fmt = _object(value, param, ("type", "rate"))
    if fmt.get("type", "audio/pcm") != "audio/pcm":
        raise _refuse(f"{param}.type", f"only audio/pcm is served, not {fmt.get('type')!r}")
    if fmt.get("rate", OPENAI_PCM_RATE) != OPENAI_PCM_RATE:
        raise _refuse(f"{param}.rate", f"audio/pcm is served at {OPENAI_PCM_RATE} Hz only, not {fmt.get('rate')!r}")


def _vad(value: Any, current: dict[str, Any] | None) -> dict[str, Any] | None:
    param = "audio.input.turn_detection"
    if value is None:
        return None
    detection = _object(value, param, (*DEFAULT_VAD, "idle_timeout_ms"))
    if detection.get("type", "server_vad") != "server_vad":
        raise _refuse(f"{param}.type", f"only server_vad is served, not {detection.get('type')!r}")
    _number(detection.get("threshold", 0.5), f"{param}.threshold", 0.0, 1.0)
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        _number(detection.get(name, 0), f"{param}.{name}", 0, MAX_VAD_MS, integer=True)
    for name in ("create_response", "interrupt_response"):
        if not isinstance(detection.get(name, True), bool):
            raise _refuse(f"{param}.{name}", f"session.{param}.{name} must be true or false")
    if detection.get("idle_timeout_ms") is not None:
        raise _refuse(f"{param}.idle_timeout_ms", "idle_timeout_ms is not served")
    detection = {k: v for k, v in detection.items() if k != "idle_timeout_ms"}
    return {**DEFAULT_VAD, **(current or {}), **detection, "type": "server_vad"}


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _refuse("tools", "session.tools must be a list of function tools")
    if len(value) > MAX_TOOLS:
        raise _refuse("tools", f"at most {MAX_TOOLS} tools")
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        tool = _object(tool, where, ("type", "name", "description", "parameters"))
        if tool.get("type") != "function":
            raise _refuse(f"{where}.type", "only function tools are served")
        if not isinstance(tool.get("name"), str) or not TOOL_NAME.match(tool["name"]):
            raise _refuse(f"{where}.name", "a tool's name is 1 to 64 letters, digits, _ or -")
        if not isinstance(tool.get("description", ""), str | None):
            raise _refuse(f"{where}.description", "a tool's description is a string")
        if not isinstance(tool.get("parameters", {}), dict | None):
            raise _refuse(f"{where}.parameters", "a tool's parameters are a JSON schema object")
    names = [tool["name"] for tool in value]
    if len(set(names)) != len(names):
        raise _refuse("tools", "two tools have the same name")
    return value


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    if value in ("auto", "none", "required"):
        return value
    choice = _object(value, "tool_choice", ("type", "name"))
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise _refuse("tool_choice", 'tool_choice is "auto", "none", "required" or {"type": "function", "name"}')
    if choice["name"] not in {tool["name"] for tool in tools}:
        raise _refuse("tool_choice", f"tool_choice names {choice['name']!r}, which is not among the session's tools")
    return choice


def _modalities(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not set(value) <= {"audio", "text"} or len(set(value)) < len(value):
        raise _refuse("output_modalities", f'output_modalities is ["audio"] or ["text"], not {value!r}')
    return ("text",) if value == ["text"] else ("audio",)


def updated(current: Settings, session: Any, model: str) -> Settings:
    """``current`` with the update applied, or a ``RealtimeError`` naming the first field refused."""
    if not isinstance(session, dict):
        raise RealtimeError("invalid_value", "session.update needs a session object", "session")
    known = ("type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice", "max_output_tokens")
    _object(session, "", (*known, *IGNORED))
    change: dict[str, Any] = {}
    if session.get("type", "realtime") != "realtime":
        raise _refuse("type", f"only realtime sessions are served, not {session.get('type')!r}")
    if session.get("model", model) != model:
        raise _refuse("model", f"the session's model is {model!r}, chosen on connecting")
    for name, served in IGNORED.items():
        if name in session and session[name] not in served:
            raise _refuse(name, f"session.{name} is not served (only {served!r})")
    if "instructions" in session:
        text = session["instructions"]
        if text is not None and (not isinstance(text, str) or len(text) > MAX_INSTRUCTIONS):
            raise _refuse("instructions", f"instructions are a string of at most {MAX_INSTRUCTIONS} characters")
        change["instructions"] = text or None
    if "output_modalities" in session:
        change["modalities"] = _modalities(session["output_modalities"])
    if "max_output_tokens" in session:
        limit = session["max_output_tokens"]
        change["max_output_tokens"] = (
            None if limit == "inf" else int(_number(limit, "max_output_tokens", 1, 4096, True))
        )
    if "audio" in session:
        audio = _object(session["audio"], "audio", ("input", "output"))
        inputs = ("format", "turn_detection", "transcription", "noise_reduction")
        source = _object(audio.get("input", {}), "audio.input", inputs)
        output = _object(audio.get("output", {}), "audio.output", ("format", "voice", "speed"))
        for where, part in (("audio.input", source), ("audio.output", output)):
            if "format" in part:
                _format(part["format"], f"{where}.format")
        for name in ("transcription", "noise_reduction"):
            if source.get(name) is not None and not isinstance(source[name], dict):
                raise _refuse(f"audio.input.{name}", f"session.audio.input.{name} must be an object or null")
        if "turn_detection" in source:
            change["vad"] = _vad(source["turn_detection"], current.vad)
        if "voice" in output:
            if not isinstance(output["voice"], str) or not 0 < len(output["voice"]) <= 256:
                raise _refuse("audio.output.voice", "a voice is a name")
            change["voice"] = output["voice"]
        if "speed" in output:
            change["speed"] = float(_number(output["speed"], "audio.output.speed", 0.25, 1.5))
    tools = _tools(session["tools"]) if "tools" in session else current.tools
    if "tools" in session:
        change["tools"] = tools
    choice = session.get("tool_choice", current.tool_choice)
    change["tool_choice"] = _tool_choice(choice, tools)
    return dataclasses.replace(current, **change)
