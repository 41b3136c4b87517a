"""The envelope codec and the error mapping, shared by the manager and every client."""

from __future__ import annotations

import msgpack
import msgspec
import pytest

from model_client import errors, protocol
from model_manager import worker_protocol as wire


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


WORKER_OPS = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "seed": 7},
    "complete": {"model": "m", "prompt": "1, 2,", "max_tokens": 3},
    "embed": {"model": "m", "input": ["a", "b"], "normalize": False},
    "conversation.drop": {"model": "m", "conversation_id": "kitchen"},
    "transcribe": {"format": "pcm", "sample_rate": 8000},
    "synthesize": {"text": "Hello.", "voice": "joe", "speed": 1.5},
}


def test_a_run_carries_its_ops_typed_arguments_through_the_wire() -> None:
    for op, asked in WORKER_OPS.items():
        extra = {"audio": b"\x00\x01"} if op == "transcribe" else {}
        run = wire.Run(rid="7", args=wire.run_args(op, protocol.parse_args(op, asked), **extra))
        decoded = wire.decode_to_worker(wire.encode(run))
        assert isinstance(decoded, wire.Run) and decoded.op == op and decoded == run
        assert isinstance(decoded.args, protocol.OP_ARGS[op]), (
            "a run's struct is its op's, with the manager's additions"
        )
        assert msgspec.structs.asdict(decoded.args) == {
            **msgspec.structs.asdict(protocol.parse_args(op, asked)),
            **extra,
        }


def test_a_run_for_an_op_no_worker_serves_or_with_a_wrong_field_is_refused() -> None:
    good = msgspec.msgpack.decode(
        wire.encode(
            wire.Run(rid="1", args=wire.run_args("complete", protocol.parse_args("complete", WORKER_OPS["complete"])))
        )
    )
    for planted in (
        {**good["args"], "op": "status"},
        {**good["args"], "max_tokens": "3"},
        {**good["args"], "tools": []},
    ):
        with pytest.raises(msgspec.ValidationError):
            wire.decode_to_worker(msgspec.msgpack.encode({**good, "args": planted}))
