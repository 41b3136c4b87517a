"""Hostile local peers on every socket the manager binds: nothing they send ends, stalls or grows it.

Each test does what a hostile process on the machine could do (a stranger on the workers socket, oversized or
countless subscriptions on the events socket, the manager killed while it starts workers), then checks that the
daemon still answers a fresh client quickly and that its memory came back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq

from model_client import ModelClient
from model_client.endpoints import ipc_path
from model_client.errors import BadRequest
from model_manager.config import MIB
from tests.conftest import GREEDY, ManagerProcess, base_config, rss_bytes, subscriber, wait_for
from tests.test_cli import mm


def answers_quickly(manager: ManagerProcess, within_s: float = 2.0) -> float:
    """A fresh client's ping is answered within ``within_s``; returns how long it took."""
    started = time.monotonic()
    with manager.client(timeout=within_s, retries=0) as fresh:
        assert fresh.ping(timeout=within_s)["pong"] is True
    return time.monotonic() - started


HOSTILE_SUBSCRIBER = """
import os, sys, time, zmq
endpoint, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = zmq.Context().socket(zmq.SUB)
sock.setsockopt(zmq.SNDHWM, 0)
sock.connect(endpoint)
for _ in range(count):
    sock.setsockopt(zmq.SUBSCRIBE, b"model." + os.urandom(size // 2 + 1).hex().encode()[:size])
print("subscribed", flush=True)
time.sleep(600)
"""


