"""The envelope codec and the error mapping, shared by the manager and every client."""

from __future__ import annotations

import msgpack
import pytest

from model_client import errors, protocol


def test_request_round_trip_keeps_payload_frames_out_of_msgpack() -> None:
    request = protocol.Request(
        op="chat", args={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, payloads=(b"\x00audio",)
    )
    frames = protocol.encode_request(request)
    assert frames[1] == b"\x00audio"
    assert b"audio" not in frames[0]
    decoded = protocol.decode_request(frames)
    assert decoded == request
    args = protocol.parse_args(decoded.op, decoded.args)
    assert isinstance(args, protocol.ChatArgs) and args.max_tokens == 256 and args.stream is False


def test_every_error_class_survives_the_wire() -> None:
    for code, cls in errors.ERRORS_BY_CODE.items():
        original = cls("went wrong", model="m")
        frames = protocol.encode_error("r1", original)
        reply = protocol.decode_reply(frames)
        rebuilt = errors.error_from_wire(reply.body)
        assert type(rebuilt) is cls and rebuilt.code == code
        assert rebuilt.message == "went wrong" and rebuilt.details == {"model": "m"}


def test_an_unknown_error_code_becomes_internal_and_keeps_the_code() -> None:
    rebuilt = errors.error_from_wire({"code": "quantum_flux", "message": "?"})
    assert isinstance(rebuilt, errors.InternalError) and rebuilt.details["code"] == "quantum_flux"


def test_envelope_errors_carry_the_request_id() -> None:
    with pytest.raises(errors.UnknownOp) as err:
        protocol.decode_request([msgpack.packb({"v": 1, "id": "abc", "op": "fly"})])
    assert err.value.request_id == "abc"


def test_chunks_are_not_final_and_results_are() -> None:
    chunk = protocol.decode_reply(protocol.encode_chunk("r", {"text": "a"}))
    result = protocol.decode_reply(protocol.encode_result("r", {"text": "a"}))
    assert not chunk.is_final and result.is_final
