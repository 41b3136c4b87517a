"""The page at ``/ui``, driven in a real headless browser (Debian's Chromium through Playwright) against the real
manager and gateway: live without a reload, its buttons act, the API keys guard it (a session, a sign-out), it
subscribes only while open, and it says when the manager is gone and when it is back. Pages of other origins and
rebound host names get nothing from the gateway and change nothing in the manager."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import model_status, wait_for
from tests.test_gateway import running_stack
from tests.test_pull import SMOL_REPO, make_mirror

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here (Debian's `chromium` package; .ci/run installs it)"
)
KEY = "a-long-test-key-for-the-page-0123"


@pytest.fixture(scope="module")
def playwright() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright) -> Iterator:
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield launched
    launched.close()


def watch_lines(log: Path) -> list[str]:
    return re.findall(r'"event": "ui_watch_(started|ended)"', log.read_text())


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local stand-in for the Hugging Face hub, for the manager's pulls."""
    mirror = make_mirror()
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    yield
    mirror.stop()


def test_the_page_follows_the_manager_live_and_its_buttons_act(browser, hub) -> None:
    from playwright.sync_api import expect

    with running_stack({}) as stack:
        log = stack.manager.run_dir / "gateway.log"
        assert watch_lines(log) == [], "no subscription while nobody watches"
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.goto(f"{stack.url}/ui")
        state = page.locator('tr[data-model="smollm2"] .state')
        expect(state).to_have_text("unloaded", timeout=10_000)
        expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        wait_for(lambda: watch_lines(log) == ["started"], timeout=5)

        with stack.client() as client:
            client.load("smollm2")  # through the API: the page shows it within a second, without a reload
            expect(state).to_have_text("ready", timeout=1_000)
            expect(page.locator("#log")).to_contain_text("model.loaded smollm2")

            page.locator('tr[data-model="gemma3-270m"] button[data-action="load"]').click()
            expect(page.locator('tr[data-model="gemma3-270m"] .state')).to_have_text("ready", timeout=60_000)
            assert model_status(client, "gemma3-270m")["state"] == "ready"

            page.locator('tr[data-model="smollm2"] button[data-action="pin"]').click()
            expect(page.locator('tr[data-model="smollm2"] button[data-action="unpin"]')).to_have_class("on")
            assert model_status(client, "smollm2")["pinned"] is True

            pulled = f"hf.co/{SMOL_REPO}:Q4_1"
            page.fill("#pull-ref", pulled)
            page.click("#pull-form button")
            expect(page.locator(f'.pull[data-model="{pulled}"]')).to_contain_text("success", timeout=60_000)
            expect(page.locator(f'tr[data-model="{pulled}"] .state')).to_have_text("unloaded")
            expect(page.locator("#log")).to_contain_text(f"model.added {pulled}")
            expect(page.locator('.device[data-device="cpu"]')).to_contain_text("2 models")
            shot = Path(os.environ.get("MM_UI_SCREENSHOT", Path(tempfile.gettempdir()) / "mm-ui.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert 0 < shot.stat().st_size < 200 * 1024, f"{shot.stat().st_size} bytes"

            page.fill("#pull-ref", "not a reference")
            page.click("#pull-form button")
            expect(page.locator("#pull-error")).to_contain_text("is not a model reference")

            page.locator('tr[data-model="gemma3-270m"] button[data-action="unload"]').click()
            expect(page.locator('tr[data-model="gemma3-270m"] .state')).to_have_text("unloaded", timeout=30_000)
            expect(page.locator("#log")).to_contain_text("model.unloaded gemma3-270m requested")

        with stack.client() as client:
            entry = model_status(client, "smollm2")
            assert entry["state"] == "ready" and entry["pinned"] is True
        second = browser.new_page()
        second.goto(f"{stack.url}/ui")
        expect(second.locator("#live")).to_have_text("live", timeout=10_000)
        wait_for(lambda: watch_lines(log) == ["started", "started"], timeout=5)  # one subscription per page
        page.close()
        second.close()
        wait_for(lambda: watch_lines(log).count("ended") == 2, timeout=15)


def test_with_api_keys_the_page_wants_a_key(browser) -> None:
    from playwright.sync_api import expect

    with running_stack({"api_keys": [KEY]}) as stack:
        refused = httpx.get(f"{stack.url}/ui", timeout=10)
        assert refused.status_code == 401 and 'name="key"' in refused.text and "smollm2" not in refused.text
        for path in ("/ui/api/status", "/ui/api/events"):
            assert httpx.get(f"{stack.url}{path}", timeout=10).status_code == 401
        assert httpx.post(f"{stack.url}/ui/api/models/load/smollm2", timeout=10).status_code == 401
        with stack.client() as client:
            assert model_status(client, "smollm2")["state"] == "unloaded", "a refused button did nothing"

        page = browser.new_page()
        page.goto(f"{stack.url}/ui")
        page.fill('input[name="key"]', "not-the-key-at-all-000")
        page.click('button[type="submit"]')
        expect(page.locator(".error")).to_contain_text("not one of the gateway's API keys")
        page.fill('input[name="key"]', KEY)
        page.click('button[type="submit"]')
        expect(page.locator('tr[data-model="smollm2"] .state')).to_have_text("unloaded", timeout=10_000)
        expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        page.close()


def test_signing_out_ends_the_pages_session(browser) -> None:
    from playwright.sync_api import expect

    with running_stack({"api_keys": [KEY]}) as stack:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{stack.url}/ui")
        page.fill('input[name="key"]', KEY)
        page.click('button[type="submit"]')
        expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        cookie = next(c for c in context.cookies() if c["name"] == "mm_ui_session")
        assert cookie["value"] != KEY and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.click("#signout button")
        expect(page.locator('input[name="key"]')).to_be_visible(timeout=10_000)
        stale = {"Cookie": f"mm_ui_session={cookie['value']}"}
        assert httpx.get(f"{stack.url}/ui/api/status", headers=stale, timeout=10).status_code == 401
        context.close()


# ----- pages of other origins, and rebound host names ----------------------------------------------------------------

ATTACK = """<!doctype html><title>working</title>
<iframe name="sink"></iframe><iframe name="sink2"></iframe>
<form id="json-form" method="post" enctype="text/plain" target="sink" action="GATEWAY/ui/api/pull">
  <input name='{"ref": "PULLED", "x": "' value='"}'></form>
<form id="plain-form" method="post" target="sink2" action="GATEWAY/ui/api/models/load/smollm2"></form>
<script>
const post = (path, body) => fetch("GATEWAY" + path, {
  method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: body === undefined ? null : body});
const submit = (form, frame) => new Promise((done) => {
  document.querySelector(`iframe[name=${frame}]`).onload = done;
  document.getElementById(form).submit();
});
(async () => {
  await Promise.allSettled([
    post("/ui/api/models/load/smollm2"),
    post("/ui/api/models/pin/gemma3-270m"),
    post("/api/chat", JSON.stringify({model: "smollm2", messages: [{role: "user", content: "Hi"}], stream: false,
                                      keep_alive: -1})),
    post("/api/generate", JSON.stringify({model: "gemma3-270m", prompt: "", keep_alive: -1})),
    post("/api/pull", JSON.stringify({model: "PULLED", stream: false})),
    post("/api/copy", JSON.stringify({source: "smollm2", destination: "evil"})),
    post("/ui/api/pull", JSON.stringify({ref: "PULLED"})),
    fetch("GATEWAY/ui/api/status", {mode: "no-cors"}),
    fetch("GATEWAY/api/ps", {mode: "no-cors"}),
  ]);
  await submit("json-form", "sink");
  await submit("plain-form", "sink2");
  document.title = "done";
})();
</script>"""
ATTACKED = [
    "/ui/api/models/load/smollm2",
    "/ui/api/models/pin/gemma3-270m",
    "/api/chat",
    "/api/generate",
    "/api/pull",
    "/api/copy",
    "/ui/api/pull",
    "/ui/api/status",
    "/api/ps",
]


def refused_paths(log: Path) -> list[str]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line["path"] for line in lines if line.get("event") == "request_refused"]


def assert_untouched(stack) -> None:
    """Nothing loaded, pinned, kept, pulled, copied or asked of a model."""
    with stack.client() as client:
        status = client.status()
        names = {m["name"] for m in status["models"]}
        assert not any(name.startswith("hf.co/") for name in names), names
        assert "evil" not in status["catalogue"]["aliases"], status["catalogue"]
        assert not status.get("pulls"), status.get("pulls")
        for name in ("smollm2", "gemma3-270m"):
            entry = model_status(client, name)
            assert entry["state"] == "unloaded" and not entry["pinned"] and entry["requests"] == 0, entry


@pytest.fixture
def attacker() -> Iterator[http.server.ThreadingHTTPServer]:
    """A web server on another port for the attacker's pages (put into its `pages` by path)."""
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            body = pages.get(self.path.split("?")[0], b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.pages = pages  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def test_a_page_on_another_origin_changes_nothing_and_reads_nothing(browser, hub, attacker) -> None:
    """no-cors fetches, text/plain bodies and form posts need no CORS preflight: the browser sends them; the
    gateway refuses them for their Origin (or, for the GETs, their Sec-Fetch-Site), whatever the route."""
    from playwright.sync_api import expect

    with running_stack({}) as stack:
        page_html = ATTACK.replace("GATEWAY", stack.url).replace("PULLED", f"hf.co/{SMOL_REPO}:Q4_1")
        attacker.pages["/attack.html"] = page_html.encode()
        page = browser.new_page()
        page.goto(f"http://localhost:{attacker.server_address[1]}/attack.html")
        expect(page).to_have_title("done", timeout=60_000)
        assert_untouched(stack)
        log = stack.manager.run_dir / "gateway.log"
        wait_for(lambda: set(ATTACKED) <= set(refused_paths(log)), timeout=30)
        assert refused_paths(log).count("/ui/api/pull") >= 2 and "/ui/api/models/load/smollm2" in refused_paths(log)
        assert_untouched(stack)
        page.close()

        own = browser.new_page()  # the gateway's own page still works
        own.goto(f"{stack.url}/ui")
        expect(own.locator("#live")).to_have_text("live", timeout=10_000)
        own.locator('tr[data-model="smollm2"] button[data-action="pin"]').click()
        expect(own.locator('tr[data-model="smollm2"] button[data-action="unpin"]')).to_have_class("on", timeout=10_000)
        own.close()


def test_a_rebound_host_name_gets_nothing(playwright) -> None:
    """DNS rebinding: the attacker's name, resolved to 127.0.0.1, makes its page same-origin with the gateway; the
    gateway refuses the name itself, for the page, its API and Ollama's alike."""
    rebinding = playwright.chromium.launch(
        executable_path=CHROMIUM, args=["--no-sandbox", "--host-resolver-rules=MAP evil.example 127.0.0.1"]
    )
    try:
        with running_stack({}) as stack:
            with stack.client() as client:
                client.copy("smollm2", "mine")
            port = stack.url.rsplit(":", 1)[1]
            page = rebinding.new_page()
            answer = page.goto(f"http://evil.example:{port}/ui")
            assert answer is not None and answer.status == 403 and "gateway.allowed_hosts" in answer.text()
            tries = page.evaluate(
                """async () => {
                  const read = async (path, options) => {
                    const answer = await fetch(path, options);
                    return [path, answer.status, await answer.text()];
                  };
                  return Promise.all([
                    read("/ui/api/status"),
                    read("/api/ps"),
                    read("/ui/api/models/load/smollm2", {method: "POST"}),
                    read("/api/chat", {method: "POST", body: JSON.stringify(
                      {model: "smollm2", messages: [{role: "user", content: "Hi"}], stream: false})}),
                    read("/api/delete", {method: "DELETE", body: JSON.stringify({model: "mine"})}),
                  ]);
                }"""
            )
            for path, status, text in tries:
                assert status == 403 and "smollm2" not in text and "gateway.allowed_hosts" in text, (path, text)
            with stack.client() as client:
                assert client.status()["catalogue"]["aliases"].get("mine") == "smollm2", "not deleted"
            assert_untouched(stack)
            page.close()
    finally:
        rebinding.close()


# ----- the manager gone and back ---------------------------------------------------------------------------------


def test_the_page_says_the_manager_is_unreachable_and_recovers_by_itself(browser) -> None:
    """The test manager beats every 0.5 s: two beats without one and the gateway says the link is down; the page
    shows it, and goes live again, without a reload, once a manager answers on the same endpoint."""
    from playwright.sync_api import expect

    with running_stack({}) as stack:
        page = browser.new_page()
        page.goto(f"{stack.url}/ui")
        live = page.locator("#live")
        expect(live).to_have_text("live", timeout=10_000)
        expect(page.locator("#manager")).to_contain_text(f"pid {stack.manager.proc.pid}", timeout=10_000)
        stack.manager.stop(signal.SIGKILL)
        expect(live).to_have_text("manager unreachable", timeout=15_000)
        stack.manager.start()
        expect(live).to_have_text("live", timeout=30_000)
        expect(page.locator("#manager")).to_contain_text(f"pid {stack.manager.proc.pid}", timeout=30_000)
        log = (stack.manager.run_dir / "gateway.log").read_text()
        assert '"event": "ui_manager_silent"' in log and '"event": "ui_manager_back"' in log
        page.close()
