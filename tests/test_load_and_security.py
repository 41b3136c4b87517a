"""Strangers, floods, impatient and vanished clients, metrics: against the real daemon and real models."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
import zmq

from model_client import ModelClient, protocol
from model_client.errors import BadRequest, Busy, ModelNotFound, Timeout
from model_client.security import CurveClient, is_local, make_keys
from tests.conftest import GREEDY, REPO, ManagerProcess, base_config, wait_for

QUESTION = [{"role": "user", "content": "Write a long story about a dragon."}]


def lan_address() -> str:
    """An address of this machine that is not loopback (what a LAN client would connect to)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    pytest.skip("this machine has no non-loopback IPv4 address")


def raw_request(sock: zmq.Socket, op: str, args: dict, **envelope) -> str:
    request = protocol.Request(op=op, args=args, **envelope)
    sock.send_multipart([b"", *protocol.encode_request(request)])
    return request.id


def replies(sock: zmq.Socket, count: int, timeout: float = 60.0) -> dict[str, protocol.Reply]:
    """The final replies to ``count`` requests, by request id."""
    got: dict[str, protocol.Reply] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert sock.poll(max(0.0, deadline - time.monotonic()) * 1000), f"only {len(got)} of {count} replies"
        reply = protocol.decode_reply(sock.recv_multipart()[1:])
        if reply.is_final:
            got[reply.id] = reply
    return got


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


# ----- security ------------------------------------------------------------------------------------------------


