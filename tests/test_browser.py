"""End to end in headless Chromium (Debian's ``chromium`` driven by Playwright's bundled driver, no
browser download): load the page, pick a calibration source, see an error as status text, compress
the tiny model, find the Inspect plots, chat with the dense model and the run (the panes' headers never
covered by scrolled messages) and compare them on the example prompts.

Skipped, with the reason, where Chromium or the playwright package is missing (``make setup`` installs
both when it can). Marked slow (it starts the app and a real browser): ``make test`` runs it,
``make test-fast`` leaves it out.
"""
import contextlib
import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's queue vs pandas 3
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
pytest.importorskip("gradio")
from app_helpers import _free_port  # noqa: E402
from ui.common import STOP  # noqa: E402


def _serve(model):
    import app

    demo = app.build_app(model, device="cpu")
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                        quiet=True, **app.launch_options())
    return demo


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as err:  # noqa: BLE001  e.g. a chromium that cannot start in this sandbox
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url(tiny_folder):  # noqa: F811
    demo = _serve(tiny_folder)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    yield page
    page.close()


SLIDERS = "input[aria-label^='range slider for layer']"
PAINTED = """sel => { const e = document.querySelector(sel); if (!e) return false;
  for (let n = e; n && n !== document.body; n = n.parentElement) {  // no 0-height or hidden ancestor
    const r = n.getBoundingClientRect(), st = getComputedStyle(n);
    if (r.height <= 0 || st.display === 'none' || st.visibility === 'hidden') return false; }
  return true; }"""


PAINTED_TEXT = """text => [...document.querySelectorAll('.prose, .md')].some(e => {
  if (!e.innerText.includes(text)) return false;
  const r = e.getBoundingClientRect(), st = getComputedStyle(e);
  return r.height > 0 && r.width > 0 && st.visibility !== 'hidden' && st.opacity !== '0'; })"""
WAIT_REPLIES = """n => [...document.querySelectorAll('[data-testid="bot"]')]
  .filter(e => e.innerText.includes('tok/s')).length >= n"""  # every reply's stats line, an empty reply's too
SCROLL_USER_MESSAGE_TO_TOP = """i => {
  const list = document.querySelectorAll('.chat-panes .bubble-wrap')[i];
  const user = list.querySelector('.user-row .message');
  list.scrollTop += user.getBoundingClientRect().top - list.getBoundingClientRect().top + 8;
  const l = list.getBoundingClientRect(), u = user.getBoundingClientRect();
  const header = [...list.parentElement.querySelectorAll('[data-testid="block-label"], .top-panel')]
    .map(h => h.getBoundingClientRect()).filter(r => r.height > 0 && r.right > u.left && r.left < u.right)
    .map(r => ({top: r.top, bottom: r.bottom}));
  return {scrolled: u.top < l.top, header, visible: {top: Math.max(u.top, l.top), bottom: Math.min(u.bottom, l.bottom)}};
}"""


PAGE_AT_FAILURE = """() => [...document.body.innerText.split('\\n').filter(l => /⚠|rror|Stopp/.test(l)),
  ...[...document.querySelectorAll('.chat-panes [data-testid="bot"]')].map(e => 'reply: ' + e.innerText)]
  .join('\\n').slice(0, 4000)"""


def _wait_quiet(page, locator, quiet_s: float = 2.0):
    """Until ``locator``'s text stops changing (a streamed reply has ended)."""
    import time

    last, since, end = None, time.time(), time.time() + TIMEOUT_MS / 1000
    while time.time() < end:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.time()
        elif time.time() - since > quiet_s:
            return
        page.wait_for_timeout(250)


def _values(page, n):
    return [page.get_by_label(f"number input for layer {i}").input_value() for i in range(n)]


def _forecast(page, mean: str) -> str:
    """The forecast line once the target ratio shows ``mean`` (manual: the mean of the values)."""
    page.wait_for_function("m => document.querySelector('[aria-label^=\"number input for Target ratio\"]')"
                           ".value === m", arg=mean)
    page.wait_for_timeout(1000)  # the forecast is sent in the same round of updates
    return page.get_by_text("Blocks lose").first.inner_text()


def test_the_default_model_gets_one_interactive_slider_per_layer(browser):
    from compression.models import DEFAULT_MODEL
    from ui.store import ModelStore

    layers = ModelStore("cpu").info(DEFAULT_MODEL).num_layers  # the config only: no weights
    demo = _serve(DEFAULT_MODEL)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(demo.local_url)
        page.get_by_label("manual").check()
        page.get_by_label(f"range slider for layer {layers - 1}").wait_for()
        assert page.locator(SLIDERS).count() == layers == 30
        assert page.locator(SLIDERS + ":disabled").count() == 0
    finally:
        page.close()
        demo.close()


@contextlib.contextmanager
def shot_on_failure(page, path: Path, close: bool = False):
    """A failing block leaves a full-page screenshot at ``path`` (its location printed); ``close``
    closes the page after the block either way."""
    try:
        yield
    except Exception:
        page.screenshot(path=str(path), full_page=True)
        print("page at failure:", path)
        print("its warnings and chat panes:\n" + page.evaluate(PAGE_AT_FAILURE))  # CI keeps no screenshot
        raise
    finally:
        if close:
            page.close()


