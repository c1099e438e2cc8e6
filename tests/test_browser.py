"""End to end in headless Chromium (Debian's ``chromium`` driven by Playwright's bundled driver, no
browser download): load the page, compress the tiny model, find the Inspect plots and both chat replies.

Skipped, with the reason, where Chromium or the playwright package is missing (``make setup`` installs
both when it can).
"""
import os
import shutil
import socket
from pathlib import Path

import pytest

from test_app import tiny_folder  # noqa: F401  (session fixture: a 2-layer random Llama folder)

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's queue vs pandas 3
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 240_000  # the machine may be busy: every wait is generous

if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium not found at {CHROMIUM} (install Debian's `chromium` package; "
                "`make setup` does it when apt is available)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed (pip install playwright)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_folder):  # noqa: F811
    import app

    demo = app.build_app(tiny_folder, device="cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                        quiet=True, css=app.CSS)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as err:  # noqa: BLE001  e.g. a chromium that cannot start in this sandbox
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(err).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
        browser.close()


def test_compress_inspect_and_chat_in_the_browser(page, tmp_path):
    try:
        page.get_by_text("Training-free compression").first.wait_for()
        # manual allocation: one slider per layer of the chosen model
        page.get_by_label("MoDeGPT").check()
        page.get_by_text("Rebuilds each block").first.wait_for()  # the form follows the method
        page.get_by_label("manual").check()
        page.get_by_label("range slider for layer 1").wait_for()
        assert page.get_by_label("range slider for layer 2").count() == 0
        # layer dropping, manual: a checkbox per block; then automatic (Block Influence) for the run
        page.get_by_label("Layer dropping (ShortGPT / LayerChop)").check()
        page.get_by_text("Deletes whole decoder blocks").first.wait_for()
        page.get_by_text("Blocks to drop").first.wait_for()
        page.get_by_label("automatic").check()
        page.get_by_text("Blocks lose 50.0%").first.wait_for()  # live forecast: 1 of 2 blocks goes
        page.get_by_label("Samples").fill("4")
        page.get_by_label("Tokens each").fill("64")
        page.get_by_role("button", name="Compress", exact=True).click()
        status = page.get_by_text("✔").first
        status.wait_for()
        assert "r1" in status.inner_text()

        page.get_by_role("tab", name="Inspect").click()
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6", timeout=TIMEOUT_MS)
        assert page.get_by_text("Block Influence per layer").count() >= 1

        page.get_by_role("tab", name="Chat").click()
        box = page.get_by_placeholder("Message both models…")
        box.fill("Hello!")
        box.press("Enter")
        page.wait_for_function(
            "[...document.querySelectorAll('[data-testid=\"bot\"]')]"
            ".filter(e => e.innerText.includes('tok/s')).length >= 2", timeout=TIMEOUT_MS)
        replies = page.locator('[data-testid="bot"]').filter(has_text="tok/s")
        assert replies.count() == 2
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print("page at failure:", tmp_path / "failure.png")
        raise
