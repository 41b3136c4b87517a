"""docs/protocol.md stays true: every example decodes with the protocol module, every error code and op is
documented. (The error cases it shows are sent to a live manager by test_protocol_errors.py.)"""

from __future__ import annotations

import json
import re

import msgpack
import msgspec
import pytest

from model_client import protocol
from model_client.errors import InternalError
from model_client.results import chunk_from, completion_from
from personas.config import AGENT_OPS, TOPIC_REPLY
from personas.speech_services import STT_OPS, TOPIC_AUDIO, TOPIC_SAY, TOPIC_TRANSCRIPT, TTS_OPS, SayArgs
from tests.conftest import REPO

DOC_EXAMPLE = re.compile(r"```json (request|reply|event)\n(.*?)\n```", re.DOTALL)


def test_every_protocol_doc_example_decodes_with_the_protocol_module() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    # The error cases are sent to a live manager by test_protocol_errors.py; every other example must be valid.
    text = text[: text.index("## Errors by example")] + text[text.index("## Ops") :]
    examples = DOC_EXAMPLE.findall(text)
    kinds = {kind for kind, _ in examples}
    assert kinds == {"request", "reply", "event"} and len(examples) >= 8
    for kind, text in examples:
        envelope = msgpack.packb(json.loads(text))
        if kind == "request":
            op = json.loads(text)["op"]
            prefixes = {"stt.": STT_OPS, "tts.": TTS_OPS, "agent.": AGENT_OPS}
            ops = next((table for prefix, table in prefixes.items() if op.startswith(prefix)), protocol.OP_ARGS)
            request = protocol.decode_request([envelope], ops)
            protocol.parse_args(request.op, request.args, ops)
        elif kind == "reply":
            reply = protocol.decode_reply([envelope])
            assert reply.id and reply.body is not None
            typed_as_documented(reply)
        else:
            topic, body = protocol.decode_event([json.loads(text)["event"].encode(), envelope])
            assert topic in (
                protocol.EVENT_MODEL_LOADED,
                protocol.EVENT_MODEL_UNLOADED,
                protocol.EVENT_MODEL_FAILED,
                protocol.EVENT_HEARTBEAT,
                TOPIC_TRANSCRIPT,
                TOPIC_SAY,
                TOPIC_AUDIO,
                TOPIC_REPLY,
            )
            if topic == TOPIC_SAY:
                msgspec.convert({k: v for k, v in body.items() if k not in ("v", "event", "time")}, SayArgs)


def typed_as_documented(reply: protocol.Reply) -> None:
    """A generation's result and chunks decode into the typed structs and encode back to the very map shown."""
    if reply.type == protocol.REPLY_RESULT and "finish_reason" in reply.body:
        assert msgspec.to_builtins(completion_from(reply.body)) == reply.body
    elif reply.type == protocol.REPLY_CHUNK and set(reply.body) == {"text", "tokens"}:
        assert msgspec.to_builtins(chunk_from(reply.body)) == reply.body


def test_the_typed_check_sees_a_result_that_differs_from_its_struct() -> None:
    shown = {
        "text": "Hi",
        "finish_reason": "stop",
        "model": "m",
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        "timings": {"ttft_ms": 9.0, "total_ms": 9.0, "tokens_per_s": 0.0},
        "context": {"policy": "error", "dropped_messages": 0},
    }
    with pytest.raises(AssertionError):  # cached_tokens is always sent: a doc that leaves it out is caught
        typed_as_documented(protocol.Reply("r", protocol.REPLY_RESULT, shown))
    with pytest.raises(InternalError):
        typed_as_documented(protocol.Reply("r", protocol.REPLY_RESULT, {**shown, "finish_reason": "done"}))


def test_every_error_code_is_documented() -> None:
    from model_client.errors import ERROR_CODES

    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert all(f"| `{code}` |" in doc for code in ERROR_CODES)
    assert all(f"### `{op}`" in doc or f"`{op}` /" in doc or f"/ `{op}`" in doc for op in protocol.OPS)