@contextmanager
def hostile_subscriber(endpoint: str, size: int, count: int) -> Iterator[None]:
    """A subscriber in a process of its own (its own ZeroMQ may well crash on what it holds: a 1 MiB topic is a
    trie a million nodes deep, freed by recursion)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOSTILE_SUBSCRIBER, endpoint, str(size), str(count)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"subscribed"
        yield
    finally:
        proc.kill()
        proc.wait()


def heartbeats(listener: zmq.Socket, count: int) -> None:
    """Wait for ``count`` fresh heartbeats: the manager has been through its loop (and read its subscribers)."""
    while listener.poll(0):
        listener.recv_multipart()
    for _ in range(count):
        assert listener.poll(10_000), "no heartbeat"
        listener.recv_multipart()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_strangers_on_the_workers_socket_are_refused_and_the_manager_stays_up(manager: ManagerProcess) -> None:
    """A peer whose routing id is not UTF-8 once ended the manager with one message."""
    workers = manager.config["endpoints"]["workers"]
    ctx = zmq.Context.instance()
    with manager.client(timeout=60) as client:
        expected = client.chat("smollm2", [{"role": "user", "content": "Say hi."}], max_tokens=6, **GREEDY).text
        before = client.status()["manager"]["refused"]["handshakes"].get("workers", 0)
    hello = msgpack.packb({"evt": "ready", "pid": 1, "rss": 1})
    strangers = []
    for identity, credentials in [
        (None, None),  # no identity at all: ZeroMQ makes up a binary one
        (b"\xff\xfe\x00", None),
        (b"w1-1", None),  # a worker's name, guessed
        (b"w1-2", (b"w1-2", b"not the secret")),  # a worker's name with a made-up secret
    ]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if credentials is not None:
            sock.plain_username, sock.plain_password = credentials
        sock.connect(workers)
        for _ in range(3):
            sock.send_multipart([hello], flags=zmq.NOBLOCK) if sock.poll(0, zmq.POLLOUT) else None
        sock.send(hello, flags=zmq.NOBLOCK) if sock.poll(500, zmq.POLLOUT) else None
        strangers.append(sock)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(ipc_path(workers)))
    # A ZMTP 3.0 greeting that names no mechanism libzmq knows, then noise: a failed handshake every time (random
    # bytes alone sometimes read as a ZMTP 1.0 frame whose length never arrives, and no failure is reported).
    raw.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NOISE".ljust(20, b"\0") + bytes(32) + os.urandom(64))
    raw.close()
    try:
        with manager.client(timeout=60) as client:
            # Four ZeroMQ strangers and the raw greeting: each failed handshake is counted.
            wait_for(lambda: client.status()["manager"]["refused"]["handshakes"].get("workers", 0) >= before + 5)
            assert answers_quickly(manager) < 2.0
            assert manager.proc is not None and manager.proc.poll() is None, manager.log_tail()
            assert "refused peers: workers " in mm(manager, "status").stdout  # shown to the person running it
            # Its real workers are unaffected: a fresh worker loads and answers as before.
            client.unload("smollm2")
            again = client.chat("smollm2", [{"role": "user", "content": "Say hi."}], max_tokens=6, **GREEDY).text
            assert again == expected
    finally:
        for sock in strangers:
            sock.close(linger=0)
    assert "worker_message_dropped" not in manager.log_path.read_text(), "a stranger got past the handshake"


def test_a_manager_killed_while_starting_leaves_no_worker_behind(run_dir: Path) -> None:
    process = ManagerProcess(run_dir, base_config(run_dir))
    process.start(wait=False)
    assert process.proc is not None
    spares = wait_for(lambda: children(process.proc.pid), timeout=30, interval=0.002)
    process.proc.send_signal(signal.SIGKILL)  # before the spare worker has had time to start up
    process.proc.wait()
    try:
        wait_for(lambda: not any(alive(pid) for pid in spares), timeout=60, interval=0.1)
    finally:
        for pid in spares:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_oversized_subscription_neither_grows_nor_stalls_the_manager(manager: ManagerProcess) -> None:
    """One 1 MiB subscription once added ~77 MiB to the manager, and stalled it while subscribers came and went."""
    assert manager.proc is not None
    listener = subscriber(manager.events_endpoint, "manager.heartbeat")
    assert listener.poll(10_000), "no heartbeat before the test"
    listener.recv_multipart()
    before = rss_bytes(manager.proc.pid)
    churn = []
    with hostile_subscriber(manager.events_endpoint, MIB, 1):
        heartbeats(listener, 2)
        worst = 0.0
        for round_ in range(50):  # subscribers come and go while the hostile one (re)tries
            sock = subscriber(manager.events_endpoint, f"model.{round_}")
            churn.append(sock)
            if len(churn) > 5:
                churn.pop(0).close(linger=0)
            if round_ % 10 == 0:
                worst = max(worst, answers_quickly(manager))
        assert worst < 2.0
        heartbeats(listener, 2)  # a well-behaved subscriber still gets them
        grown = rss_bytes(manager.proc.pid) - before
        assert grown < 20 * MIB, f"the manager grew by {grown / MIB:.1f} MiB"
    for sock in [*churn, listener]:
        sock.close(linger=0)


def test_countless_subscriptions_are_capped_and_subscribers_come_back(manager: ManagerProcess) -> None:
    assert manager.proc is not None
    listener = subscriber(manager.events_endpoint, "manager.heartbeat")
    assert listener.poll(10_000), "no heartbeat before the test"
    with manager.client(timeout=30) as client:
        resets_before = client.status()["manager"]["refused"]["subscriber_resets"]
    before = rss_bytes(manager.proc.pid)
    with hostile_subscriber(manager.events_endpoint, 48, 5000):
        with manager.client(timeout=30) as client:
            wait_for(lambda: client.status()["manager"]["refused"]["subscriber_resets"] > resets_before, timeout=30)
        assert answers_quickly(manager) < 2.0
        grown = rss_bytes(manager.proc.pid) - before
        assert grown < 20 * MIB, f"the manager grew by {grown / MIB:.1f} MiB"
    # Dropped with everyone else, the well-behaved subscriber reconnects by itself and hears heartbeats again.
    while listener.poll(0):
        listener.recv_multipart()
    assert listener.poll(15_000), "the subscriber did not come back after the reset"
    listener.close(linger=0)


def test_an_oversized_prompt_is_refused_before_any_tokenizing(manager: ManagerProcess) -> None:
    """A 3 MiB prompt once tied its model's worker up for seconds, tokenized only to be refused."""
    with manager.client(timeout=60) as client:
        client.load("smollm2")
        prompt = "word " * (3 * MIB // 5)
        started = time.monotonic()
        with pytest.raises(BadRequest) as refused:
            client.complete("smollm2", prompt, max_tokens=1)
        took = time.monotonic() - started
        assert refused.value.details["max_prompt_bytes"] == MIB
        assert took < 1.0, f"refusing took {took:.2f} s"
        assert client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens >= 1


def test_a_whole_message_over_the_size_limit_is_refused(manager: ManagerProcess) -> None:
    limit = manager.config["limits"]["max_message_bytes"]
    frame = b"\x00" * (limit // 2)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    try:
        envelope = msgpack.packb({"v": 1, "id": "big", "op": "ping"})
        sock.send_multipart([b"", envelope, frame, frame, frame])  # each frame under the limit, the message over
        assert sock.poll(5000), "no reply"
        reply = msgpack.unpackb(sock.recv_multipart()[1])
        assert reply["error"]["code"] == "bad_request"
        assert reply["error"]["details"]["max_message_bytes"] == limit
        assert reply["error"]["details"]["message_bytes"] > limit
    finally:
        sock.close(linger=0)
    assert answers_quickly(manager) < 2.0


def test_routing_frames_before_the_delimiter_come_back_in_front_of_the_reply(manager: ManagerProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    try:
        sock.send_multipart([b"hop-1", b"hop-2", b"", msgpack.packb({"v": 1, "id": "r", "op": "ping"})])
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        assert reply[:3] == [b"hop-1", b"hop-2", b""]
        assert msgpack.unpackb(reply[3])["result"]["pong"] is True
    finally:
        sock.close(linger=0)


def test_stream_over_a_req_socket_is_refused(manager: ManagerProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(manager.endpoint)
    try:
        args = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        sock.send(msgpack.packb({"v": 1, "id": "s", "op": "chat", "args": args}))
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv())
        assert reply["type"] == "error" and reply["error"]["code"] == "bad_request"
        assert "DEALER" in reply["error"]["message"]
    finally:
        sock.close(linger=0)


def test_strict_types_for_every_field(client: ModelClient) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for field, value in [("max_tokens", "4"), ("cache", "false"), ("temperature", "0.5"), ("stream", 1)]:
        with pytest.raises(BadRequest) as refused:
            client.request("chat", {"model": "smollm2", "messages": messages, field: value})
        assert field in refused.value.message


def _hostile_batch(manager: ManagerProcess, rounds: int) -> None:
    """What a hostile local process sends each of the manager's sockets: large and many-framed messages, random
    identities and envelopes on the request socket; subscriptions and raw bytes on the events socket; failed
    handshakes, forged worker messages and raw bytes on the workers socket."""
    import random

    rng = random.Random(7)
    ctx = zmq.Context.instance()
    endpoints = manager.config["endpoints"]
    limit = manager.config["limits"]["max_message_bytes"]
    for i in range(rounds):
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.setsockopt(zmq.SNDTIMEO, 200)
        peer.setsockopt(zmq.IDENTITY, bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 64))))
        peer.connect(endpoints["requests"])
        frames = [
            bytes([i % 251]) * rng.choice([1024, 64 * 1024, limit // 2, limit]) for _ in range(rng.randrange(1, 6))
        ]
        envelope = {"v": 1, "id": "x" * rng.randrange(1, 4000), "op": "chat", "args": {"model": "smollm2"}}
        with contextlib.suppress(zmq.Again):
            peer.send_multipart([b"", *frames])
            peer.send_multipart([b"", msgpack.packb(envelope)])
        peer.close(0)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        for _ in range(10):
            sub.setsockopt(zmq.SUBSCRIBE, os.urandom(rng.randrange(1, 300)))
        sub.connect(endpoints["events"])
        sub.close(0)
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.setsockopt(zmq.SNDTIMEO, 200)
        stranger.plain_username, stranger.plain_password = b"w-forged", os.urandom(16).hex().encode()
        stranger.connect(endpoints["workers"])
        with contextlib.suppress(zmq.Again):
            stranger.send(msgpack.packb({"evt": "ready", "pid": 1, "rss": 1}) + bytes(rng.choice([10, 100_000])))
        stranger.close(0)
        for endpoint in (endpoints["requests"], endpoints["events"], endpoints["workers"]):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(1)
            with contextlib.suppress(OSError):
                raw.connect(str(ipc_path(endpoint)))
                raw.sendall(os.urandom(rng.randrange(1, 8192)))
            raw.close()


def test_the_managers_memory_stays_within_20_mb_over_a_hostile_batch_on_each_socket(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["manager"]["spare_workers"] = 0
    manager = ManagerProcess(run_dir, config)
    manager.start()
    try:
        answers_quickly(manager)
        assert manager.proc is not None
        start = rss_bytes(manager.proc.pid)
        for _ in range(3):
            _hostile_batch(manager, rounds=80)
            answers_quickly(manager)
        try:
            wait_for(lambda: rss_bytes(manager.proc.pid) - start < 20 * MIB, timeout=60)
        except AssertionError:
            grown = (rss_bytes(manager.proc.pid) - start) / MIB
            raise AssertionError(f"the manager grew by {grown:.1f} MiB and stayed so") from None
    finally:
        manager.stop()
