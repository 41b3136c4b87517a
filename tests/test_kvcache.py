"""Conversations that stay fast, and stay exact: with temperature 0 a reply with KV reuse is token for token the
reply without it, for one conversation, interleaved ones, after a spill to disk and back, and after an edit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from model_client import Completion, ContextOverflow, ModelClient, protocol
from model_client.results import ContextReport
from model_manager.kvcache import ConversationStore, spill_path
from tests.conftest import GREEDY, ManagerProcess, base_config, model_status

SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
USER_TURNS = [
    "My favourite fruit is the apricot. What colour is it?",
    "Name a country where it grows.",
    "What else could I cook with it?",
    "Thank you. Summarise our talk in one line.",
]
PARAMS = {"max_tokens": 12, **GREEDY}


def converse(c: ModelClient, conversations: list[str], turns: int) -> dict[str, list[tuple[list, Completion]]]:
    """Round-robin turns of several conversations with reuse; returns each turn's messages and reply."""
    history = {cid: [SYSTEM] for cid in conversations}
    record: dict[str, list[tuple[list, Completion]]] = {cid: [] for cid in conversations}
    for turn in range(turns):
        for cid in conversations:
            history[cid].append({"role": "user", "content": f"[{cid}] {USER_TURNS[turn]}"})
            messages = list(history[cid])
            reply = c.chat("smollm2", messages, conversation_id=cid, **PARAMS)
            record[cid].append((messages, reply))
            history[cid].append({"role": "assistant", "content": reply.text})
    return record


def assert_exact(c: ModelClient, record: dict[str, list[tuple[list, Completion]]]) -> None:
    for cid, turns in record.items():
        for turn, (messages, reply) in enumerate(turns):
            fresh = c.chat("smollm2", messages, cache=False, **PARAMS)
            assert fresh.usage.cached_tokens == 0
            assert (reply.text, reply.usage.completion_tokens) == (fresh.text, fresh.usage.completion_tokens), (
                cid,
                turn,
            )


def test_one_conversation_reuses_its_history_exactly(client: ModelClient) -> None:
    record = converse(client, ["solo"], turns=4)
    turns = [reply for _, reply in record["solo"]]
    for previous, reply in zip(turns, turns[1:], strict=False):
        assert reply.usage.cached_tokens >= previous.usage.prompt_tokens, "turn N re-reads nothing old"
        assert reply.usage.prompt_tokens - reply.usage.cached_tokens < 60
    assert_exact(client, record)


def test_interleaved_conversations_each_resume_their_own_state(client: ModelClient) -> None:
    record = converse(client, ["alpha", "beta", "gamma"], turns=2)
    for cid, turns in record.items():
        first, *later = [reply for _, reply in turns]
        for previous, reply in zip([first, *later], later, strict=False):
            assert reply.usage.cached_tokens >= previous.usage.prompt_tokens, cid
    assert_exact(client, record)
    kv = model_status(client, "smollm2")["kv_cache"]
    assert kv["conversations"] >= 3 and kv["bytes"] > 1_000_000


def test_an_edited_history_reuses_only_the_common_prefix(client: ModelClient) -> None:
    record = converse(client, ["editor"], turns=3)
    messages = [dict(m) for m in record["editor"][-1][0]]
    messages[1]["content"] = messages[1]["content"].replace("apricot", "plum")  # rewrite turn 1
    edited = client.chat("smollm2", messages, conversation_id="editor", **PARAMS)
    first_prompt = record["editor"][0][1].usage.prompt_tokens
    assert 0 < edited.usage.cached_tokens < first_prompt, "only the part before the edit is reused"
    fresh = client.chat("smollm2", messages, cache=False, **PARAMS)
    assert edited.text == fresh.text


def test_dropping_a_conversation_forgets_its_state(client: ModelClient) -> None:
    record = converse(client, ["dropme", "other"], turns=2)
    assert client.drop_conversation("smollm2", "dropme") is True
    assert client.drop_conversation("smollm2", "dropme") is False
    client.chat("smollm2", [SYSTEM, {"role": "user", "content": "Unrelated."}], conversation_id="other2", **PARAMS)
    messages = record["dropme"][-1][0] + [
        {"role": "assistant", "content": record["dropme"][-1][1].text},
        {"role": "user", "content": "And now?"},
    ]
    reply = client.chat("smollm2", messages, conversation_id="dropme", **PARAMS)
    assert reply.usage.cached_tokens < record["dropme"][0][1].usage.prompt_tokens


