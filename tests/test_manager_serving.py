"""Serving over the real daemon with real models: chat, streaming, concurrency, parallel models, load on demand."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import zmq

from model_client import Completion, ModelClient, Stream, protocol
from model_client.cli import format_status
from tests.conftest import GREEDY, ManagerProcess, collect_events, model_status, wait_for

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_ping_status_and_models(client: ModelClient) -> None:
    assert client.ping()["pong"] is True
    status = client.status()
    names = [m["name"] for m in status["models"]]
    assert names[:2] == ["smollm2", "gemma3-270m"]
    assert status["manager"]["workers"] >= 1
    catalogue = {m["name"]: m for m in client.models()}
    assert catalogue["smollm2"]["file_exists"] is True
    assert catalogue["missing"]["file_exists"] is False
    assert catalogue["smollm2"]["quantization"] == "Q4_1"


def test_chat_returns_text_usage_and_timings(client: ModelClient) -> None:
    reply = client.chat("smollm2", QUESTION, max_tokens=24, **GREEDY)
    assert isinstance(reply, Completion)
    assert reply.text.strip()
    assert reply.model == "smollm2"
    assert reply.usage.prompt_tokens > 10
    assert 1 <= reply.usage.completion_tokens <= 24
    assert reply.timings.ttft_ms > 0 and reply.timings.total_ms >= reply.timings.ttft_ms
    again = client.chat("smollm2", QUESTION, max_tokens=24, **GREEDY)
    assert again.text == reply.text, "temperature 0 must be deterministic"


def test_stream_chunks_join_to_the_final_text(client: ModelClient) -> None:
    stream = client.chat("smollm2", QUESTION, stream=True, max_tokens=32, **GREEDY)
    assert isinstance(stream, Stream)
    pieces = list(stream)
    assert len(pieces) > 3, "a streamed reply arrives in several chunks"
    assert stream.result is not None
    assert "".join(pieces) == stream.result.text
    assert stream.result.usage.completion_tokens >= len(pieces) - 1
    assert stream.result.timings.tokens_per_s > 0
    plain = client.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)
    assert plain.text == stream.result.text


def test_complete_continues_a_prompt(client: ModelClient) -> None:
    reply = client.complete("smollm2", "One, two, three, four,", max_tokens=8, **GREEDY)
    assert reply.text.strip()
    assert reply.finish_reason in ("stop", "length")


def test_stop_strings_end_the_reply_and_never_leak(client: ModelClient) -> None:
    full = client.complete("smollm2", "One, two, three, four,", max_tokens=16, **GREEDY).text
    cut_at = full.find(",", 2)
    assert cut_at > 0, full
    stream = client.complete("smollm2", "One, two, three, four,", max_tokens=16, stream=True, stop=[","], **GREEDY)
    text = stream.text()
    assert text == full[:cut_at]
    assert stream.result.finish_reason == "stop"


def test_a_plain_req_socket_is_served(manager: ManagerProcess) -> None:
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(manager.endpoint)
    try:
        request = protocol.Request(op="chat", args={"model": "smollm2", "messages": QUESTION, "max_tokens": 8})
        req.send_multipart(protocol.encode_request(request))
        assert req.poll(60_000)
        reply = protocol.decode_reply(req.recv_multipart())
        assert reply.id == request.id and reply.type == "result"
        assert reply.body["usage"]["completion_tokens"] >= 1
    finally:
        req.close()


def test_sixteen_concurrent_clients_each_get_their_own_answer(manager: ManagerProcess) -> None:
    prompts = [f"Repeat after me: {word}." for word in ("apple", "river", "candle", "mountain")]

    def ask(prompt: str) -> str:
        with manager.client(timeout=120) as c:
            return c.chat("smollm2", [{"role": "user", "content": prompt}], max_tokens=12, **GREEDY).text

    expected = {p: ask(p) for p in prompts}
    assert len(set(expected.values())) > 1, "the prompts must give different replies for the check to mean much"
    jobs = prompts * 4
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[p] for p in jobs]


def test_two_models_generate_in_parallel(manager: ManagerProcess) -> None:
    with manager.client() as c:
        c.load("smollm2")
        c.load("gemma3-270m")
    marks: dict[str, list[float]] = {}

    def stream(model: str) -> None:
        with manager.client(timeout=120) as c:
            times = []
            for _ in c.chat(model, QUESTION, stream=True, max_tokens=48, **GREEDY):
                times.append(time.monotonic())
            marks[model] = times

    threads = [threading.Thread(target=stream, args=(m,)) for m in ("smollm2", "gemma3-270m")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = marks["smollm2"], marks["gemma3-270m"]
    assert a[0] < b[-1] and b[0] < a[-1], "each model streamed while the other one was streaming"
    with manager.client() as c:
        pids = {model_status(c, m)["pid"] for m in ("smollm2", "gemma3-270m")}
    assert len(pids) == 2 and None not in pids, "one worker process per model"


def test_first_use_loads_once_for_concurrent_requests(fresh_manager: ManagerProcess) -> None:
    events = fresh_manager.subscribe()
    with fresh_manager.client() as c:
        assert model_status(c, "smollm2")["state"] == "unloaded"
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(
            pool.map(lambda _: fresh_manager.client().chat("smollm2", QUESTION, max_tokens=4, **GREEDY), range(2))
        )
    assert all(r.text for r in replies)
    loaded = [e for e in collect_events(events, time.monotonic() + 0.5) if e["event"] == "model.loaded"]
    assert [e["model"] for e in loaded] == ["smollm2"]
    with fresh_manager.client() as c:
        status = model_status(c, "smollm2")
    assert status["state"] == "ready" and status["requests"] == 2
    events.close()


def test_load_and_unload_ops_publish_events(fresh_manager: ManagerProcess) -> None:
    events = fresh_manager.subscribe()
    with fresh_manager.client() as c:
        loaded = c.load("smollm2")
        assert loaded["state"] == "ready" and loaded["pid"]
        assert c.load("smollm2")["pid"] == loaded["pid"], "loading a loaded model changes nothing"
        assert c.unload("smollm2")["state"] == "unloaded"
        assert model_status(c, "smollm2")["pid"] is None
    seen = [(e["event"], e["model"]) for e in collect_events(events, time.monotonic() + 0.5)]
    assert seen == [("model.loaded", "smollm2"), ("model.unloaded", "smollm2")]
    wait_for(lambda: not _alive(loaded["pid"]), timeout=60)
    events.close()


def test_idle_ttl_unloads_the_model(manager: ManagerProcess) -> None:
    events = manager.subscribe()
    with manager.client() as c:
        c.chat("smollm2-quick-idle", QUESTION, max_tokens=2)
        wait_for(lambda: model_status(c, "smollm2-quick-idle")["state"] == "unloaded", timeout=60)
    unloaded = [e for e in collect_events(events, time.monotonic() + 0.3) if e["event"] == "model.unloaded"]
    assert [(e["model"], e["reason"]) for e in unloaded] == [("smollm2-quick-idle", "idle")]
    events.close()


def test_heartbeat_is_published(manager: ManagerProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, protocol.EVENT_HEARTBEAT.encode())
    sock.connect(manager.events_endpoint)
    try:
        assert sock.poll(5000), "a heartbeat arrives within a few heartbeat periods"
        topic, body = protocol.decode_event(sock.recv_multipart())
        assert topic == protocol.EVENT_HEARTBEAT and "smollm2" in body["models"]
    finally:
        sock.close(linger=0)


def test_status_table_reads_like_ollama_ps(client: ModelClient) -> None:
    client.load("smollm2")
    table = format_status(client.status())
    header, *rows = table.splitlines()
    assert header.split()[:6] == ["MODEL", "KIND", "DEVICE", "THREADS", "SIZE", "STATE"]
    row = next(r for r in rows if r.startswith("smollm2 "))
    assert " llm " in row and "cpu" in row and "ready" in row and "MB" in row


def test_raw_envelope_with_binary_payload_frames_is_accepted(manager: ManagerProcess) -> None:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(manager.endpoint)
    try:
        envelope = msgpack.packb({"v": 1, "id": "with-payload", "op": "ping", "args": {}})
        dealer.send_multipart([b"", envelope, b"\x00\x01binary"])
        assert dealer.poll(5000)
        frames = dealer.recv_multipart()
        reply = protocol.decode_reply(frames[1:])
        assert reply.id == "with-payload" and reply.body["pong"] is True
    finally:
        dealer.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_conversation_keeps_history_and_reuses_the_context(client: ModelClient) -> None:
    from model_client import Conversation

    chat = Conversation(
        client, "smollm2", system="You answer in one short sentence.", params={"max_tokens": 16, **GREEDY}
    )
    first = chat.say("My name is Ada. Remember it.")
    second = chat.say("What is my name?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first.text and chat.messages[4]["content"] == second.text
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1, "turn 2 extends what turn 1 left"
    streamed = "".join(chat.stream("Thank you."))
    assert chat.messages[-1] == {"role": "assistant", "content": streamed}
