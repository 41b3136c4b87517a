"""The error cases docs/protocol.md shows, sent to the real manager: the code and the details keys must match."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import zmq

from tests.conftest import ManagerProcess

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
PAIR = re.compile(r"```json request( REQ)?\n(.*?)\n```\s*```json reply\n(.*?)\n```", re.DOTALL)


def documented_error_cases() -> list[tuple[bool, dict, dict]]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Errors by example") : text.index("## Ops")]
    return [(bool(req), json.loads(request), json.loads(reply)) for req, request, reply in PAIR.findall(section)]


def send(endpoint: str, envelope: dict, req_socket: bool) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ if req_socket else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        frames = [msgpack.packb(envelope)] if req_socket else [b"", msgpack.packb(envelope)]
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {envelope}"
        reply = sock.recv_multipart()
        return msgpack.unpackb(reply[-1], raw=False)
    finally:
        sock.close(linger=0)


def test_every_documented_error_case_is_what_the_manager_answers(manager: ManagerProcess) -> None:
    cases = documented_error_cases()
    assert len(cases) >= 10
    for req_socket, request, documented in cases:
        assert documented["type"] == "error", documented
        reply = send(manager.endpoint, request, req_socket)
        assert reply["id"] == request["id"] and reply["type"] == "error", (request, reply)
        assert reply["error"]["code"] == documented["error"]["code"], (request, reply)
        assert set(reply["error"]["details"]) == set(documented["error"]["details"]), (request, reply)
    assert manager.proc is not None and manager.proc.poll() is None
