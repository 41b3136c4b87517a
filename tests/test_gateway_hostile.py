"""The gateway against clients that send too much, too deep, too big a number, what it does not serve, or hang up
half way: a typed 4xx at once, one log line, the generation cancelled, the gateway alive and quick to stop."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import json_values, model_status, wait_for
from tests.test_gateway import Stack, stack, start_gateway  # noqa: F401 - stack: the fixture these tests use

SAY_HI = [{"role": "user", "content": "Hi"}]
COUNTING = [{"role": "user", "content": "Count from 1 to 1000, one number a line: 1, 2, 3,"}]
MIB_QUARTER = 256 * 1024
COUNTING_TEXT = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a reliably long completion


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:  # noqa: F811 - the fixture above
    with httpx.Client(base_url=stack.url, timeout=300) as client:  # a bound for a busy machine (a load and a reply)
        yield client


def gateway_log(stack: Stack) -> list[dict]:  # noqa: F811
    text = (stack.manager.run_dir / "gateway.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_alive(http: httpx.Client) -> None:
    started = time.monotonic()
    assert http.get("/api/version").status_code == 200 and time.monotonic() - started < 2


def test_a_body_the_manager_would_drop_is_refused_at_once_with_413(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    """The manager takes messages of up to 4 MiB here (the test YAML): a 5 MiB body would be dropped by ZeroMQ
    unanswered, so the gateway refuses it itself, whatever its own max_body_bytes says."""
    limit = stack.manager.config["limits"]["max_message_bytes"]
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * (limit + MIB_QUARTER)}]}
    started = time.monotonic()
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"
    assert time.monotonic() - started < 2
    # Under the body limit but over the manager's once packed with its envelope: refused before it is sent.
    just_under = {"model": "smollm2", "prompt": "x" * (limit - 64)}
    answer = http.post("/v1/completions", json=just_under)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large", answer.text
    assert_alive(http)


@pytest.mark.parametrize(
    ("path", "build"),
    [
        ("/v1/chat/completions", lambda deep: {"model": "smollm2", "messages": SAY_HI, "tools": deep}),
        ("/api/chat", lambda deep: {"model": "smollm2", "messages": SAY_HI, "format": deep}),
    ],
)
@pytest.mark.parametrize("bracket", ["{", "["])
def test_json_nested_too_deep_is_a_400_naming_the_field(stack: Stack, http: httpx.Client, path, build, bracket) -> None:  # noqa: F811
    depth = 100_000
    opening, closing = ('{"a":' * depth, "1" + "}" * depth) if bracket == "{" else ("[" * depth, "]" * depth)
    marker = '"DEEP"'
    body = json.dumps(build("DEEP")).replace(marker, opening + closing)
    answer = http.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "nested deeper" in answer.text
    shallow_but_over = json.dumps(build(json.loads("[" * 70 + "]" * 70)))
    answer = http.post(path, content=shallow_but_over, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "nested deeper than 64" in answer.text
    field = "tools" if path.startswith("/v1") else "format"
    assert field in answer.text, "the field is named"
    assert_alive(http)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_integers_msgpack_cannot_carry_are_a_400_naming_the_field(stack: Stack, http: httpx.Client, seed: int) -> None:  # noqa: F811
    body = {"model": "smollm2", "messages": SAY_HI, "max_tokens": 2, "seed": seed}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "seed", answer.text
    answer = http.post("/api/chat", json={"model": "smollm2", "messages": SAY_HI, "options": {"seed": seed}})
    assert answer.status_code == 400 and "options.seed" in answer.json()["error"]
    assert_alive(http)


def test_ollama_images_are_refused_until_served(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    image = "iVBORw0KGgo="
    answer = http.post(
        "/api/chat",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "What is this?", "images": [image]}]},
    )
    assert answer.status_code == 400 and "images" in answer.json()["error"]
    answer = http.post("/api/generate", json={"model": "smollm2", "prompt": "Describe it.", "images": [image]})
    assert answer.status_code == 400 and "images" in answer.json()["error"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"presence_penalty": "high"}, "presence_penalty"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"suffix": " world"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"logprobs": 2}, "logprobs"),
        ("/v1/embeddings", {"dimensions": 64}, "dimensions"),
        ("/v1/audio/speech", {"stream_format": "sse"}, "stream_format"),
        ("/v1/audio/speech", {"instructions": "Whisper it."}, "instructions"),
    ],
)
def test_openai_parameters_not_honoured_are_refused_naming_them(
    stack: Stack,  # noqa: F811
    http: httpx.Client,
    path: str,
    extra: dict,
    param: str,
) -> None:
    base = {
        "/v1/chat/completions": {"model": "smollm2", "messages": SAY_HI, "max_tokens": 2},
        "/v1/completions": {"model": "smollm2", "prompt": "Hello", "max_tokens": 2},
        "/v1/embeddings": {"model": "smollm2", "input": "Hello"},
        "/v1/audio/speech": {"model": "tts-1", "input": "Hello."},
    }[path]
    answer = http.post(path, json={**base, **extra})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    if param not in ("presence_penalty",):  # the off values are accepted
        off = {"logprobs": False, "top_logprobs": None, "echo": False, "suffix": None, "best_of": 1}
        off |= {"dimensions": None, "stream_format": "audio", "instructions": None}
        if path == "/v1/completions" and param == "logprobs":
            off["logprobs"] = None
        answer = http.post(path, json={**base, param: off[param]})
        assert answer.status_code == 200, answer.text


def test_ollama_parameters_not_honoured_are_refused_naming_them(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    for path, extra, name in (
        ("/api/chat", {"messages": SAY_HI, "think": True}, "think"),
        ("/api/generate", {"prompt": "Hi", "suffix": "!"}, "suffix"),
        ("/api/generate", {"prompt": "Hi", "context": [1, 2, 3]}, "context"),
        ("/api/generate", {"prompt": "Hi", "options": {"num_gpu": "all"}}, "num_gpu"),
    ):
        answer = http.post(path, json={"model": "smollm2", "stream": False, **extra})
        assert answer.status_code == 400 and name in answer.json()["error"], (path, answer.text)


def test_translations_and_the_older_embeddings_are_served(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    with stack.client() as client:
        wav = client.synthesize("The weather is lovely today.").audio.to_wav()
    answer = http.post(
        "/v1/audio/translations", files={"file": ("a.wav", wav, "audio/wav")}, data={"model": "whisper-1"}
    )
    assert answer.status_code == 200 and "weather" in answer.json()["text"].lower(), answer.text
    answer = http.post("/api/embeddings", json={"model": "smollm2", "prompt": "Hello"})
    vector = answer.json()["embedding"]
    assert answer.status_code == 200 and len(vector) > 100
    assert http.post("/api/embeddings", json={"model": "smollm2", "prompt": ""}).json() == {"embedding": []}


def test_keep_alive_sets_how_long_the_model_stays_loaded(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    """Home Assistant sends keep_alive -1: the model (idle_ttl_s 0.3 in the YAML) stays; a duration replaces it; a
    malformed one is a 400."""
    model = "smollm2-quick-idle"
    answer = http.post("/api/chat", json={"model": model, "messages": SAY_HI, "stream": False, "keep_alive": -1})
    assert answer.status_code == 200, answer.text
    with stack.client() as client:
        entry = model_status(client, model)
        assert entry["state"] == "ready" and entry["ttl_s"] == -1 and entry["ttl_left_s"] is None
        body = {"model": model, "messages": SAY_HI, "stream": False, "keep_alive": "1h30m"}
        assert http.post("/api/chat", json=body).status_code == 200
        assert model_status(client, model)["ttl_s"] == 5400
        body = {"model": model, "prompt": "Hi", "stream": False, "keep_alive": "1s", "options": {"num_predict": 2}}
        assert http.post("/api/generate", json=body).status_code == 200
        wait_for(lambda: model_status(client, model)["state"] == "unloaded", timeout=60)
        assert model_status(client, model)["ttl_s"] == 0.3, "the keep-alive went with the model"
    bad = http.post("/api/chat", json={"model": model, "messages": SAY_HI, "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


def test_a_client_gone_mid_body_is_one_log_line(stack: Stack, http: httpx.Client) -> None:  # noqa: F811
    address = urlsplit(stack.url)
    with socket.create_connection((address.hostname, address.port)) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"model": "smollm2", "messages": ['
        )
    wait_for(lambda: any(e.get("during") == "body" for e in gateway_log(stack) if e["event"] == "client_gone"))
    assert "Traceback" not in (stack.manager.run_dir / "gateway.log").read_text()
    assert_alive(http)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": COUNTING_TEXT, "max_tokens": 500, "temperature": 0}),
        ("/api/generate", {"prompt": COUNTING_TEXT, "stream": False, "options": {"num_predict": -1, "temperature": 0}}),
    ],
)
def test_a_whole_answer_whose_client_left_is_cancelled(stack: Stack, http: httpx.Client, path, body) -> None:  # noqa: F811
    log = stack.manager.run_dir / "manager.log"
    cancelled_before = log.read_text().count('"request_cancelled"')
    with pytest.raises(httpx.ReadTimeout):
        http.post(path, json={"model": "smollm2", **body}, timeout=0.5)
    wait_for(lambda: log.read_text().count('"request_cancelled"') > cancelled_before, timeout=10)
    with stack.client() as client:
        wait_for(lambda: model_status(client, "smollm2")["in_flight"] == 0, timeout=5)
    assert any(e.get("during") == "generation" for e in gateway_log(stack) if e["event"] == "client_gone")
    assert "Traceback" not in (stack.manager.run_dir / "gateway.log").read_text()


def test_sigterm_ends_the_gateway_within_5_s_whatever_is_pending(stack: Stack) -> None:  # noqa: F811
    gateway, url = start_gateway(stack.manager, stack.manager.config_path, name="doomed")
    pending: list[httpx.Response | Exception] = []

    def ask() -> None:
        try:
            body = {"model": "smollm2", "prompt": COUNTING_TEXT, "max_tokens": 500, "temperature": 0}
            pending.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
        except Exception as exc:  # noqa: BLE001 - the connection closes under it: that is the point
            pending.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    with stack.client() as client:
        wait_for(lambda: model_status(client, "smollm2")["in_flight"] == 1, timeout=30)
    started = time.monotonic()
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    code = gateway.proc.wait(timeout=10)
    took = time.monotonic() - started
    assert took < 5, f"the gateway took {took:.1f} s to stop"
    assert code in (0, -signal.SIGTERM), code  # uvicorn ends by raising the signal again once shut down
    thread.join(timeout=10)
    assert pending, "the pending request was answered or cut off"
    with stack.client() as client:
        wait_for(lambda: model_status(client, "smollm2")["in_flight"] == 0, timeout=10)


# ----- fuzz: whatever arrives over HTTP ---------------------------------------------------------------------------

ROUTES = [
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/speech",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/api/pull",
    "/api/copy",
    "/ui/api/pull",
    "/ui/login",
]
FIELDS = ["model", "messages", "prompt", "input", "stream", "options", "seed", "max_tokens", "keep_alive", "tools"]
FIELDS += ["format", "images", "response_format", "stop", "temperature", "voice", "logprobs", "content", "role"]
FIELDS += ["instructions", "previous_response_id", "type", "call_id", "output", "arguments", "tool_choice"]
FIELDS += ["ref", "key", "source", "destination"]
JSON_VALUES = json_values(words=["smollm2", "user", "0", "-1", "5m", "json"], keys=FIELDS, size=4, max_leaves=12)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(min_value=1, max_value=5000)),
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), body=BODIES)
def test_arbitrary_http_bodies_get_a_typed_answer_and_the_gateway_stays_quick(
    stack: Stack,  # noqa: F811
    route: str,
    body: bytes,
) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        answer = http.post(route, content=body, headers={"content-type": "application/json"})
        assert answer.status_code < 500 or answer.status_code in (503, 504), (route, body[:200], answer.text)
        assert_alive(http)
    assert "Traceback" not in (stack.manager.run_dir / "gateway.log").read_text()


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    host=st.one_of(HEADER_TEXT, st.sampled_from(["localhost", "[::1]:1", "a" * 300, "evil.example.", "[zz]"])),
    origin=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(["null", "http://", "http://[::1", "x://*.y:*"])),
    site=st.sampled_from([None, "cross-site", "same-site", "same-origin", "none", "\xff"]),
)
def test_any_host_and_origin_headers_get_a_typed_answer(stack: Stack, host: str, origin, site) -> None:  # noqa: F811
    headers = {"Host": host.strip() or "x"}
    if origin is not None:
        headers["Origin"] = origin.strip() or "x"
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        answer = http.get("/v1/models", headers={k: v.encode("latin-1") for k, v in headers.items()})  # type: ignore[misc]
        assert answer.status_code in (200, 400, 403), (headers, answer.text)
        if answer.status_code == 403:
            assert "gateway.allowed_" in answer.json()["error"]["message"]
        assert_alive(http)
    assert "Traceback" not in (stack.manager.run_dir / "gateway.log").read_text()
