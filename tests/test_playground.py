"""The playground page of `duet serve`, in a real headless Chromium against a live server
with the embedded pair: the page loads, a question streams a signal and an answer, and the
M-alone comparison shows the savings.

Needs Debian's chromium (`.ci/run` installs it) and the `playwright` Python package, which
drives that browser (no browser download). `DUET_PLAYGROUND_SCREENSHOT=path` saves a
screenshot of the finished page (docs/serving.md's comes from here).
"""

from __future__ import annotations

import os
import shutil

import pytest
from test_serve import start_server

from duetlm.backends import BackendOptions, load_backend
from duetlm.config import DuetConfig
from duetlm.models import EMBEDDED_BUDGETS
from duetlm.protocol import Duet
from duetlm.serve import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="the playground test needs playwright")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's)"),
]
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "page-key"


@pytest.fixture(scope="module")
def live_server():
    options = BackendOptions(device="cpu")
    duet = Duet(
        load_backend("tiny-M", options), load_backend("tiny-m", options), DuetConfig(**EMBEDDED_BUDGETS)
    )
    server, thread, url = start_server(duet, ServeConfig(api_key=KEY))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_a_question_streams_a_signal_and_an_answer_and_the_savings(live_server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 640})
        page.goto(live_server)
        assert page.title() == "duetlm playground"
        assert "tiny-M" in page.inner_text("#models")  # /health answered
        # the order in which the panes first get text, to see the signal stream before the
        # answer: one observer sees every mutation in the order it was made, even when both
        # panes are written in one task (a clock reads the same time for both then)
        page.evaluate(
            """() => { window.firstText = {}; let order = 0;
               const panes = ["signal", "answer"].map(id => [id, document.getElementById(id)]);
               new MutationObserver(records => { for (const r of records) {
                   if (r.type !== "characterData" && r.addedNodes.length === 0) continue;
                   order++;
                   for (const [id, pane] of panes) if (pane.contains(r.target)) window.firstText[id] ??= order; } })
                 .observe(document.body, { childList: true, characterData: true, subtree: true }); }"""
        )
        page.fill("#api-key", KEY)
        page.check("#compare")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        signal, answer = page.inner_text("#signal"), page.inner_text("#answer")
        assert "7+5=2" in signal and "\\boxed{8}" in answer
        assert "\\boxed{8}" in page.inner_text("#alone-answer") and page.inner_text("#alone-signal")
        for pane in ("#usage-duet", "#usage-alone"):
            assert "output tokens" in page.inner_text(pane)
        assert page.inner_text("#savings").startswith("M-token savings: ")
        # the panes' headings as shown (after CSS): m's answer and M's answer stay apart
        duet_pane = page.locator("#signal").locator("xpath=../..")
        alone_pane = page.locator("#alone-signal").locator("xpath=../..")
        assert duet_pane.locator("h3").all_inner_texts() == ["M's signal (reasoning)", "m's answer"]
        assert alone_pane.locator("h3").all_inner_texts() == ["M's thinking", "M's answer"]
        first = page.evaluate("window.firstText")
        assert first["signal"] < first["answer"]
        if os.environ.get("DUET_PLAYGROUND_SCREENSHOT"):
            page.screenshot(path=os.environ["DUET_PLAYGROUND_SCREENSHOT"], full_page=True)
        browser.close()


def test_a_wrong_key_is_shown_not_hidden(live_server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(live_server)
        page.fill("#api-key", "wrong")
        page.click("#run")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('401')", timeout=30_000
        )
        assert "API key" in page.inner_text("#status")
        browser.close()
