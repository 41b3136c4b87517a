"""Property: whatever arrives on the request socket, the daemon stays up and keeps answering correctly.

Hypothesis throws envelopes with arbitrary fields, types and sizes, well-formed envelopes of every op with
arbitrary arguments, and raw garbage frames (with and without the delimiter) at the real daemon. After each
batch it must answer ``ping``; every few batches a real greedy ``chat`` must give the same text as before.
Bounded in examples and time so the suite stays fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_client import ModelClient, protocol
from tests.conftest import GREEDY, ManagerProcess

INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=64),
    st.binary(max_size=64),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.one_of(st.text(max_size=12), INTS), inner, max_size=6)
    ),
    max_leaves=20,
)
# Model names the catalogue does not hold, so no fuzz example can make the daemon load (and time) a model.
STRANGE_MODELS = st.text(min_size=1, max_size=40).filter(lambda n: n not in ("smollm2", "gemma3-270m"))
ARGS = st.dictionaries(
    st.sampled_from(
        [
            "model",
            "messages",
            "prompt",
            "max_tokens",
            "stream",
            "temperature",
            "text",
            "voice",
            "format",
            "sample_rate",
            "conversation_id",
            "language",
            "stop",
            "seed",
            "top_k",
            "cache",
            "speed",
        ]
    ),
    VALUES,
    max_size=6,
).map(lambda args: {**args, "model": args["model"]} if isinstance(args.get("model"), str) else args)
ENVELOPES = st.one_of(
    st.dictionaries(st.text(max_size=8), VALUES, max_size=6),
    st.fixed_dictionaries(
        {
            "v": st.one_of(st.just(1), VALUES),
            "id": st.one_of(st.text(min_size=1, max_size=20), VALUES),
            "op": st.one_of(st.sampled_from(list(protocol.OPS)), st.text(max_size=20)),
            "args": st.one_of(ARGS, VALUES),
        },
        optional={"deadline_ms": VALUES, "priority": VALUES, "extra": VALUES},
    ),
)
VALID_OPS = st.builds(
    lambda op, args, model: {"v": 1, "id": "fuzz", "op": op, "args": {**args, "model": model}},
    st.sampled_from([op for op in protocol.OPS if op not in ("load", "unload")]),
    ARGS,
    STRANGE_MODELS,
)
FRAMES = st.one_of(
    ENVELOPES.map(lambda e: [b"", msgpack.packb(e, use_bin_type=True)]),
    VALID_OPS.map(lambda e: [b"", msgpack.packb(e, use_bin_type=True)]),
    st.lists(st.binary(max_size=512), min_size=1, max_size=4),  # garbage, maybe without the delimiter
    st.lists(st.binary(max_size=64), max_size=3).map(lambda rest: [b"", *rest]),
    st.binary(min_size=1, max_size=4096).map(lambda blob: [b"", blob, blob]),
)


@pytest.fixture(scope="module")
def reference(manager: ManagerProcess) -> Iterator[tuple[ModelClient, str]]:
    with manager.client(timeout=30) as client:
        expected = client.chat("smollm2", [{"role": "user", "content": "Say hello."}], max_tokens=8, **GREEDY).text
        yield client, expected


CHECKS = {"batches": 0}


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(FRAMES, min_size=1, max_size=8))
def test_arbitrary_frames_never_hurt_the_daemon(
    manager: ManagerProcess, reference: tuple[ModelClient, str], batch: list[list[bytes]]
) -> None:
    client, expected = reference
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    try:
        for frames in batch:
            sock.send_multipart(frames)
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:  # read what comes back; whatever does must be a valid reply
            if sock.poll(20):
                reply = sock.recv_multipart()
                # Frames a client puts before its empty delimiter are its return route (zguide envelopes): they
                # come back as they were, then the delimiter, then a valid reply envelope.
                body = reply[reply.index(b"") + 1 :]
                assert protocol.decode_reply(body).type in ("result", "error", "chunk")
    finally:
        sock.close(linger=0)
    assert manager.proc is not None and manager.proc.poll() is None, manager.log_tail()
    assert client.ping(timeout=5)["pong"] is True
    CHECKS["batches"] += 1
    if CHECKS["batches"] % 10 == 0:
        again = client.chat("smollm2", [{"role": "user", "content": "Say hello."}], max_tokens=8, **GREEDY).text
        assert again == expected