def test_at_phone_width_every_tab_is_one_tap_away(browser, url, tmp_path):
    """390 px wide: the tab bar wraps instead of hiding tabs behind an overflow menu, and the Compress
    button stays on screen (it was 1,729 px down the form)."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    with shot_on_failure(page, tmp_path / "phone.png", close=True):
        page.goto(url)
        for name in ("Compress", "Inspect", "Evaluate", "Chat", "Runs"):
            tab = page.get_by_role("tab", name=name)
            tab.wait_for()
            box = tab.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, name
        go = page.get_by_role("button", name="Compress", exact=True).bounding_box()  # reachable unscrolled
        assert go and go["y"] >= 0 and go["y"] + go["height"] <= 844, go
        page.get_by_role("tab", name="Runs").click()
        page.get_by_text("This session's runs").first.wait_for()


def test_compress_inspect_evaluate_and_chat_in_the_browser(page, tmp_path):
    with shot_on_failure(page, tmp_path / "failure.png"):
        page.get_by_text("Training-free compression").first.wait_for()
        # manual allocation: one interactive slider per layer of the chosen model, in step with the text
        page.get_by_label("MoDeGPT").check()
        page.get_by_text("Rebuilds each block").first.wait_for()  # the form follows the method
        page.get_by_label("manual").check()
        page.get_by_label("range slider for layer 1").wait_for()
        assert page.locator(SLIDERS).count() == 2 and page.locator(SLIDERS + ":disabled").count() == 0
        text = page.get_by_role("textbox", name="Per-layer values")
        from ui.compress_tab import DEFAULT_RATIO

        page.wait_for_function("v => [...document.querySelectorAll('textarea')].some(t => t.value === v)",
                               arg=f"{DEFAULT_RATIO:.2f},{DEFAULT_RATIO:.2f}")  # the target ratio, per layer
        text.fill("0.10,0.40")
        text.press("Enter")
        page.wait_for_function("() => document.querySelector('[aria-label=\"number input for layer 1\"]')"
                               ".value === '0.4'")
        assert _values(page, 2) == ["0.1", "0.4"]
        forecast = _forecast(page, "0.25")  # the forecast and the read-only mean follow the text
        box = page.get_by_label("number input for layer 0")
        box.fill("0.3")
        box.press("Enter")
        box.blur()  # a slider's release (on blur) writes the text, and the forecast and the mean follow
        page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value === '0.30,0.40')")
        assert _forecast(page, "0.35") != forecast
        # method switched under manual: no parse error, the checkboxes of layer dropping, then back
        page.get_by_label("Layer dropping (ShortGPT / LayerChop)").check()
        page.get_by_text("Blocks to drop").first.wait_for()
        page.get_by_text("Deletes whole decoder blocks").first.wait_for()
        page.wait_for_function("() => !/invalid literal|cannot read/.test(document.body.innerText)", timeout=30_000)
        page.get_by_label("MoDeGPT").check()
        page.get_by_label("range slider for layer 1").wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => /^0\\.\\d\\d,0\\.\\d\\d$/"
                               ".test(t.value))")
        page.wait_for_function("() => !document.body.innerText.includes('⚠')", timeout=30_000)

        # the first Compress of the session paints its progress within seconds; Stop stops it
        compress = page.get_by_role("button", name="Compress", exact=True)
        compress.click()
        page.wait_for_function(PAINTED, arg=".job-progress", timeout=20_000)
        assert page.locator(".job-progress").bounding_box()["height"] > 0
        assert compress.is_disabled()  # greyed out while it runs: a click now could not start anything
        page.get_by_role("button", name="Stop", exact=True).first.click()
        page.get_by_text("the dense model is untouched").first.wait_for()  # "Stopping…", then "Stopped."
        sync_api.expect(compress).to_be_enabled(timeout=60_000)  # given back once the cancel has landed

        page.get_by_label("Samples").fill("4")
        page.get_by_label("Tokens each").fill("64")
        # the calibration source picker; a user error is readable status text (not a toast), and the
        # form stays usable
        source = page.get_by_label("Calibration source")
        from compression.methods import METHODS
        from ui.calibration_form import CALIBRATION_SOURCES

        assert source.input_value() == dict((v, k) for k, v in CALIBRATION_SOURCES)[METHODS["modegpt"].calibration]
        source.click()
        for option in ("self-chat", "source code", "wiki + self-chat", "custom text"):
            page.get_by_role("option").filter(has_text=option).first.wait_for()
        page.get_by_role("option").filter(has_text="custom text").first.click()
        page.get_by_label("Custom calibration text").wait_for()
        page.get_by_text("upload a UTF-8 .txt file").first.wait_for()
        page.get_by_role("button", name="Compress", exact=True).click()
        error = page.get_by_text("⚠ custom calibration: type the text or upload a .txt file")
        error.wait_for()
        page.wait_for_function(PAINTED_TEXT, arg="⚠ custom calibration")
        assert error.bounding_box()["width"] > 300  # one readable line, not a cut-off badge
        source.click()
        page.get_by_role("option").filter(has_text="Wikipedia").first.click()
        page.get_by_label("Custom calibration text").wait_for(state="hidden")
        compress.click()
        page.get_by_text("✔ r1").first.wait_for()

        # Inspect: a titled panel per kind of spectrum, and Block Influence the method did not measure
        page.get_by_role("tab", name="Inspect").click()
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 6", timeout=TIMEOUT_MS)
        for title in ("MLP activation correlation (Nyström)", "attention input", "value–output, kv group 0",
                      "normalised spectra by layer", "MLP channel ridge leverage", "Reconstruction error per layer",
                      "Parameters per layer"):
            page.get_by_text(title).first.wait_for()  # Plotly draws each figure's SVG text after the div exists
        page.get_by_text("the dense model's, on").first.wait_for()  # computed on demand, not "no data"
        layer_box = page.get_by_label("number input for Layer", exact=True)
        layer_box.fill("1")
        layer_box.press("Enter")
        page.get_by_text("Layer 1: eigenvalue spectra").first.wait_for()

        # Evaluate: Stop returns the tab to a ready state within seconds, then every number states its sample
        page.get_by_role("tab", name="Evaluate").click()
        page.get_by_label("number input for Perplexity windows", exact=True).fill("64")  # long enough to stop
        page.get_by_label("piqa").check()
        evaluate = page.get_by_role("button", name="Evaluate dense vs compressed")
        evaluate.click()
        page.locator(".job-progress").locator("visible=true").first.wait_for(timeout=30_000)
        assert evaluate.is_disabled()
        page.get_by_role("button", name="Stop", exact=True).locator("visible=true").first.click()
        page.get_by_text(f"{STOP} Stopped.").locator("visible=true").first.wait_for(timeout=15_000)
        assert page.get_by_text("Evaluate 100%").count() == 0  # stopped, not finished
        sync_api.expect(evaluate).to_be_enabled(timeout=60_000)
        page.get_by_label("number input for Perplexity windows", exact=True).fill("1")
        page.get_by_label("Zero-shot items per task").fill("5")
        page.get_by_label("piqa").check()
        evaluate.click()  # one click is taken: the stop cleared the panel, so a visible one is this run's
        page.locator(".job-progress").locator("visible=true").first.wait_for(timeout=30_000)
        # gradio's Dataframe draws many rows as positioned divs, not a <table>: wait for the text
        page.get_by_text("perplexity (wiki, 1 × 1024-token windows").first.wait_for()
        for sample in ("1 × 1024-token windows", "(n=5)", "median of 5 alternating rounds", "(1 windows)"):
            page.wait_for_function("s => document.body.innerText.includes(s)", arg=sample, timeout=30_000)

        # Chat: the run picker holds the selected run; one pane per model, the run's named
        page.get_by_role("tab", name="Chat").click()
        page.get_by_label("Runs to chat with (up to 3)").wait_for()
        page.locator(".chat-panes").get_by_text("r1 · modegpt −").first.wait_for()
        box = page.get_by_placeholder("Message every model…")
        for turn in range(2):  # enough text to scroll the panes
            box.fill(f"Hello! Turn {turn}: a long message that wraps over the width of a pane, as a real "
                     "question about something would, with a few more words to be sure of it.")
            box.press("Enter")
            # the second turn is typed and sent while the first replies stream: kept, and sent after them
            page.wait_for_function("() => document.querySelectorAll('[data-testid=\"bot\"]').length >= 2")
        page.wait_for_function(WAIT_REPLIES, arg=4, timeout=TIMEOUT_MS)
        _wait_quiet(page, page.locator(".chat-panes"))  # streamed to the end
        replies = page.locator('[data-testid="bot"]').filter(has_text="tok/s")
        assert replies.count() == 4 and page.locator('[data-testid="user"]').filter(has_text="Turn 1").count() == 2
        # scrolled so the first user message is cut at the top: what is left of it shows below the
        # pane's label and buttons, never under them
        for pane in range(2):
            boxes = page.evaluate(SCROLL_USER_MESSAGE_TO_TOP, pane)
            assert boxes["scrolled"], boxes
            for head in boxes["header"]:
                assert boxes["visible"]["top"] >= head["bottom"] - 0.5 or \
                    boxes["visible"]["bottom"] <= boxes["visible"]["top"], boxes

        # Compare on these prompts: a row per example prompt, a column per model
        page.get_by_role("button", name="Compare on these prompts").click()
        page.wait_for_function("() => document.body.innerText.includes('Compare 100%')", timeout=TIMEOUT_MS)
        table = page.locator(".compare-table")
        for text in ("Write a haiku about autumn.", "dense", "r1 · modegpt"):
            table.get_by_text(text).first.wait_for()  # the table's cells may land after the progress text

        # a reload starts a new session: r1 was saved under the runs root and loads back in one click
        page.reload()
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_function("() => [...document.querySelectorAll('input')].some(i => /^r1-/.test(i.value))")
        page.get_by_role("button", name="Load saved run").click()
        page.get_by_text("loaded from r1-").locator("visible=true").first.wait_for()  # not the hidden table cell
