"""Who may talk to the gateway: the Host and Origin rules (gateway/trust.py) on their own, then over HTTP and the
Realtime WebSocket against the real manager and gateway; the page's sign-in with session tokens, sign-out, expiry
and the throttle on wrong keys (gateway/signin.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from daemonkit.settings import ConfigError
from gateway.config import load_gateway_settings
from gateway.signin import Sessions, Throttle
from gateway.trust import build_trust, refusal
from tests.conftest import model_status, wait_for
from tests.test_gateway import Stack, running_stack

KEY = "a-long-test-key-for-the-gateway-0123"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": False, "keep_alive": -1}

# ----- the rules, on their own ------------------------------------------------------------------------------------


def verdict(headers: dict[str, str], allowed_hosts=(), allowed_origins=(), method: str = "POST") -> str | None:
    trust = build_trust("127.0.0.1", list(allowed_hosts), list(allowed_origins))
    found = refusal(trust, method, {k.lower().encode(): v.encode() for k, v in headers.items()})
    return None if found is None else found.code


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:8100", "localhost:8100", "LOCALHOST", "[::1]:8100", "localhost.:9", "127.0.0.1", "10.1.2.3:8100"]
    + [socket.gethostname(), f"{socket.getfqdn()}:8100", "app.localhost:8100", ""],
)
def test_the_gateways_own_host_names_and_addresses_are_served(host: str) -> None:
    assert verdict({"Host": host} if host else {}) is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:8100",
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8100",
        "a b",
        "x:y:z",
    ],
)
def test_other_host_names_are_refused_unless_allowed(host: str) -> None:
    assert verdict({"Host": host}) == "host_not_allowed"
    if " " not in host and host.count(":") < 2:
        name = host.split(":")[0]
        assert verdict({"Host": host}, allowed_hosts=[name]) is None
        assert verdict({"Host": host}, allowed_hosts=["*"]) is None
    assert verdict({"Host": "api.example.com"}, allowed_hosts=["*.example.com"]) is None
    assert verdict({"Host": "example.com.evil.net"}, allowed_hosts=["*.example.com"]) == "host_not_allowed"
    for spelled in ("EVIL.EXAMPLE.", "evil.example.:80", "Evil.Example"):  # another case, a final dot: the same name
        assert verdict({"Host": spelled}) == "host_not_allowed", spelled


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "127.0.0.1:8100", [], None),  # curl, the SDKs: no Origin
        ("http://127.0.0.1:8100", "127.0.0.1:8100", [], None),  # the page itself
        ("http://localhost:8100", "localhost:8100", [], None),
        ("http://[::1]:8100", "[::1]:8100", [], None),
        ("https://localhost", "localhost", [], None),  # behind a TLS proxy on 443
        ("http://localhost:3000", "127.0.0.1:8100", [], "origin_not_allowed"),
        ("http://127.0.0.1:3000", "127.0.0.1:8100", [], "origin_not_allowed"),  # same host, another port
        ("http://localhost:8100", "127.0.0.1:8100", [], "origin_not_allowed"),  # not the Host the page named
        ("https://127.0.0.1:8100", "127.0.0.1:8100", [], None),
        ("null", "127.0.0.1:8100", [], "origin_not_allowed"),  # a sandboxed frame, a file:// page
        ("http://evil.example", "127.0.0.1:8100", [], "origin_not_allowed"),
        ("http://localhost:3000", "127.0.0.1:8100", ["http://localhost:3000"], None),
        ("http://localhost:3001", "127.0.0.1:8100", ["http://localhost:3000"], "origin_not_allowed"),
        ("http://localhost:3001", "127.0.0.1:8100", ["http://localhost:*"], None),
        ("https://localhost:3001", "127.0.0.1:8100", ["http://localhost:*"], "origin_not_allowed"),
        ("https://app.example.com", "127.0.0.1:8100", ["https://app.example.com:443"], None),
        ("https://a.example.com", "127.0.0.1:8100", ["https://*.example.com"], None),
        ("https://example.com.evil.net", "127.0.0.1:8100", ["https://*.example.com"], "origin_not_allowed"),
        ("chrome-extension://abcdef", "127.0.0.1:8100", ["chrome-extension://abcdef"], None),
        ("null", "127.0.0.1:8100", ["*"], None),
        ("http://localhost:*", "127.0.0.1:8100", [], "origin_not_allowed"),
        ("http://a/b", "127.0.0.1:8100", [], "origin_not_allowed"),
    ],
)
def test_an_origin_is_the_gateways_own_or_a_listed_one(origin, host, allowed, expected) -> None:
    headers = {"Host": host} | ({"Origin": origin} if origin is not None else {})
    assert verdict(headers, allowed_origins=allowed) == expected


def test_a_cross_site_fetch_without_origin_is_refused_but_a_navigation_is_not() -> None:
    """A browser leaves Origin out of a cross-origin GET it makes without CORS (an <img>, a no-cors fetch);
    Sec-Fetch-Site says where it came from. Ports do not make sites: localhost:3000 is same-site."""
    own = {"Host": "127.0.0.1:8100"}
    for site in ("cross-site", "same-site"):
        no_cors = own | {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"}
        assert verdict(no_cors, method="GET") == "origin_not_allowed"
        assert verdict(no_cors, method="GET", allowed_origins=["*"]) is None
        assert verdict(own | {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate"}, method="GET") is None
    assert verdict(own | {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}, method="GET") is None
    assert verdict(own | {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}, method="GET") is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("allowed_hosts", "evil.example:8100"),
        ("allowed_hosts", "http://evil.example"),
        ("allowed_hosts", "a b"),
        ("allowed_hosts", ""),
        ("allowed_hosts", "*evil"),
        ("allowed_origins", "localhost:3000"),
        ("allowed_origins", "http://localhost:3000/"),
        ("allowed_origins", "http://user@localhost"),
        ("allowed_origins", "null"),
        ("allowed_origins", "http://*"),
        ("allowed_origins", "http://localhost:3000\nx"),
        ("ui_session_ttl_s", 0),
        ("auth_max_failures", 0),
        ("auth_window_s", -1),
    ],
)
def test_hostile_settings_stop_the_gateway_at_start(tmp_path, key, value) -> None:
    path = tmp_path / "llm_config.yaml"
    entry = [value] if key.startswith("allowed_") else value
    path.write_text(json.dumps({"gateway": {key: entry}}))
    with pytest.raises(ConfigError, match=key):
        load_gateway_settings(path)


def test_good_settings_load_and_the_heartbeat_comes_from_the_managers_section(tmp_path) -> None:
    path = tmp_path / "llm_config.yaml"
    gateway = {"allowed_hosts": ["gateway.lan", "*.example.com", "[fe80::1]", "10.0.0.2", "*"]}
    gateway["allowed_origins"] = ["http://localhost:*", "https://app.example.com", "https://*.example.com", "*"]
    path.write_text(json.dumps({"manager": {"heartbeat_s": 0.25}, "gateway": gateway}))
    settings = load_gateway_settings(path)
    assert settings.manager_heartbeat_s == 0.25 and settings.allowed_hosts == gateway["allowed_hosts"]
    path.write_text(json.dumps({"gateway": {}}))
    assert load_gateway_settings(path).manager_heartbeat_s == 5.0


def test_sessions_expire_are_forgotten_on_sign_out_and_are_bounded() -> None:
    now = [0.0]
    sessions = Sessions(ttl_s=10, limit=3, clock=lambda: now[0])
    token = sessions.open()
    assert len(token) >= 40 and sessions.valid(token) and not sessions.valid(token + "x") and not sessions.valid("")
    now[0] = 9.9
    assert sessions.valid(token)
    now[0] = 10.0
    assert not sessions.valid(token), "expired"
    kept = [sessions.open() for _ in range(5)]
    assert len(sessions) == 3 and not sessions.valid(kept[0]) and sessions.valid(kept[-1]), "the oldest go first"
    sessions.close(kept[-1])
    assert not sessions.valid(kept[-1])


def test_the_throttle_counts_failures_per_address_in_a_window_and_is_bounded() -> None:
    now = [0.0]
    throttle = Throttle(max_failures=5, window_s=60, limit=100, clock=lambda: now[0])
    for second in range(5):
        assert throttle.retry_after_s("10.0.0.1") is None
        now[0] = float(second)
        throttle.failed("10.0.0.1")
    assert throttle.retry_after_s("10.0.0.1") == 56  # the first failure (at 0 s) leaves the window at 60 s
    assert throttle.retry_after_s("10.0.0.2") is None, "another address is not concerned"
    now[0] = 60.0
    assert throttle.retry_after_s("10.0.0.1") is None
    for n in range(1000):
        throttle.failed(f"10.1.{n // 256}.{n % 256}")
    assert len(throttle) == 100, "memory is bounded whatever the number of addresses"


# ----- over HTTP, against the real gateway ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[Stack]:
    settings = {"allowed_hosts": ["gateway.lan"], "allowed_origins": ["http://app.example:3000", "http://localhost:*"]}
    with running_stack(settings) as stack:
        yield stack


def port(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


def test_the_rule_table_over_http(guarded: Stack) -> None:
    url = guarded.url
    served = [
        {},
        {"Origin": url},
        {"Origin": "http://app.example:3000"},
        {"Origin": "http://localhost:5555"},
        {"Host": f"localhost:{port(guarded)}", "Origin": f"http://localhost:{port(guarded)}"},
        {"Host": f"gateway.lan:{port(guarded)}"},
        {"Host": f"192.168.1.5:{port(guarded)}"},
    ]
    for headers in served:
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 200, headers
        assert httpx.get(f"{url}/api/tags", headers=headers, timeout=10).status_code == 200, headers
    for origin in ("http://127.0.0.1:3000", "http://evil.example", "null"):
        answer = httpx.get(f"{url}/v1/models", headers={"Origin": origin}, timeout=10)
        assert answer.status_code == 403, origin
        error = answer.json()["error"]
        assert error["code"] == "origin_not_allowed" and "gateway.allowed_origins" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}, "OpenAI's shape"
        answer = httpx.post(f"{url}/api/chat", content=json.dumps(CHAT), headers={"Origin": origin}, timeout=10)
        assert answer.status_code == 403 and "gateway.allowed_origins" in answer.json()["error"], "Ollama's shape"
    listed = {"Origin": "http://app.example:3000"}
    assert httpx.get(f"{url}/api/tags", headers=listed, timeout=10).headers["access-control-allow-origin"] == "*"
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"}
    preflight = httpx.options(f"{url}/v1/chat/completions", headers=listed | ask, timeout=10)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"], preflight.headers
    foreign = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "http://evil.example"} | ask, timeout=10)
    assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    answer = httpx.get(f"{url}/api/ps", headers={"Host": f"evil.example:{port(guarded)}"}, timeout=10)
    assert answer.status_code == 403 and "gateway.allowed_hosts" in answer.json()["error"]
    answer = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"}, timeout=10)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{url}/ui", headers={"Host": "evil.example"}, timeout=10).status_code == 403
    page = httpx.get(f"{url}/ui", timeout=10)  # no other site may frame it (its buttons would act for that site)
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    with guarded.client() as client:
        assert model_status(client, "smollm2")["requests"] == 0, "no refused chat reached the manager"


def test_the_realtime_handshake_from_another_origin_is_refused(guarded: Stack) -> None:
    ws_url = guarded.url.replace("http://", "ws://") + "/v1/realtime?model=smollm2"
    rebound = f"ws://evil.example:{port(guarded)}/v1/realtime?model=smollm2"
    for url, origin in ((ws_url, "http://evil.example"), (rebound, f"http://evil.example:{port(guarded)}")):
        sock = socket.create_connection(("127.0.0.1", port(guarded)), timeout=30)  # evil.example, rebound
        with pytest.raises(InvalidStatus) as refused:
            websockets.sync.client.connect(url, sock=sock, origin=origin, open_timeout=30)
        assert refused.value.response.status_code == 403
    with websockets.sync.client.connect(ws_url, origin=guarded.url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    with websockets.sync.client.connect(ws_url, open_timeout=30) as ws:  # no Origin: not a browser
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"


# ----- the page's sign-in -------------------------------------------------------------------------------------------

SESSION_TTL_S = 5.0
WINDOW_S = 4.0  # the dozen requests inside it take about 0.1 s quiet, 1 s on a busy machine


@pytest.fixture(scope="module")
def keyed() -> Iterator[Stack]:
    settings = {"api_keys": [KEY], "ui_session_ttl_s": SESSION_TTL_S, "auth_window_s": WINDOW_S}
    with running_stack(settings) as stack:
        yield stack


def sign_in(http: httpx.Client, key: str = KEY) -> httpx.Response:
    return http.post("/ui/login", data={"key": key}, headers={"Origin": str(http.base_url).rstrip("/")})


def test_signing_in_gives_a_session_not_the_key_and_signing_out_ends_it(keyed: Stack) -> None:
    with httpx.Client(base_url=keyed.url, timeout=10) as http:
        ask = {"Origin": keyed.url, "Access-Control-Request-Method": "GET"}
        assert http.options("/v1/models", headers=ask).status_code == 200, "a preflight carries no key"
        assert http.get("/v1/models", headers={"Origin": keyed.url}).status_code == 401
        answer = sign_in(http)
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert KEY not in cookie and "mm_ui_session=" in cookie
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/ui" in cookie.lower()
        token = answer.cookies["mm_ui_session"]
        assert len(token) >= 40
        jar = {"Cookie": f"mm_ui_session={token}"}
        assert httpx.get(f"{keyed.url}/ui/api/status", headers=jar, timeout=10).status_code == 200
        assert 'action="/ui/logout"' in httpx.get(f"{keyed.url}/ui", headers=jar, timeout=10).text
        assert httpx.get(f"{keyed.url}/v1/models", headers=jar, timeout=10).status_code == 401, "for /ui only"
        out = httpx.post(f"{keyed.url}/ui/logout", headers={"Origin": keyed.url} | jar, timeout=10)
        assert out.status_code == 303 and "mm_ui_session=" in out.headers["set-cookie"]
        assert httpx.get(f"{keyed.url}/ui/api/status", headers=jar, timeout=10).status_code == 401, "forgotten"
        assert httpx.get(f"{keyed.url}/ui", headers=jar, timeout=10).status_code == 401

        jar = {"Cookie": f"mm_ui_session={sign_in(http).cookies['mm_ui_session']}"}
        assert httpx.get(f"{keyed.url}/ui/api/status", headers=jar, timeout=10).status_code == 200
        wait_for(  # the session's lifetime, polled
            lambda: httpx.get(f"{keyed.url}/ui/api/status", headers=jar, timeout=10).status_code == 401,
            timeout=SESSION_TTL_S + 60,
            interval=0.25,
        )


def test_wrong_keys_are_throttled_per_address_the_right_one_too(keyed: Stack) -> None:
    """Five wrong keys within the window, and the address gets 429 for any key, the right one too (a guesser
    would see its hit otherwise), until the window has passed; another address is not concerned; a live page
    session is still served (its token cannot be guessed)."""
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with (
        httpx.Client(base_url=keyed.url, timeout=10) as http,
        httpx.Client(base_url=keyed.url, timeout=10, transport=other) as neighbour,
    ):
        token = sign_in(http).cookies["mm_ui_session"]
        codes = []
        for n in range(10):
            wrong = {"Authorization": f"Bearer wrong-key-number-{n:04d}-0000000000"}
            codes.append(http.get("/v1/models", headers=wrong).status_code)
        assert codes == [401] * 5 + [429] * 5, codes
        right = {"Authorization": f"Bearer {KEY}"}
        answer = http.get("/v1/models", headers=right)
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["code"] == "too_many_failures"
        assert http.get("/api/tags", headers=right).status_code == 429
        login = sign_in(http)
        assert login.status_code == 429 and int(login.headers["retry-after"]) >= 1
        assert http.get("/ui/api/status", headers={"Cookie": f"mm_ui_session={token}"}).status_code == 200
        assert neighbour.get("/v1/models", headers=right).status_code == 200, "another address"
        for n in range(5):
            assert sign_in(neighbour, f"wrong-form-key-{n:04d}-00000000").status_code == 401
        assert sign_in(neighbour).status_code == 429, "the sign-in form counts too"
        wait_for(lambda: http.get("/v1/models", headers=right).status_code == 200, timeout=WINDOW_S + 60, interval=0.5)
    log = (keyed.manager.run_dir / "gateway.log").read_text()
    assert KEY not in log and '"event": "key_throttled"' in log
