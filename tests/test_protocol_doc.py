"""docs/protocol.md stays true: every example decodes with the protocol module, every error code and op is
documented. (The error cases it shows are sent to a live manager by test_protocol_errors.py.)"""

from __future__ import annotations

import json
import re

import msgpack
import msgspec

from agents.config import AGENT_OPS, TOPIC_REPLY
from model_client import protocol
from services.config import STT_OPS, TOPIC_AUDIO, TOPIC_SAY, TOPIC_TRANSCRIPT, TTS_OPS, SayArgs
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


def test_every_error_code_is_documented() -> None:
    from model_client.errors import ERROR_CODES

    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert all(f"| `{code}` |" in doc for code in ERROR_CODES)
    assert all(f"### `{op}`" in doc or f"`{op}` /" in doc or f"/ `{op}`" in doc for op in protocol.OPS)
