"""Continuous batching through the real daemon: a model with ``parallel`` sequences serves its requests together.

Each check is ordered by events (first chunk, last chunk), never by elapsed time: served one at a time, a second
stream could not start before the first ended, and a short request would wait for every long one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from model_client import BadRequest, protocol
from tests.conftest import GREEDY, REPO, ManagerProcess, base_config, model_status, wait_for
from tests.test_load_and_security import scrape

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a reliably long request
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly."}


@pytest.fixture(scope="module")
def batching() -> Iterator[ManagerProcess]:
    run = Path(tempfile.mkdtemp(prefix="mm-batching-"))
    config = base_config(run)
    smollm2 = config["models"]["smollm2"]
    config["models"] = {
        "x4": {**smollm2, "parallel": 4, "n_threads": 2},
        "x2": {**smollm2, "parallel": 2, "n_ctx": 1024, "n_threads": 2},
        "x1": {**smollm2, "n_threads": 2},  # one at a time, exact mode
    }
    manager = ManagerProcess(run, config)
    manager.start()
    yield manager
    manager.stop()
    shutil.rmtree(run, ignore_errors=True)


class Streams:
    """Long streamed completions in threads, each with events for its first chunk and its end."""

    def __init__(self, manager: ManagerProcess, model: str, count: int, max_tokens: int) -> None:
        self.started = [threading.Event() for _ in range(count)]
        self.ended = [threading.Event() for _ in range(count)]
        self.results: list = [None] * count
        self.abandon: set[int] = set()
        self.go = threading.Barrier(count)
        self.threads = [
            threading.Thread(target=self._run, args=(manager, model, i, max_tokens), daemon=True) for i in range(count)
        ]

    def _run(self, manager: ManagerProcess, model: str, i: int, max_tokens: int) -> None:
        with manager.client(timeout=120) as client:
            self.go.wait()
            stream = client.complete(model, COUNTING, stream=True, max_tokens=max_tokens, **GREEDY)
            for _ in stream:
                self.started[i].set()
                if i in self.abandon:
                    break  # the client goes away mid-stream
            self.results[i] = stream.result
        self.ended[i].set()

    def start(self) -> Streams:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self.threads:
            thread.join(120)

    def stop(self) -> None:
        """The checks are done: every client goes away, which also ends its request."""
        self.abandon.update(range(len(self.threads)))
        self.join()


def test_concurrent_streams_run_together(batching: ManagerProcess) -> None:
    with batching.client() as client:
        client.load("x4")
    streams = Streams(batching, "x4", 4, max_tokens=64).start()
    for started in streams.started:
        assert started.wait(60), "a stream never started"
    assert not any(ended.is_set() for ended in streams.ended), "a stream ended before all had started"
    streams.join()
    assert all(r is not None and r.usage.completion_tokens == 64 for r in streams.results), [
        (r.finish_reason, r.usage, r.text[-30:]) if r else None for r in streams.results
    ]


def test_a_short_request_is_answered_while_long_ones_run(batching: ManagerProcess) -> None:
    streams = Streams(batching, "x4", 3, max_tokens=300).start()
    for started in streams.started:
        assert started.wait(60)
    with batching.client(timeout=60) as client:
        reply = client.chat("x4", [{"role": "user", "content": "Say yes."}], max_tokens=4, **GREEDY)
    assert reply.usage.completion_tokens >= 1
    assert not any(ended.is_set() for ended in streams.ended), "the short request waited for the long ones"
    with batching.client(timeout=60) as client:  # status shows the batch while the long ones run
        batch = wait_for(lambda: (model_status(client, "x4")["batching"] or {}).get("mean_batch", 0) > 2, timeout=60)
        assert batch and model_status(client, "x4")["in_flight"] == 3
        url = client.status()["manager"]["metrics"]  # and so do the metrics, refreshed each second
        samples = wait_for(lambda: (m := scrape(url)).get('mm_mean_batch{model="x4"}', 0) > 2 and m, timeout=60)
        assert samples['mm_parallel{model="x4"}'] == 4 and 'mm_sequences_busy{model="x4"}' in samples
        assert samples['mm_generated_tokens_per_second{model="x4"}'] > 0 and samples['mm_threads{model="x4"}'] >= 1
    assert not any(ended.is_set() for ended in streams.ended)
    streams.stop()


def test_a_voice_request_is_answered_on_its_kept_sequence_while_a_chat_one_waits(batching: ManagerProcess) -> None:
    """x2: parallel 2 and one voice sequence. Two long streams fill the chat sequences: a chat request waits for
    one of them to end, a voice request (priority 80) is answered beside them."""
    streams = Streams(batching, "x2", 2, max_tokens=400).start()
    for started in streams.started:
        assert started.wait(60)
    chat: dict = {}

    def ask_as_chat() -> None:
        with batching.client(timeout=120) as client:
            chat["reply"] = client.chat("x2", [{"role": "user", "content": "Say no."}], max_tokens=4, **GREEDY)

    waiting = threading.Thread(target=ask_as_chat, daemon=True)
    waiting.start()
    with batching.client(timeout=60) as client:
        wait_for(lambda: model_status(client, "x2")["queued"] == 1, timeout=60)
    with batching.client(timeout=60, priority=protocol.PRIORITY_INTERACTIVE) as voice:
        reply = voice.chat("x2", [{"role": "user", "content": "Say yes."}], max_tokens=4, **GREEDY)
        entry = model_status(voice, "x2")
    assert reply.usage.completion_tokens >= 1 and reply.timings.queue_ms is not None
    assert not any(ended.is_set() for ended in streams.ended), "the voice request waited for a stream to end"
    assert "reply" not in chat and entry["queued"] == 1, "the chat request still waits for a chat sequence"
    assert (entry["parallel"], entry["voice_sequences"]) == (2, 1) and entry["waits"]["voice"]["count"] >= 1
    streams.stop()
    waiting.join(timeout=120)
    assert chat["reply"].timings.queue_ms > reply.timings.queue_ms


def test_a_client_gone_frees_its_sequence_for_the_next_request(batching: ManagerProcess) -> None:
    streams = Streams(batching, "x2", 2, max_tokens=400)
    streams.abandon.add(0)
    streams.start()
    assert streams.ended[0].wait(60) and streams.started[1].wait(60)
    with batching.client(timeout=60) as client:
        reply = client.chat("x2", [{"role": "user", "content": "Say yes."}], max_tokens=4, **GREEDY)
    assert reply.usage.completion_tokens >= 1
    assert not streams.ended[1].is_set(), "the next request waited for the other stream instead of the freed sequence"
    streams.stop()


def test_a_conversation_resumes_on_its_sequence_and_after_giving_it_up(batching: ManagerProcess) -> None:
    """Two sequences, three conversations: the third takes the sequence of the one idle longest, whose state is
    saved and comes back when it speaks again; each second turn evaluates only its new tokens."""
    history: dict[str, list[dict]] = {}
    first: dict[str, int] = {}
    with batching.client(timeout=60) as client:
        for cid in ("amber", "basil", "cedar"):
            history[cid] = [SYSTEM, {"role": "user", "content": f"My name is {cid}. What is yours?"}]
            reply = client.chat("x2", history[cid], conversation_id=cid, max_tokens=12, **GREEDY)
            history[cid].append({"role": "assistant", "content": reply.text})
            first[cid] = reply.usage.prompt_tokens
        saved = lambda: (model_status(client, "x2")["kv_cache"] or {}).get("conversations", 0)  # noqa: E731
        assert wait_for(lambda: saved() >= 1, timeout=60), "the conversation that gave up its sequence was saved"
        for cid in ("amber", "cedar"):  # amber was saved and comes back; cedar is still live
            history[cid].append({"role": "user", "content": "And what is my name?"})
            reply = client.chat("x2", history[cid], conversation_id=cid, max_tokens=12, **GREEDY)
            assert reply.usage.cached_tokens >= first[cid], cid
        assert client.drop_conversation("x2", "basil") is True
        assert client.drop_conversation("x2", "basil") is False


@pytest.mark.parametrize("model", ["x1", "x4"])
def test_constrained_output_follows_its_grammar_or_schema(batching: ManagerProcess, model: str) -> None:
    question = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    with batching.client(timeout=60) as client:
        said = client.chat(model, question, grammar='root ::= "yes" | "no"', max_tokens=4, **GREEDY)
        assert said.text in ("yes", "no"), said.text
        schema = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}
        shaped = client.chat(model, question, json_schema=schema, max_tokens=24, **GREEDY)
        assert isinstance(json.loads(shaped.text)["answer"], bool), shaped.text
        with pytest.raises(BadRequest, match="grammar does not compile") as broken:
            client.chat(model, question, grammar="root ::= (unclosed", max_tokens=4)
        assert broken.value.details["field"] == "grammar"
        with pytest.raises(BadRequest, match="not both"):
            client.chat(model, question, grammar='root ::= "a"', json_schema=schema, max_tokens=4)
        assert client.chat(model, question, max_tokens=2, **GREEDY).usage.completion_tokens >= 1


def test_a_new_conversation_copies_a_shared_prefix_instead_of_evaluating_it(batching: ManagerProcess) -> None:
    system = {"role": "system", "content": "You are Jarvis, the butler of a quiet house by the sea. " * 4}
    with batching.client(timeout=60) as client:
        client.unload("x4")  # fresh sequences
        short = {"max_tokens": 8, **GREEDY}
        first = client.chat("x4", [system, {"role": "user", "content": "Hello."}], conversation_id="ada", **short)
        other = client.chat("x4", [system, {"role": "user", "content": "Good day."}], conversation_id="bo", **short)
        assert other.usage.cached_tokens >= 40, "the system prompt came from ada's sequence"
        copies = lambda: (model_status(client, "x4")["kv_cache"] or {}).get("prefix_copies", 0)  # noqa: E731
        assert wait_for(lambda: copies() >= 1, timeout=60)  # counted in the worker's next report
        again = [system, {"role": "user", "content": "Hello."}, {"role": "assistant", "content": first.text}]
        again.append({"role": "user", "content": "Thanks."})
        reply = client.chat("x4", again, conversation_id="ada", **short)
        assert reply.usage.cached_tokens >= first.usage.prompt_tokens, "ada kept her own sequence"


def test_two_clients_sending_one_request_id_at_once_each_get_their_own_reply(batching: ManagerProcess) -> None:
    """Ids are the client's own: two connections may use the same one, at the same time, on the same model. A
    duplicate from one connection while its first is in flight is refused, and the first still completes."""
    with batching.client(timeout=60) as client:
        client.load("x4")
    sockets = [zmq.Context.instance().socket(zmq.DEALER) for _ in range(2)]
    prompts = ["1, 2, 3, 4, 5, 6,", "Monday, Tuesday, Wednesday,"]  # continuations no near tie can swap
    try:
        for sock, prompt in zip(sockets, prompts, strict=True):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(batching.endpoint)
            args = {"model": "x4", "prompt": prompt, "max_tokens": 12, **GREEDY}
            sock.send_multipart([b"", *protocol.encode_request(protocol.Request("complete", args, id="same"))])
        duplicate = {"model": "x4", "messages": [{"role": "user", "content": "Again."}], "max_tokens": 4}
        sockets[0].send_multipart([b"", *protocol.encode_request(protocol.Request("chat", duplicate, id="same"))])
        replies: list[list[protocol.Reply]] = [[], []]
        for i, sock in enumerate(sockets):
            while len(replies[i]) < (2 if i == 0 else 1):
                assert sock.poll(60_000), f"client {i} got {len(replies[i])} replies"
                replies[i].append(protocol.decode_reply(sock.recv_multipart()[1:]))
    finally:
        for sock in sockets:
            sock.close()
    first = {r.type: r for r in replies[0]}
    assert first["error"].body["code"] == "bad_request" and "already in flight" in first["error"].body["message"]
    with batching.client(timeout=60) as client:
        alone = [client.complete("x4", p, max_tokens=12, **GREEDY).text for p in prompts]
    # Batched, a greedy reply may part from the one alone at a near tie (see test_batch_correctness): each reply
    # must be its own prompt's, sharing far more with it than with the other prompt's.
    for mine, reply in enumerate([first["result"], replies[1][0]]):
        assert reply.id == "same" and reply.type == "result"
        own, other = (len(os.path.commonprefix([reply.body["text"], alone[i]])) for i in (mine, 1 - mine))
        assert own >= 8 and own > other, ("each client got the reply to its own prompt", reply.body, alone)


def test_every_key_status_returns_is_in_the_protocol_doc_and_live_conversations_count(
    batching: ManagerProcess,
) -> None:
    """docs/protocol.md's `status` section names every key the manager sends, nested ones of a batching model
    included; a conversation live on a sequence counts among its conversations."""
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = doc[doc.index("### `status`") : doc.index("### `models`")]
    with batching.client(timeout=60) as client:
        client.chat("x2", [{"role": "user", "content": "Hi"}], conversation_id="doc-check", max_tokens=4, **GREEDY)
        status = client.status()
    entry = next(m for m in status["models"] if m["name"] == "x2")
    assert entry["kv_cache"]["live"] >= 1 and entry["kv_cache"]["conversations"] >= 1
    keys = set(status) | set(status["manager"]) | set(status["manager"]["refused"]) | set(status["devices"])
    keys |= {k for d in status["devices"]["list"] for k in d} | {k for m in status["models"] for k in m}
    keys |= set(entry["kv_cache"]) | set(entry["batching"] or {})
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"status keys docs/protocol.md does not describe: {missing}"