def test_spilled_states_come_back_from_disk_and_survive_a_restart(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["kv_cache"] = {"budget_mib": 1, "spill_dir": str(run_dir / "kv")}  # one state at most stays in RAM
    manager = ManagerProcess(run_dir, config)
    manager.start()
    try:
        with manager.client(timeout=60) as c:
            record = converse(c, ["north", "south", "east"], turns=2)
            kv = model_status(c, "smollm2")["kv_cache"]
            assert kv["spilled"] >= 2 and kv["conversations"] <= 1
            for cid in ("north", "south", "east"):
                second = record[cid][1][1]
                assert second.usage.cached_tokens >= record[cid][0][1].usage.prompt_tokens, cid
            assert_exact(c, record)
        manager.stop()
        assert (run_dir / "kv" / "smollm2").is_dir()
        manager.start()
        with manager.client(timeout=60) as c:
            messages, reply = record["south"][-1]
            messages = messages + [
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": "[south] " + USER_TURNS[2]},
            ]
            resumed = c.chat("smollm2", messages, conversation_id="south", **PARAMS)
            assert resumed.usage.cached_tokens >= reply.usage.prompt_tokens, "restored from disk after restart"
            assert resumed.text == c.chat("smollm2", messages, cache=False, **PARAMS).text
            c.unload("smollm2")
            assert spill_path(run_dir / "kv", "smollm2", "north").exists()
            assert c.drop_conversation("smollm2", "north") is True, "dropped from disk while the model is unloaded"
            assert not spill_path(run_dir / "kv", "smollm2", "north").exists()
    finally:
        manager.stop()


def test_context_overflow_policies(run_dir: Path) -> None:
    config = base_config(run_dir)
    small = {**config["models"]["smollm2"], "n_ctx": 256}
    config["models"]["strict"] = {**small, "context_overflow": "error"}
    config["models"]["rolling"] = {**small, "context_overflow": "truncate"}
    manager = ManagerProcess(run_dir, config)
    manager.start()
    long_chat = [SYSTEM]
    for i in range(12):
        long_chat += [
            {"role": "user", "content": f"Tell me fact number {i} about the sea, in a sentence or two please."},
            {"role": "assistant", "content": f"Fact {i}: the sea covers most of the planet and is very deep."},
        ]
    long_chat.append({"role": "user", "content": "Which fact was the first?"})
    try:
        with manager.client(timeout=60) as c:
            with pytest.raises(ContextOverflow) as err:
                c.chat("strict", long_chat, max_tokens=16)
            assert err.value.details["policy"] == "error"
            reply = c.chat("rolling", long_chat, max_tokens=16)
            assert reply.context.policy == "truncate" and reply.context.dropped_messages >= 2
            assert reply.usage.prompt_tokens + 16 <= 256
            assert reply.text
            short = c.chat("rolling", long_chat[:1] + long_chat[-1:], max_tokens=16)
            assert short.context == ContextReport(policy="truncate", dropped_messages=0)
    finally:
        manager.stop()


def test_saved_states_count_in_host_memory(client: ModelClient) -> None:
    converse(client, ["counted"], turns=1)
    status = client.status()
    smollm2 = next(m for m in status["models"] if m["name"] == "smollm2")
    host = next(d for d in status["devices"]["list"] if d["id"] == "cpu")
    assert smollm2["kv_cache"]["bytes"] > 0
    assert host["reserved_bytes"] >= smollm2["size_bytes"] + smollm2["kv_cache"]["bytes"]


# ----- the store on its own ------------------------------------------------------------------------------------


def test_store_keeps_the_budget_least_recently_used_first(tmp_path: Path) -> None:
    store = ConversationStore("m", "key", budget_bytes=2500, ttl_s=60, spill_dir=str(tmp_path))
    for name in ("a", "b", "c"):
        store.put(name, [1, 2, 3], b"x" * 1000)
    assert list(store.states) == ["b", "c"] and store.nbytes <= 2500
    assert store.stats() == {"conversations": 2, "bytes": 2024, "spilled": 1}
    assert store.get("a").state == b"x" * 1000, "evicted to disk, read back"
    assert "b" not in store.states, "reading 'a' back pushed out the least recently used"


def test_store_ttl_moves_states_to_disk_and_model_identity_is_checked(tmp_path: Path) -> None:
    store = ConversationStore("m", "key-1", budget_bytes=10**6, ttl_s=5, spill_dir=str(tmp_path))
    store.put("a", [7, 8], b"state")
    store.expire(now=time.monotonic() + 10)
    assert store.states == {} and store.stats()["spilled"] == 1
    assert store.get("a").tokens == [7, 8]
    other_model = ConversationStore("m", "key-2", budget_bytes=10**6, ttl_s=5, spill_dir=str(tmp_path))
    assert other_model.get("a") is None, "a state never goes into another model"
    assert store.drop("a") and not store.drop("a")


def test_store_without_spill_dir_forgets_evicted_states() -> None:
    store = ConversationStore("m", "key", budget_bytes=1500, ttl_s=60)
    store.put("a", [1], b"x" * 1000)
    store.put("b", [1], b"x" * 1000)
    assert store.get("a") is None and store.get("b") is not None


def test_a_drop_sent_while_the_model_unloads_is_not_undone_by_its_spill(fresh_manager: ManagerProcess) -> None:
    """The unloading worker writes its conversations to disk as it exits: a drop that arrives meanwhile must not be
    overwritten by that write."""
    spill_dir = Path(fresh_manager.config["kv_cache"]["spill_dir"])
    messages = [SYSTEM, {"role": "user", "content": USER_TURNS[0]}]
    with fresh_manager.client(timeout=60) as c:
        c.chat("smollm2", messages, conversation_id="kitchen", **PARAMS)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(fresh_manager.endpoint)
        try:
            unload = protocol.Request(op="unload", args={"model": "smollm2"})
            drop = protocol.Request(op="conversation.drop", args={"model": "smollm2", "conversation_id": "kitchen"})
            for request in (unload, drop):  # back to back: the drop arrives while the worker is exiting
                sock.send_multipart([b"", *protocol.encode_request(request)])
            answers = {}
            while len(answers) < 2:
                assert sock.poll(30_000), "no reply"
                reply = protocol.decode_reply(sock.recv_multipart()[1:])
                answers[reply.id] = reply
        finally:
            sock.close(linger=0)
        assert answers[unload.id].body["state"] == "unloaded"
        assert answers[drop.id].body == {"dropped": True, "conversation_id": "kitchen"}
        assert not spill_path(spill_dir, "smollm2", "kitchen").exists()
        again = c.chat("smollm2", messages, conversation_id="kitchen", **PARAMS)
        assert again.usage.cached_tokens == 0, "the dropped conversation came back"