def test_loopback_and_ipc_are_local_everything_else_is_not() -> None:
    assert all(map(is_local, ["ipc:///tmp/x.sock", "tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:9"]))
    assert not any(map(is_local, ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.20:5555", "tcp://eth0:1"]))


def test_the_manager_refuses_a_network_address_without_curve_keys(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["endpoints"]["requests"] = "tcp://0.0.0.0:*"  # refused before it binds anything
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "model_manager", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert run.returncode == 2
    assert "refusing to listen on tcp://0.0.0.0" in run.stderr and "mm keys" in run.stderr


def test_only_authorized_curve_clients_get_answers(run_dir: Path) -> None:
    keys = make_keys(run_dir / "keys", ("alice", "mallory"))
    (keys["authorized"] / "mallory.key").unlink()  # mallory has a key pair, but it is not allowed in
    host = lan_address()
    config = base_config(run_dir)
    config["endpoints"]["requests"] = "tcp://0.0.0.0:*"  # any free port: the manager says which
    config["security"] = {
        "curve_server_secret_key": str(keys["server_secret"]),
        "curve_authorized_keys": str(keys["authorized"]),
    }
    config["limits"].update(requests_per_second=5, burst=5)
    manager = ManagerProcess(run_dir, config)
    manager.extra = ("--ports-file", str(run_dir / "ports.json"))
    manager.start(wait=False)
    try:
        endpoint = f"tcp://{host}:{manager.wait_ports(run_dir / 'ports.json')['requests']}"
        alice = CurveClient.from_files(keys["alice_secret"], keys["server_public"])
        with ModelClient(endpoint, timeout=1.0, retries=0, curve=alice) as client:
            reply = client.wait_ready(timeout=30)
            assert reply["pong"] is True
            hi = [{"role": "user", "content": "Hi"}]
            assert client.chat("smollm2", hi, max_tokens=4, timeout=60, **GREEDY).text  # a load: not a quick one
        mallory = CurveClient.from_files(keys["mallory_secret"], keys["server_public"])
        for curve in (None, mallory):  # no CURVE at all, and a key that is not authorized: nothing comes back
            with ModelClient(endpoint, timeout=1.0, retries=0, curve=curve) as stranger:
                with pytest.raises(Timeout):
                    stranger.ping(timeout=1.0)
        with ModelClient(endpoint, timeout=5.0, retries=0, curve=alice) as client:
            assert client.ping()["pong"] is True  # and the daemon is still fine
        # Remote clients are rate limited by their key: a new connection does not bring a full bucket.
        with ModelClient(endpoint, timeout=5.0, retries=0, curve=alice) as client:
            assert sum(busy_pings(client, 30)) >= 20
        with ModelClient(endpoint, timeout=5.0, retries=0, curve=alice) as again:
            assert sum(busy_pings(again, 10)) >= 8
    finally:
        manager.stop()


def busy_pings(client: ModelClient, count: int) -> list[bool]:
    """Send ``count`` pings one after another; True for each answered ``busy``."""
    answers = []
    for _ in range(count):
        try:
            client.ping()
            answers.append(False)
        except Busy:
            answers.append(True)
    return answers


def test_local_clients_are_not_rate_limited_by_default(manager: ManagerProcess) -> None:
    """A busy local agent or a benchmark is no stranger: only remote clients, or local ones when the YAML says
    ``rate_limit_local``, are held to ``requests_per_second``."""
    sock = dealer(manager.endpoint)
    try:
        ids = [raw_request(sock, "ping", {}) for _ in range(400)]  # twice the default burst, at once
        got = replies(sock, len(ids))
        assert all(got[i].type == "result" for i in ids)
    finally:
        sock.close(linger=0)


# ----- load -----------------------------------------------------------------------------------------------------


def test_a_client_over_its_rate_gets_busy_and_others_do_not(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["limits"].update(requests_per_second=5, burst=5, rate_limit_local=True)
    manager = ManagerProcess(run_dir, config)
    manager.start()
    try:
        flooder = dealer(manager.endpoint)
        ids = [raw_request(flooder, "ping", {}) for _ in range(30)]
        got = replies(flooder, 30)
        busy = [r for r in got.values() if r.type == "error" and r.body["code"] == "busy"]
        assert len(busy) >= 20 and "requests per second" in busy[0].body["message"]
        assert sum(1 for i in ids if got.get(i) and got[i].type == "result") >= 5
        with manager.client(timeout=5, retries=0) as other:  # another client is not limited by the flood
            assert other.ping()["pong"] is True
        time.sleep(1.0)  # the flooder's bucket refills at 5 per second
        raw_request(flooder, "ping", {})
        assert next(iter(replies(flooder, 1).values())).type == "result"
        flooder.close()
    finally:
        manager.stop()


def test_higher_priority_requests_go_first(manager: ManagerProcess) -> None:
    sock = dealer(manager.endpoint)
    try:
        with manager.client(timeout=60) as client:
            client.load("smollm2")
        args = {"model": "smollm2", "messages": QUESTION, "max_tokens": 48, **GREEDY}
        raw_request(sock, "chat", args)  # occupies the model
        time.sleep(0.05)
        low = [raw_request(sock, "chat", {**args, "max_tokens": 2}, priority=10) for _ in range(2)]
        high = raw_request(sock, "chat", {**args, "max_tokens": 2}, priority=90)
        order = []
        deadline = time.monotonic() + 60
        while len(order) < 4 and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = protocol.decode_reply(sock.recv_multipart()[1:])
                if reply.is_final:
                    order.append(reply.id)
        assert order.index(high) < min(order.index(i) for i in low), "the interactive request waited for batch work"
    finally:
        sock.close()


def test_work_whose_client_gave_up_is_dropped(fresh_manager: ManagerProcess) -> None:
    """Admitted (nothing measured yet to predict its wait by), then dropped once its deadline passes in the queue."""
    sock = dealer(fresh_manager.endpoint)
    try:
        with fresh_manager.client(timeout=60) as client:
            client.load("smollm2")
        args = {"model": "smollm2", "messages": QUESTION, **GREEDY}
        running = raw_request(sock, "chat", {**args, "max_tokens": 400}, deadline_ms=1500)
        queued = raw_request(sock, "chat", {**args, "max_tokens": 8}, deadline_ms=300)
        got = replies(sock, 2, timeout=30)
        assert got[queued].type == "error" and got[queued].body["code"] == "timeout"
        assert "deadline passed" in got[queued].body["message"]
        result = got[running].body
        assert got[running].type == "result" and result["finish_reason"] == "cancelled"
        assert result["stopped"] == "deadline" and result["usage"]["completion_tokens"] < 400
    finally:
        sock.close()


def test_an_abandoned_stream_is_cancelled_and_frees_the_model(manager: ManagerProcess) -> None:
    with manager.client(timeout=60) as client:
        client.load("smollm2")
    sock = dealer(manager.endpoint)
    raw_request(sock, "chat", {"model": "smollm2", "messages": QUESTION, "max_tokens": 500, "stream": True, **GREEDY})
    for _ in range(2):
        assert sock.poll(30_000)
        sock.recv_multipart()
    sock.close(linger=0)  # the client dies mid-stream
    started = time.monotonic()
    with manager.client(timeout=60) as other:
        reply = other.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY)
    waited = time.monotonic() - started
    # 500 tokens take several seconds here; the abandoned generation stopped within a token or two instead.
    assert reply.timings.queue_ms < 500 and waited < 3.0, (reply.timings, waited)
    log = manager.log_path.read_text()
    assert re.search(r'"reason": "client_gone".*"event": "request_cancelled"', log)


def test_sigkill_leaves_nothing_behind_and_safe_requests_come_through(fresh_manager: ManagerProcess) -> None:
    with fresh_manager.client(timeout=60) as client:
        worker_pid = client.load("smollm2")["pid"]
    fresh_manager.stop(signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == "zombie", 60)
    fresh_manager.start(wait=False)
    # Lazy Pirate: status is safe to resend, so it is retried (2 s a try, a minute in all) until the new daemon
    # answers; the chat, which is not resent, gets a client that waits as long as a load may take.
    with fresh_manager.client(timeout=2.0, retries=30) as client:
        assert client.status()["manager"]["pid"] == fresh_manager.proc.pid  # retried until the new one answered
        assert next(m for m in client.status()["models"] if m["name"] == "smollm2")["state"] == "unloaded"
    with fresh_manager.client(timeout=120) as client:
        assert client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY).text


# ----- metrics --------------------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_requests_errors_loads_and_memory(manager: ManagerProcess, client: ModelClient) -> None:
    url = client.status()["manager"]["metrics"]
    assert url.startswith("http://127.0.0.1:")
    client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, conversation_id="m1", **GREEDY)
    with pytest.raises(ModelNotFound):
        client.chat("no-such-model", [{"role": "user", "content": "Hi"}])
    with pytest.raises(BadRequest):
        client.request("chat", {"model": "smollm2", "messages": []})

    def ready() -> dict[str, float]:
        samples = scrape(url)
        return samples if samples.get('mm_cached_conversations{model="smollm2"}', 0) >= 1 else {}

    samples = wait_for(ready, timeout=60)
    assert samples['mm_requests_total{code="ok",model="smollm2",op="chat"}'] >= 1
    assert samples['mm_requests_total{code="model_not_found",model="-",op="chat"}'] >= 1
    assert samples['mm_requests_total{code="bad_request",model="smollm2",op="chat"}'] >= 1
    assert samples['mm_model_loads_total{model="smollm2",outcome="ok"}'] >= 1
    assert samples['mm_time_to_first_token_seconds_count{model="smollm2"}'] >= 1
    assert samples['mm_queue_wait_seconds_count{model="smollm2",op="chat"}'] >= 1
    assert samples['mm_model_memory_bytes{device="cpu",model="smollm2"}'] > 50e6
    assert samples['mm_device_memory_bytes{device="cpu",kind="total"}'] > 1e9
    assert 'mm_queue_depth{model="smollm2"}' in samples


def test_limits_on_messages_and_prompt_tokens(run_dir: Path) -> None:
    config = base_config(run_dir)
    config["limits"].update(max_messages=3, max_prompt_tokens=40)
    manager = ManagerProcess(run_dir, config)
    manager.start()
    try:
        with manager.client(timeout=60) as client:
            many = [{"role": "user", "content": "Hi"}] * 4
            with pytest.raises(BadRequest, match="4 messages is over the limit of 3"):
                client.chat("smollm2", many)
            long = [{"role": "user", "content": "Tell me everything about " + "the sea and the sky " * 20}]
            with pytest.raises(BadRequest, match="over the limit of 40") as raised:
                client.chat("smollm2", long, max_tokens=4)
            assert raised.value.details == {"max_prompt_tokens": 40}
            assert client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY).text
    finally:
        manager.stop()


