"""Bad input and faults against the real daemon: each gets its typed error, and the next request still works."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import pytest
import zmq

from model_client import (
    BadRequest,
    Busy,
    ContextOverflow,
    ModelClient,
    ModelFailed,
    ModelLoadFailed,
    ModelNotFound,
    Timeout,
    UnknownOp,
    UnsupportedVersion,
    protocol,
)
from tests.conftest import GREEDY, ManagerProcess, collect_events, model_status, subscriber, wait_for

QUESTION = [{"role": "user", "content": "Name a colour."}]


def assert_still_serving(manager: ManagerProcess) -> None:
    """The daemon is up, and a fresh client gets a real answer."""
    with manager.client(timeout=60) as c:
        assert c.ping()["pong"]
        assert c.chat("smollm2", QUESTION, max_tokens=4, **GREEDY).text


@pytest.fixture
def dealer(manager: ManagerProcess):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    yield sock
    sock.close()


def raw_exchange(sock: zmq.Socket, *frames: bytes) -> protocol.Reply:
    sock.send_multipart([b"", *frames])
    assert sock.poll(10_000), "the daemon answers malformed input instead of hanging"
    return protocol.decode_reply(sock.recv_multipart()[1:])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1\xff garbage \x00", "bad_request"),
        (msgpack.packb([1, "id", "ping"]), "bad_request"),
        (msgpack.packb({"v": 1, "op": "ping"}), "bad_request"),
        (msgpack.packb({"v": 1, "id": "x", "op": 7}), "bad_request"),
        (msgpack.packb({"v": 1, "id": "x", "op": "ping", "args": []}), "bad_request"),
        (msgpack.packb({"v": 1, "id": "x", "op": "ping", "extra": 1}), "bad_request"),
        (msgpack.packb({"v": 99, "id": "x", "op": "ping"}), "unsupported_version"),
        (msgpack.packb({"v": 1, "id": "x", "op": "teleport"}), "unknown_op"),
        (msgpack.packb({"v": 1, "id": "x", "op": "chat", "args": {"model": "smollm2"}}), "bad_request"),
        (msgpack.packb({"v": 1, "id": "x", "op": "chat", "args": {"model": 5, "messages": []}}), "bad_request"),
        (msgpack.packb({"v": 1, "id": "x", "op": "ping", "args": {"surprise": True}}), "bad_request"),
        (msgpack.packb({1: 2}), "bad_request"),
    ],
    ids=[
        "garbage",
        "list-envelope",
        "no-id",
        "op-not-string",
        "args-not-map",
        "unknown-envelope-field",
        "future-version",
        "unknown-op",
        "missing-messages",
        "model-not-string",
        "unknown-arg",
        "int-keys",
    ],
)
def test_malformed_envelopes_get_typed_errors(manager, dealer, frame: bytes, code: str) -> None:
    reply = raw_exchange(dealer, frame)
    assert reply.type == "error"
    assert reply.body["code"] == code
    assert reply.body["message"]
    assert_still_serving(manager)


def test_errors_name_the_wrong_field(dealer) -> None:
    envelope = {
        "v": 1,
        "id": "typed",
        "op": "chat",
        "args": {"model": "smollm2", "messages": QUESTION, "max_tokens": "ten"},
    }
    reply = raw_exchange(dealer, msgpack.packb(envelope))
    assert reply.id == "typed" and reply.body["code"] == "bad_request"
    assert "max_tokens" in reply.body["message"]


def test_typed_exceptions_in_the_client(client: ModelClient) -> None:
    with pytest.raises(ModelNotFound) as err:
        client.chat("no-such-model", QUESTION)
    assert "smollm2" in err.value.details["available"]
    with pytest.raises(UnknownOp):
        client.request("teleport")
    with pytest.raises(BadRequest, match="max_tokens"):
        client.chat("smollm2", QUESTION, max_tokens=0)
    with pytest.raises(BadRequest, match="over the limit"):
        client.chat("smollm2", QUESTION, max_tokens=100_000)
    with pytest.raises(BadRequest, match="temperature"):
        client.chat("smollm2", QUESTION, temperature="hot")
    with pytest.raises(BadRequest, match="role"):
        client.chat("smollm2", [{"role": "wizard", "content": "hi"}])
    with pytest.raises(UnsupportedVersion):
        raise protocol.decode_request([msgpack.packb({"v": 2, "id": "a", "op": "ping"})])  # same code path, no daemon


def test_prompt_longer_than_the_context(manager: ManagerProcess, client: ModelClient) -> None:
    long_text = "word " * 400
    with pytest.raises(ContextOverflow) as err:
        client.chat("smollm2-small-ctx", [{"role": "user", "content": long_text}], max_tokens=4)
    # llama.cpp pads the context up to its granularity (256), and the error reports the real size.
    assert err.value.details["prompt_tokens"] >= err.value.details["n_ctx"] >= 128
    assert model_status(client, "smollm2-small-ctx")["n_ctx"] == err.value.details["n_ctx"]
    reply = client.chat("smollm2-small-ctx", QUESTION, max_tokens=4)
    assert reply.text, "the same model serves the next request"
    assert_still_serving(manager)


@pytest.mark.parametrize("model", ["corrupt", "truncated", "missing"])
def test_broken_model_files_fail_to_load_with_a_typed_error(manager: ManagerProcess, model: str) -> None:
    with manager.client(timeout=60) as c:
        with pytest.raises(ModelLoadFailed):
            c.chat(model, QUESTION, max_tokens=4)
        status = model_status(c, model)
        assert status["state"] == "failed"
        assert status["last_error"]["code"] == "model_load_failed"
        with pytest.raises(ModelLoadFailed):
            c.load(model)  # asked again: tried again, fails again, clearly
    assert_still_serving(manager)


def test_oversize_messages_are_dropped_and_others_are_unaffected(manager: ManagerProcess, dealer) -> None:
    limit = manager.config["limits"]["max_message_bytes"]
    envelope = msgpack.packb({"v": 1, "id": "big", "op": "chat", "args": {"model": "smollm2", "messages": QUESTION}})
    dealer.send_multipart([b"", envelope, b"\0" * (limit + 1)])
    assert not dealer.poll(1000), "ZeroMQ drops an oversize message: no reply"
    assert_still_serving(manager)


def test_full_queue_answers_busy_at_once(manager: ManagerProcess, dealer) -> None:
    """``smollm2-short-queue`` queues 2; of 8 requests sent at once, the overflow is refused immediately, and the
    event stream says so once (at most one ``request.shed`` a second per model)."""
    events = subscriber(manager.events_endpoint, "request.", heartbeat=protocol.EVENT_HEARTBEAT)
    sent_at = time.monotonic()
    for i in range(8):
        request = protocol.Request(
            op="chat", args={"model": "smollm2-short-queue", "messages": QUESTION, "max_tokens": 4}, id=f"q{i}"
        )
        dealer.send_multipart([b"", *protocol.encode_request(request)])
    codes: dict[str, str] = {}
    busy_within: list[float] = []
    while len(codes) < 8:
        assert dealer.poll(60_000)
        reply = protocol.decode_reply(dealer.recv_multipart()[1:])
        codes[reply.id] = reply.body["code"] if reply.type == "error" else "ok"
        if codes[reply.id] == "busy":
            busy_within.append(time.monotonic() - sent_at)
    assert list(codes.values()).count("busy") >= 4
    assert list(codes.values()).count("ok") >= 2
    assert set(codes.values()) <= {"ok", "busy"}
    assert max(busy_within) < 2.0, "busy comes back at once, it is not a hang"
    shed = [e for e in collect_events(events, time.monotonic() + 0.5) if e.get("event") == "request.shed"]
    events.close()
    assert shed and shed[0]["model"] == "smollm2-short-queue" and "queued" in shed[0]["reason"], shed
    assert len(shed) <= 1 + (time.monotonic() - sent_at), "one event a second at most, however many are refused"
    outcomes: list = []

    def ask() -> None:
        with manager.client(timeout=60) as c:
            outcomes.append(_try(lambda: c.chat("smollm2-short-queue", QUESTION, max_tokens=16)))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(isinstance(o, Busy) for o in outcomes), "the client raises the typed Busy error"
    assert_still_serving(manager)


def _try(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_worker_killed_mid_request(fresh_manager: ManagerProcess) -> None:
    """SIGKILL of a worker: its request gets model_failed; other models carry on; the next request works."""
    with fresh_manager.client(timeout=60) as c:
        other = c.load("gemma3-270m")
        c.load("smollm2")
        victim = model_status(c, "smollm2")["pid"]
        stream = c.chat("smollm2", QUESTION, stream=True, max_tokens=400, **GREEDY)
        pieces = iter(stream)
        next(pieces)  # generation has started
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ModelFailed):
            for _ in pieces:
                pass
        status = model_status(c, "smollm2")
        assert status["state"] == "failed" and status["last_error"]["code"] == "model_failed"
        assert model_status(c, "gemma3-270m")["pid"] == other["pid"], "the other model's worker is untouched"
        assert c.chat("gemma3-270m", QUESTION, max_tokens=4).usage.completion_tokens >= 1
        reply = c.chat("smollm2", QUESTION, max_tokens=4)
        assert reply.text
        assert model_status(c, "smollm2")["pid"] not in (None, victim)


def test_client_retries_until_the_daemon_is_back(fresh_manager: ManagerProcess) -> None:
    """Lazy Pirate: a safe request sent while the daemon is down succeeds once it is restarted."""
    assert fresh_manager.stop() == 0
    restart = threading.Timer(1.5, fresh_manager.start, kwargs={"wait": False})
    restart.start()
    try:
        with fresh_manager.client(timeout=1.0, retries=90) as c:  # the restart may take a minute on a busy machine
            status = c.status()
        assert status["manager"]["pid"] == fresh_manager.proc.pid
    finally:
        restart.join()


def test_sigterm_shuts_down_cleanly(fresh_manager: ManagerProcess) -> None:
    with fresh_manager.client() as c:
        c.load("smollm2")
        worker = model_status(c, "smollm2")["pid"]
    assert fresh_manager.stop(signal.SIGTERM) == 0
    for name in ("manager.sock", "events.sock", "workers.sock"):
        assert not (fresh_manager.run_dir / name).exists(), f"{name} is removed"
    assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z"
    assert '"event": "manager_stopped"' in fresh_manager.log_path.read_text()


def test_sigterm_lets_the_request_in_flight_finish(fresh_manager: ManagerProcess) -> None:
    with fresh_manager.client(timeout=60) as c:
        c.load("smollm2")
        result: list = []
        thread = threading.Thread(
            target=lambda: result.append(_try(lambda: fresh_manager.client().chat("smollm2", QUESTION, max_tokens=8)))
        )
        thread.start()
        wait_for(lambda: model_status(c, "smollm2")["in_flight"] == 1, timeout=60, interval=0.01)
    fresh_manager.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert result and not isinstance(result[0], Exception), result
    assert fresh_manager.proc.wait(20) == 0


def test_a_request_past_its_time_limit_gets_timeout(run_dir) -> None:
    from tests.conftest import base_config

    config = base_config(run_dir)
    # 10 s: a fresh worker's first short chat takes about 0.2 s on a quiet machine, 2 s beside a CPU hog and over 5 s
    # on a machine busier still, while greedy counting to 2,000 tokens takes half a minute even quiet (a short answer
    # could end within the limit).
    config["limits"]["request_timeout_s"] = 10.0
    config["limits"]["max_tokens"] = 2000
    manager = ManagerProcess(run_dir, config)
    manager.start()
    try:
        with manager.client(timeout=120) as c:
            c.load("smollm2")
            with pytest.raises(Timeout) as err:
                c.complete("smollm2", "1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=2000, **GREEDY)
            assert err.value.details["limit_s"] == 10.0
            assert c.chat("smollm2", QUESTION, max_tokens=2).usage.completion_tokens >= 1, (
                "a fresh worker serves the next one"
            )
    finally:
        code = manager.stop()
        assert code == 0, f"the manager ended with {code} (-9: it did not stop within 20 s)\n{manager.log_tail(80)}"


def test_a_fault_while_answering_an_error_leaves_the_daemon_serving(run_dir) -> None:
    """A bug in an error path (planted: answering the error raises) is answered ``internal``; the daemon, and the
    client beside it, go on."""
    from tests.conftest import base_config

    manager = ManagerProcess(run_dir, base_config(run_dir))
    manager.module = "tests.planted_fault_manager"
    manager.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    try:
        for request_id in ("plant-1", "plant-2"):  # an unknown model's error, twice: the guard is not one-shot
            request = protocol.Request(op="load", args={"model": "no-such-model"}, id=request_id)
            reply = raw_exchange(sock, *protocol.encode_request(request))
            assert reply.id == request_id
            assert reply.type == protocol.REPLY_ERROR and reply.body["code"] == "internal", reply
        assert manager.proc is not None and manager.proc.poll() is None, manager.log_tail()
        with manager.client(timeout=60) as c, pytest.raises(ModelNotFound):
            c.load("no-such-model")  # the same error path, unplanted, answers its own typed error
        assert_still_serving(manager)
        assert "client_message_crashed" in manager.log_path.read_text()
    finally:
        sock.close()
        assert manager.stop() == 0, manager.log_tail(80)


def test_a_shutdown_that_hangs_ends_within_its_bound(run_dir, monkeypatch) -> None:
    """SIGTERM bounds the whole shutdown: with the workers' ending planted to hang for ever, the manager still ends,
    at its bound (the requests' grace, the workers' exit time and a little more), and its log shows where it hung."""
    from tests.conftest import base_config

    config = base_config(run_dir)
    config["manager"]["unload_timeout_s"] = 1.0
    manager = ManagerProcess(run_dir, config)
    manager.module = "tests.planted_fault_manager"
    monkeypatch.setenv("MM_PLANT", "shutdown_hang")
    manager.start()
    with manager.client(timeout=60) as c:
        c.load("smollm2")
    assert manager.proc is not None
    manager.proc.send_signal(signal.SIGTERM)
    code = manager.proc.wait(timeout=120)  # the bound is 9 s; generous for a busy machine
    log = manager.log_path.read_text()
    assert code != 0 and "hanging_close" in log, log[-3000:]
    assert "manager_stopped" not in log
