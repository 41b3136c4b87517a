"""The page at ``/ui``, driven in a real headless browser (Debian's Chromium through Playwright) against the real
manager and gateway: live without a reload, its buttons act, the API keys guard it, and it subscribes only while
open."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
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