def test_a_model_can_yield_the_cpu_to_the_others(client: ModelClient) -> None:
    """``nice`` in the catalogue is the worker's scheduling priority (the shipped LLMs yield to speech)."""
    nice = psutil.Process(client.load("smollm2-nice")["pid"]).nice()
    plain = psutil.Process(client.load("smollm2")["pid"]).nice()
    assert nice == plain + 7
    client.unload("smollm2-nice")


def test_no_request_can_name_a_path(client: ModelClient) -> None:
    """Models and voices resolve through the catalogue only: a path is just an unknown name."""
    for name in ("/etc/passwd", "../models/SmolLM2-135M-Instruct.Q4_1.gguf", str(REPO / "models" / "piper")):
        with pytest.raises(ModelNotFound):
            client.chat(name, [{"role": "user", "content": "Hi"}])
        with pytest.raises(ModelNotFound):
            client.load(name)
        with pytest.raises(ModelNotFound):
            client.synthesize("Hello.", voice=name)
        with pytest.raises(ModelNotFound):
            client.transcribe(b"RIFF", model=name)


def test_work_that_would_start_after_its_deadline_is_refused_at_once(fresh_manager: ManagerProcess) -> None:
    sock = dealer(fresh_manager.endpoint)
    try:
        args = {"model": "smollm2", "messages": QUESTION, **GREEDY}
        with fresh_manager.client(timeout=60) as client:
            client.chat("smollm2", QUESTION, max_tokens=24, **GREEDY)  # the model's time per request, measured
        running = raw_request(sock, "chat", {**args, "max_tokens": 64})
        hopeless = raw_request(sock, "chat", {**args, "max_tokens": 8}, deadline_ms=50)
        first = replies(sock, 1, timeout=30)
        assert list(first) == [hopeless], "refused before the running request ended, not timed out after"
        assert first[hopeless].body["code"] == "busy" and first[hopeless].body["details"]["retry_after_ms"] > 0
        assert replies(sock, 1, timeout=60)[running].type == "result"
    finally:
        sock.close()
